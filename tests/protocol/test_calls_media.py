"""Chat requests with media parts through the Sans-IO core: placeholders, fetching, decoding, errors.

A test plays the runtime: it answers the call's `Fetch` with `MediaFetched` / `MediaFetchFailed` and
looks at the `Generate` the call then submits, or at the 400 a client gets.
"""

import base64
import io
import itertools
import json

import pytest
from PIL import Image

from protocol import App, AppConfig
from protocol.media.fetch import MediaFetched, MediaFetchFailed, MediaRequest
from protocol.testing import IMAGE_ID, ByteTokenizer, tiny_served_model, tiny_vision_model
from protocol.testing import CallPlayer as Runtime
from tests.media_samples import png_with_size

JSON_HEADERS = [(b"content-type", b"application/json")]
IMAGE_TOKENS = 4
CROP = 8


def png(width=16, height=12, color=(200, 30, 40), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def make_app(model=None, **config):
    ids = itertools.count(1)
    model = model or tiny_vision_model(IMAGE_TOKENS, crop=CROP)
    return App(AppConfig(**config), [model], clock=lambda: 1.0, new_id=lambda: f"r{next(ids)}")


def chat(messages, app=None, **body) -> Runtime:
    app = app or make_app()
    body = {"model": app_model(app), "messages": messages, **body}
    return Runtime(app.handle("POST", "/v1/chat/completions", JSON_HEADERS, json.dumps(body).encode()))


def app_model(app) -> str:
    return json.loads(app.handle("GET", "/v1/models", [], b"").body)["data"][0]["id"]


def test_a_data_url_image_is_decoded_and_placed_on_its_expanded_placeholder():
    runtime = chat(user({"type": "text", "text": "what is this?"}, image_part(data_url(png()))))
    assert runtime.fetches == []  # inline data: nothing to fetch
    generate = runtime.generate
    rendered = ByteTokenizer(vision=True).decode(generate.prompt_token_ids, skip_special_tokens=False)
    assert rendered == (
        "<|im_start|>user\n" + "<image>" * IMAGE_TOKENS + "\nwhat is this?<|im_end|>\n<|im_start|>assistant\n"
    )
    (item,) = generate.media
    assert item.kind == "image" and item.length == IMAGE_TOKENS
    assert generate.prompt_token_ids[item.offset : item.offset + item.length] == (IMAGE_ID,) * IMAGE_TOKENS
    assert item.shape == (CROP, CROP, 3)
    assert item.data[:3] == bytes([200, 30, 40])  # the pixels, resized and cropped


def test_several_images_keep_their_order_and_equal_images_their_hash():
    red, blue = png(color=(255, 0, 0)), png(color=(0, 0, 255))
    runtime = chat(
        user(image_part(data_url(red)), {"type": "text", "text": "and"}, image_part(data_url(blue)))
        + [{"role": "assistant", "content": "ok"}]
        + user(image_part(data_url(red)))
    )
    first, second, third = runtime.generate.media
    assert first.offset < second.offset < third.offset
    assert first.data[:3] == bytes([255, 0, 0]) and second.data[:3] == bytes([0, 0, 255])
    assert first.hash == third.hash != second.hash


def test_a_url_is_fetched_by_the_runtime_before_the_engine_work():
    runtime = chat(user(image_part("https://example.com/cat.png"), {"type": "text", "text": "hi"}))
    assert runtime.commands == [] and runtime.status is None
    (request,) = runtime.fetches
    assert request == MediaRequest(0, "https://example.com/cat.png", "image")
    runtime.feed(MediaFetched(0, png(color=(1, 2, 3)), "image/png"))
    (item,) = runtime.generate.media
    assert item.data[:3] == bytes([1, 2, 3])


def test_a_failed_fetch_is_a_400_naming_the_part():
    runtime = chat(user({"type": "text", "text": "hi"}, image_part("http://example.com/x.png")))
    runtime.feed(MediaFetchFailed(0, "HTTP 404 fetching http://example.com/x.png"))
    error = runtime.error()
    assert error["message"] == "messages[0].content[1]: HTTP 404 fetching http://example.com/x.png"
    assert runtime.commands == []


def test_fetched_bytes_that_are_not_an_image_are_a_400():
    runtime = chat(user(image_part("http://example.com/x.png")))
    runtime.feed(MediaFetched(0, b"<html>not found</html>", "text/html"))
    assert "messages[0].content[0]" in runtime.error()["message"]


def test_a_client_leaving_during_the_fetch_leaves_nothing_to_abort():
    runtime = chat(user(image_part("http://example.com/x.png")))
    assert runtime.call.disconnected() == []
    assert not runtime.call.finished


def noisy_png() -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (32, 32), bytes((i * 7919) % 251 for i in range(32 * 32 * 3))).save(buffer, "PNG")
    return buffer.getvalue()


