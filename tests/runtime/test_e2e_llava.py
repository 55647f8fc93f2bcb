"""Images through the served stack on a tiny random LLaVA (CLIP tower + Llama), against transformers.

The model is built and saved here (`tests.engine.tiny_llava`: real LlavaProcessor files, tokenizer
with "<image>", llava-1.5 chat template); transformers' `LlavaForConditionalGeneration` with its
own `LlavaProcessor` is the reference. `sansllm serve` runs it as a user would, and the official
`openai` client sends each image as a base64 `data:` URL: greedy tokens equal transformers'
`generate` and the prompt's logprobs equal its logits'. The media fetch (http and file URLs, with
their limits) and the prefix cache's media keys are checked on in-process servers under both
runtimes.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

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

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 8
PROMPT_LOGPROB_TOLERANCE = 1e-4  # float32 on both sides; observed differences are ~1e-6


def noise_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """Random pixels, so that the model's output depends on every image."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# each case: turns of (role, [items]) where an item is text or (image bytes, mime)
RED = encoded(noise_image(32, 32, "RGB", 1))
CASES = {
    "one square image": [("user", [(RED, "image/png"), "What is in the picture?"])],
    "wide RGBA with transparency": [("user", ["Describe", (encoded(noise_image(64, 40, "RGBA", 2)), "image/png")])],
    "small grayscale, upscaled": [("user", [(encoded(noise_image(20, 50, "L", 3)), "image/png"), "Which animal?"])],
    "JPEG": [("user", [(encoded(noise_image(48, 48, "RGB", 4), "JPEG"), "image/jpeg"), "Tell me."])],
    "two images in one message": [
        ("user", [(RED, "image/png"), (encoded(noise_image(40, 32, "RGB", 5)), "image/png"), "Compare them."])
    ],
    "images over two turns": [
        ("user", [(RED, "image/png"), "What is this?"]),
        ("assistant", ["A cat."]),
        ("user", [(encoded(noise_image(36, 36, "RGB", 6)), "image/png"), "And this?"]),
    ],
}


def openai_messages(turns) -> list[dict]:
    messages = []
    for role, items in turns:
        content = [
            {"type": "text", "text": item}
            if isinstance(item, str)
            else {"type": "image_url", "image_url": {"url": data_url(*item)}}
            for item in items
        ]
        messages.append({"role": role, "content": content})
    return messages


def hf_inputs(processor, turns):
    """The same conversation as transformers' processor takes it: image parts and PIL images."""
    messages, images = [], []
    for role, items in turns:
        content = []
        for item in items:
            if isinstance(item, str):
                content.append({"type": "text", "text": item})
            else:
                content.append({"type": "image"})
                images.append(Image.open(io.BytesIO(item[0])))
        messages.append({"role": role, "content": content})
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=images, text=text, return_tensors="pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The model's folder and, per case, transformers' prompt ids, prompt logprobs and greedy tokens."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    folder = build_llava(tmp_path_factory.mktemp("llava") / "tiny-llava", seed=7)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(folder)
    expected = {}
    with torch.no_grad():
        for name, turns in CASES.items():
            inputs = hf_inputs(processor, turns)
            ids = inputs["input_ids"][0].tolist()
            logits = model(**inputs).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            prompt_logprobs = [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
            expected[name] = (ids, prompt_logprobs, out[0, len(ids) :].tolist())
        pixels = processor.image_processor(Image.open(io.BytesIO(RED)), return_tensors="pt")["pixel_values"]
        features = model.get_image_features(pixel_values=pixels)
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        buffer = io.BytesIO()
        torch.save(torch.cat(list(features)) if isinstance(features, (list, tuple)) else features[0], buffer)
        expected["red embeds"] = base64.b64encode(buffer.getvalue()).decode()
    return folder, expected


def launch(folder: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`sansllm serve FOLDER` on a free port; returns the process and its base URL once it serves."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("sansllm")), "serve", str(folder), "--port", str(port),
         "--dtype", "float32", "--log-level", "warning", *flags],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        try:
            process.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        pytest.fail("the server exited:\n" + process.stdout.read().decode()[-4000:])


@pytest.fixture(scope="module")
def served(reference):
    folder, _ = reference
    process, url = launch(folder)
    try:
        yield url
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0].decode()
        assert "Traceback" not in output, output[-4000:]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_and_prompt_logprobs_equal_transformers(served, reference, case):
    _, expected = reference
    prompt_ids, prompt_logprobs, greedy = expected[case]
    with openai.OpenAI(base_url=f"{served}/v1", api_key="x", max_retries=0, timeout=120) as client:
        completion = client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=openai_messages(CASES[case]),
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"return_token_ids": True, "prompt_logprobs": 0, "ignore_eos": True},
        )
    extra = completion.model_extra
    assert extra["prompt_token_ids"] == prompt_ids  # the placeholders expanded as LlavaProcessor does
    assert completion.choices[0].token_ids == greedy
    got = [next(iter(entry.values()))["logprob"] for entry in extra["prompt_logprobs"][1:]]
    assert np.allclose(got, prompt_logprobs, atol=PROMPT_LOGPROB_TOLERANCE, rtol=0)
    assert completion.usage.prompt_tokens == len(prompt_ids)


