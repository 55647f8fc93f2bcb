"""A vision-language embedding model over HTTP: a tiny random LLaVA served with `--convert embed`.

As vLLM serves vision-language embedding models, /v1/embeddings and /pooling take chat `messages`
whose parts hold images; the embedding is the last prompt token's final (normed) hidden state,
L2-normalised, like every decoder under `--convert embed`. The reference is transformers'
`LlavaForConditionalGeneration` with its own `LlavaProcessor` on the same chat (template rendered
without a generation prompt and tokenized without special tokens, the chat-style embedding
defaults): its language model's `last_hidden_state` at the last position, normalised. The official
`openai` client sends the chat in `extra_body` (its own `input` argument is required, and ignored
by a request with `messages`). In-process servers under both runtimes.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from sansllm.args import parse_serve_args
from sansllm.assemble import build_asgi_app, engine_config_from_args
from tests.engine.tiny_llava import build_llava
from tests.runtime.server import BRIDGES, RUNTIMES, ServerThread
from tests.runtime.test_e2e_llava import data_url, encoded, noise_image

pytestmark = pytest.mark.e2e

# float32 on both sides, unit vectors of 64 entries; observed differences are ~1e-7
EMBED_TOLERANCE = 1e-5

CAT = encoded(noise_image(32, 32, "RGB", 21))
DOG = encoded(noise_image(48, 40, "RGB", 22))
# each case: one user message of items, text or image bytes (PNG)
CASES: dict[str, list[str | bytes]] = {
    "one image": [CAT, "A photo of"],
    "another image": [DOG, "A photo of"],
    "two images": ["Compare", CAT, DOG],
    "text only": ["A photo of a cat, in words only."],
}


def openai_messages(items: list[str | bytes], url: str | None = None) -> list[dict]:
    content = [
        {"type": "text", "text": item}
        if isinstance(item, str)
        else {"type": "image_url", "image_url": {"url": url or data_url(item)}}
        for item in items
    ]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The model's folder and, per case, transformers' prompt ids and normalised last hidden state."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor

    folder = build_llava(tmp_path_factory.mktemp("llava") / "tiny-llava-embed", seed=11)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(folder)
    expected = {}
    with torch.no_grad():
        for name, items in CASES.items():
            content = [
                {"type": "text", "text": i} if isinstance(i, str) else {"type": "image"} for i in items
            ]
            text = processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=False
            )
            images = [Image.open(io.BytesIO(i)) for i in items if isinstance(i, bytes)]
            inputs = processor(
                images=images or None, text=text, add_special_tokens=False, return_tensors="pt"
            )
            state = model.model(**inputs).last_hidden_state[0, -1]
            expected[name] = (
                inputs["input_ids"][0].tolist(),
                torch.nn.functional.normalize(state, dim=0).numpy(),
            )
        ids = AutoTokenizer.from_pretrained(folder)("a cat", return_tensors="pt")["input_ids"]
        state = model.model(input_ids=ids).last_hidden_state[0, -1]
        expected["input"] = (ids[0].tolist(), torch.nn.functional.normalize(state, dim=0).numpy())
    return folder, expected


@pytest.fixture(scope="module", params=RUNTIMES)
def server(request, reference, tmp_path_factory):
    from engine import Engine, EngineConfig

    folder, _ = reference
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "cat.png").write_bytes(CAT)
    flags = ["--convert", "embed", "--dtype", "float32", "--allowed-local-media-path", str(allowed)]
    args = parse_serve_args([str(folder), *flags], environ={})
    config = engine_config_from_args(args, EngineConfig)
    config.progress = False
    with ServerThread(
        build_asgi_app(args, [Engine(config)], BRIDGES[request.param]), request.param
    ) as running:
        yield running, allowed


def embed(url: str, items: list[str | bytes], image_url: str | None = None) -> tuple[np.ndarray, int]:
    """The embedding of a one-message chat through the openai client, and its prompt tokens."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120) as client:
        response = client.embeddings.create(
            model=client.models.list().data[0].id,
            input=[],
            extra_body={"messages": openai_messages(items, image_url)},
        )
    return np.asarray(response.data[0].embedding), response.usage.prompt_tokens


@pytest.mark.parametrize("case", list(CASES))
def test_a_chat_with_images_embeds_as_transformers_last_hidden_state(server, reference, case):
    running, _ = server
    _, expected = reference
    ids, vector = expected[case]
    got, prompt_tokens = embed(running.url, CASES[case])
    assert prompt_tokens == len(ids)  # the placeholders expanded as LlavaProcessor does
    assert got.shape == vector.shape and abs(np.linalg.norm(got) - 1.0) < 1e-5
    assert np.allclose(got, vector, atol=EMBED_TOLERANCE, rtol=0), np.abs(got - vector).max()


def test_two_images_give_different_embeddings(server):
    running, _ = server
    cat, _ = embed(running.url, CASES["one image"])
    dog, _ = embed(running.url, CASES["another image"])
    # same text, other image: apart by far more than the tolerance (a random tiny model's vectors
    # stay close, cosine ~0.995: the last token is text, which the two prompts share)
    assert np.abs(cat - dog).max() > 1000 * EMBED_TOLERANCE


def test_plain_text_input_still_embeds(server, reference):
    running, _ = server
    _, expected = reference
    ids, vector = expected["input"]
    with openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0, timeout=120) as client:
        response = client.embeddings.create(model=client.models.list().data[0].id, input="a cat")
    assert response.usage.prompt_tokens == len(ids)
    assert np.allclose(response.data[0].embedding, vector, atol=EMBED_TOLERANCE, rtol=0)


def test_pooling_with_a_file_url_embeds_like_inline_data(server, reference):
    running, allowed = server
    _, expected = reference
    body = {"messages": openai_messages(CASES["one image"], (allowed / "cat.png").as_uri())}
    response = httpx.post(f"{running.url}/pooling", json=body, timeout=120)
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    assert np.allclose(item["data"], expected["one image"][1], atol=EMBED_TOLERANCE, rtol=0)


def test_a_bad_image_is_a_400_naming_the_part(server):
    running, _ = server
    body = {"messages": openai_messages(["look", b""], "data:image/png;base64,iVBORw0K")}
    response = httpx.post(f"{running.url}/v1/embeddings", json=body, timeout=120)
    assert response.status_code == 400, response.text
    assert "messages[0].content[1]" in response.json()["error"]["message"]