TRUNCATED_PNG = noisy_png()[:-200]


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (data_url(TRUNCATED_PNG), "truncated"),
        ("data:image/png;base64,@@@not base64@@@", "base64"),
        (data_url(png(), mime="text/plain"), "text/plain"),
        (data_url(b""), "empty"),
        (data_url(b"GIF89a-but-not-really"), "image"),
        (data_url(png_with_size(0, 0)), "not a valid image"),
        (data_url(png_with_size(100_000, 100_000)), "image"),
        ("ftp://example.com/x.png", "data:, http(s): or file: URL"),
        ("data:image/png;base64", "data URL"),
    ],
)
def test_malformed_media_is_a_400_naming_the_part(url, said):
    runtime = chat(user({"type": "text", "text": "look"}, image_part(url)))
    error = runtime.error()
    assert "messages[0].content[1]" in error["message"] and said in error["message"], error["message"]
    assert error["param"] == "messages"
    assert runtime.commands == []


@pytest.mark.parametrize(
    ("part", "said"),
    [
        ({"type": "image_url", "image_url": {"nourl": 1}}, "image_url must be a URL string"),
        ({"type": "image_url"}, "image_url must be a URL string"),
        ({"type": "input_audio", "input_audio": "x"}, "This model does not accept audio inputs"),
        ({"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}, "does not accept video inputs"),
        ({"type": "image_embeds", "image_embeds": "AAAA"}, "need the server flag --enable-mm-embeds"),
        ({"type": "image_pil", "image_pil": "x"}, "not accepted over HTTP"),
        ({"type": "hologram", "hologram": {}}, "Unknown part type"),
    ],
)
def test_unusable_parts_are_400s(part, said):
    error = chat(user(part)).error()
    assert said in error["message"], error["message"]


def test_a_text_only_model_refuses_media_as_before():
    app = make_app(tiny_served_model())
    error = chat(user(image_part(data_url(png()))), app=app).error()
    assert "does not support multimodal inputs" in error["message"]


def test_limit_mm_per_prompt():
    app = make_app(limit_mm_per_prompt={"image": 1})
    error = chat(user(image_part(data_url(png())), image_part(data_url(png()))), app=app).error()
    assert error["message"] == "At most 1 image(s) may be provided in one prompt."


def test_a_placeholder_typed_by_the_client_is_counted():
    runtime = chat(user({"type": "text", "text": "<image> look"}))
    error = runtime.error()
    assert "1 image placeholder(s)" in error["message"] and "for 0 image(s)" in error["message"]


def test_truncation_that_would_cut_an_image_is_refused():
    runtime = chat(user(image_part(data_url(png())), {"type": "text", "text": "x" * 40}), truncate_prompt_tokens=20)
    assert "truncate_prompt_tokens" in runtime.error()["message"]


def test_openai_content_format_templates_see_image_parts():
    template = (
        "{% for m in messages %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    )
    runtime = chat(
        user({"type": "text", "text": "a"}, image_part(data_url(png())), {"type": "text", "text": "b"}),
        app=make_app(chat_template=template),
    )
    rendered = ByteTokenizer(vision=True).decode(runtime.generate.prompt_token_ids, skip_special_tokens=False)
    assert rendered == "a" + "<image>" * IMAGE_TOKENS + "b"


def test_pooling_endpoints_refuse_media_parts():
    app = make_app()
    body = {"model": app_model(app), "messages": user(image_part(data_url(png())))}
    call = app.handle("POST", "/tokenize", JSON_HEADERS, json.dumps(body).encode())
    runtime = Runtime(call)
    assert runtime.status == 400 and "does not take media inputs" in runtime.body.decode()