# ---- in-process servers: fetching, limits and the prefix cache, under both runtimes ----


class MediaHandler(BaseHTTPRequestHandler):
    """/cat.png: an image; /big.png: over the size limit; /slow.png: never answers in time."""

    images: dict[str, bytes] = {}
    release = threading.Event()

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/slow.png":
            self.release.wait(30)
            return
        body = self.images.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """The fetcher hangs up on /big.png after its headers: not an error of this server."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def media_server():
    MediaHandler.images = {"/cat.png": RED, "/big.png": encoded(noise_image(512, 512, "RGB", 9))}
    MediaHandler.release.clear()
    server = QuietServer(("127.0.0.1", 0), MediaHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    MediaHandler.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module", params=RUNTIMES)
def local_server(request, reference, media_server, tmp_path_factory):
    from engine import Engine, EngineConfig

    folder, _ = reference
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "cat.png").write_bytes(RED)
    (allowed.parent / "secret.png").write_bytes(RED)
    flags = ["--dtype", "float32", "--enable-prompt-tokens-details", "--enable-mm-embeds", "--allowed-media-domains", "127.0.0.1",
             "--allowed-local-media-path", str(allowed), "--max-media-bytes", "100k"]  # fmt: skip
    args = parse_serve_args([str(folder), *flags], environ={"VLLM_IMAGE_FETCH_TIMEOUT": "0.5"})
    config = engine_config_from_args(args, EngineConfig)
    config.progress = False
    engine = Engine(config)  # an engine serves one runtime's lifespan
    with ServerThread(build_asgi_app(args, [engine], BRIDGES[request.param]), request.param) as running:
        yield running, media_server, allowed


def ask(url: str, image_url: str, text: str = "What is this?", part: dict | None = None, **extra) -> httpx.Response:
    part = part or {"type": "image_url", "image_url": {"url": image_url}}
    body = {
        "model": httpx.get(f"{url}/v1/models").json()["data"][0]["id"],
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": text}]}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True, "ignore_eos": True, **extra,
    }  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_an_image_fetched_over_http_or_file_answers_like_inline_data(local_server, reference):
    server, port, allowed = local_server
    _, expected = reference
    want = expected["one square image"][2]
    for url in (f"http://127.0.0.1:{port}/cat.png", (allowed / "cat.png").as_uri(), data_url(RED)):
        response = ask(server.url, url, "What is in the picture?")
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == want, url


def test_image_embeddings_answer_like_the_image_they_came_from(local_server, reference):
    server, _, _ = local_server
    _, expected = reference
    part = {"type": "image_embeds", "image_embeds": expected["red embeds"]}
    response = ask(server.url, "", "What is in the picture?", part, prompt_logprobs=0)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["token_ids"] == expected["one square image"][2]
    got = [next(iter(entry.values()))["logprob"] for entry in response.json()["prompt_logprobs"][1:]]
    assert np.allclose(got, expected["one square image"][1], atol=PROMPT_LOGPROB_TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    ("image_url", "said"),
    [
        ("http://localhost:{port}/cat.png", "not in --allowed-media-domains"),
        ("http://127.0.0.1:{port}/big.png", "larger than the limit of 100000 bytes"),
        ("http://127.0.0.1:{port}/slow.png", "Timed out after 0.5 s"),
        ("http://127.0.0.1:{port}/missing.png", "HTTP 404"),
        ("{secret}", "outside --allowed-local-media-path"),
        ("{allowed}/../secret.png", "outside --allowed-local-media-path"),
    ],
)
def test_fetch_limits_are_400s_naming_the_part(local_server, image_url, said):
    server, port, allowed = local_server
    image_url = image_url.format(port=port, secret=(allowed.parent / "secret.png").as_uri(), allowed=allowed.as_uri())
    response = ask(server.url, image_url)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("messages[0].content[0]: ") and said in message, message


def test_the_prefix_cache_keys_images_apart(local_server):
    server, _, _ = local_server
    text = "Describe every detail of this picture, please, in as many words as you can manage."
    other = encoded(noise_image(32, 32, "RGB", 11))

    def cached(image: bytes) -> tuple[int, int]:
        usage = ask(server.url, data_url(image), text).json()["usage"]
        details = usage["prompt_tokens_details"] or {"cached_tokens": 0}  # absent: nothing cached
        return usage["prompt_tokens"], details["cached_tokens"]

    prompt_tokens, _ = cached(RED)
    _, with_other_image = cached(other)
    _, with_same_image = cached(RED)
    # the image sits a few tokens in: a different image shares no block holding image positions
    assert with_other_image == 0
    assert with_same_image == (prompt_tokens - 1) // 16 * 16 > 16  # every full block, image ones too
