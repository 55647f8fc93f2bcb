"""A LLaVA model served with `--convert embed`: prompts with images pooled from their last token.

Like the other decoders converted to embeddings, the embedding is the final (normed) hidden state of
the last prompt token, L2-normalised; here the prompt's image placeholders carry the vision tower's
features, so it equals transformers' `LlavaModel` last hidden state for the same ids and image.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration as HFLlava

from engine.engine import Engine, EngineConfig
from protocol.engine_api import Encode, Failed, MediaInput, Pooled, PoolingParams
from tests.engine.test_llava import core_resize_and_crop, random_image
from tests.engine.tiny_encoders import build_encoder_folder
from tests.engine.tiny_llava import IMAGE_SIZE, build_llava

EMBED_TOLERANCE = 1e-5  # float32 on both sides; unit vectors of 64 entries


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llava(tmp_path_factory.mktemp("llava") / "tiny-llava", seed=3)


@pytest.fixture(scope="module")
def embedder(tiny_llava: Path) -> Engine:
    return Engine(EngineConfig(model=str(tiny_llava), progress=False, convert="embed"))


def image_item(engine: Engine, offset: int, seed: int) -> tuple[MediaInput, torch.Tensor]:
    """An image placed at `offset` as the protocol core sends it, and its pixel values for transformers."""
    assert engine.multimodal is not None
    data, shape = core_resize_and_crop(random_image(40, 48, seed), engine.multimodal.image)
    pixels = engine.loaded.model.pixel_values(data, shape)  # equal to CLIP's processor (test_llava)
    item = MediaInput(
        "image", hashlib.sha256(data).hexdigest(), offset, engine.multimodal.image_tokens, data, shape
    )
    return item, pixels


def prompt_with_image(engine: Engine) -> tuple[list[int], int]:
    assert engine.multimodal is not None
    spec = engine.multimodal
    encode = engine.tokenizer.encode
    head = encode("USER: ", add_special_tokens=True)
    ids = (
        head
        + [spec.image_token_id] * spec.image_tokens
        + encode("\nWhat is this? ASSISTANT:", add_special_tokens=False)
    )
    return ids, len(head)


def pooled(engine: Engine, *commands: Encode) -> dict[str, Pooled | Failed]:
    return {event.request_id: event for event in engine.generate_sync(commands)}  # type: ignore[union-attr]


def test_the_loader_serves_llava_as_an_embedding_model(embedder: Engine):
    assert embedder.tasks == {"embed"}
    assert embedder.pooling is not None and embedder.pooling.method == "last" and embedder.pooling.normalize
    assert embedder.pooling.hidden_size == 64
    assert embedder.multimodal is not None and embedder.core.dtype == torch.float32


def test_a_prompt_with_an_image_pools_transformers_last_hidden_state(tiny_llava: Path, embedder: Engine):
    ids, offset = prompt_with_image(embedder)
    first, first_pixels = image_item(embedder, offset, seed=1)
    second, second_pixels = image_item(embedder, offset, seed=2)
    params = PoolingParams(task="embed")
    raw = PoolingParams(task="embed", normalize=False)
    got = pooled(
        embedder,
        Encode("a", tuple(ids), params, media=(first,)),
        Encode("b", tuple(ids), params, media=(second,)),
        Encode("raw", tuple(ids), raw, media=(first,)),
    )
    hf = HFLlava.from_pretrained(tiny_llava, dtype=torch.float32).eval()
    with torch.no_grad():
        states = [
            hf.model(input_ids=torch.tensor([ids]), pixel_values=pixels[None]).last_hidden_state[0, -1]
            for pixels in (first_pixels, second_pixels)
        ]
    for key, state in zip("ab", states, strict=True):
        event = got[key]
        assert isinstance(event, Pooled) and event.num_prompt_tokens == len(ids)
        expected = torch.nn.functional.normalize(state, dim=0)
        torch.testing.assert_close(torch.tensor(event.data), expected, atol=EMBED_TOLERANCE, rtol=0)
    raw_event = got["raw"]
    assert isinstance(raw_event, Pooled)
    torch.testing.assert_close(torch.tensor(raw_event.data), states[0], atol=1e-4, rtol=1e-5)
    assert not torch.allclose(torch.tensor(got["a"].data), torch.tensor(got["b"].data), atol=1e-2)  # type: ignore[union-attr]


def test_chunked_prefill_through_the_image_pools_the_same(tiny_llava: Path, embedder: Engine):
    ids, offset = prompt_with_image(embedder)
    item, _ = image_item(embedder, offset, seed=1)
    chunked = Engine(
        EngineConfig(model=str(tiny_llava), progress=False, convert="embed", max_num_batched_tokens=8)
    )
    command = Encode("c", tuple(ids), PoolingParams(task="embed"), media=(item,))
    whole, pieces = pooled(embedder, command)["c"], pooled(chunked, command)["c"]
    assert isinstance(whole, Pooled) and isinstance(pieces, Pooled)
    torch.testing.assert_close(
        torch.tensor(pieces.data), torch.tensor(whole.data), atol=EMBED_TOLERANCE, rtol=0
    )


def test_misplaced_or_missing_images_are_refused(embedder: Engine):
    ids, offset = prompt_with_image(embedder)
    item, _ = image_item(embedder, offset, seed=1)
    moved, _ = image_item(embedder, offset + 1, seed=1)
    got = pooled(
        embedder,
        Encode("moved", tuple(ids), PoolingParams(), media=(moved,)),
        Encode("missing", tuple(ids), PoolingParams()),
        Encode("ok", tuple(ids), PoolingParams(), media=(item,)),
    )
    assert isinstance(got["moved"], Failed) and got["moved"].status == 400
    assert "must all hold the image token" in got["moved"].message
    assert isinstance(got["missing"], Failed) and "image tokens that no image fills" in got["missing"].message
    assert isinstance(got["ok"], Pooled)


def test_text_only_embedding_models_refuse_media(tiny_llama: Path, tmp_path: Path):
    data = bytes(IMAGE_SIZE * IMAGE_SIZE * 3)
    item = MediaInput("image", "0" * 64, 0, 2, data, (IMAGE_SIZE, IMAGE_SIZE, 3))
    decoder = Engine(EngineConfig(model=str(tiny_llama), progress=False, convert="embed"))
    encoder = Engine(
        EngineConfig(model=str(build_encoder_folder(tmp_path / "bert", "BertModel")), progress=False)
    )
    for engine in (decoder, encoder):
        (refused,) = engine.generate_sync([Encode("e", (5, 6, 7), PoolingParams(), media=(item,))])
        assert isinstance(refused, Failed) and refused.status == 400
        assert refused.message == "This model does not accept media inputs; send text only."
