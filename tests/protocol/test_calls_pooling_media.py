"""Chat-style embedding and pooling requests with images, through the Sans-IO core.

A vision-language model served as an embedding model (`--convert embed`) takes `messages` with image
parts on /v1/embeddings and /pooling, as vLLM does: the images are placed on their expanded
placeholders, fetched by the runtime when they are URLs, decoded, and sent in `Encode.media`. A test
plays the runtime (fetches and engine answers) and looks at the `Encode` and at what a client gets.
"""

import json

import pytest

from protocol import Encode, Pooled
from protocol.media.fetch import MediaFetched, MediaRequest
from protocol.testing import IMAGE_ID, ByteTokenizer, tiny_pooling_model, tiny_vision_model
from tests.protocol.test_calls_media import (
    CROP,
    IMAGE_TOKENS,
    JSON_HEADERS,
    Runtime,
    data_url,
    image_part,
    make_app,
    png,
    user,
)

VECTOR = (0.6, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def embedding_model(**kwargs):
    return tiny_vision_model(IMAGE_TOKENS, crop=CROP, tasks=("embed",), **kwargs)


class PoolingRuntime(Runtime):
    @property
    def encode(self) -> Encode:
        (encode,) = [c for c in self.commands if isinstance(c, Encode)]
        return encode

    def pooled(self, vector=VECTOR) -> dict:
        encode = self.encode
        self.feed(Pooled(encode.request_id, vector, len(encode.prompt_token_ids)))
        assert self.ended and self.status == 200, (self.status, self.body)
        return json.loads(self.body)


def post(path, messages, app=None, **body) -> PoolingRuntime:
    app = app or make_app(embedding_model())
    body = {"model": "tiny-vision-model", "messages": messages, **body}
    return PoolingRuntime(app.handle("POST", path, JSON_HEADERS, json.dumps(body).encode()))


def rendered(encode: Encode) -> str:
    return ByteTokenizer(vision=True).decode(encode.prompt_token_ids, skip_special_tokens=False)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/pooling"])
def test_an_inline_image_is_placed_decoded_and_sent_with_the_encode(path):
    runtime = post(path, user({"type": "text", "text": "a cat"}, image_part(data_url(png()))))
    assert runtime.fetches == []
    encode = runtime.encode
    assert encode.params.task == "embed"
    assert rendered(encode) == "<|im_start|>user\n" + "<image>" * IMAGE_TOKENS + "\na cat<|im_end|>\n"
    (item,) = encode.media
    assert item.kind == "image" and item.length == IMAGE_TOKENS and item.shape == (CROP, CROP, 3)
    assert encode.prompt_token_ids[item.offset : item.offset + item.length] == (IMAGE_ID,) * IMAGE_TOKENS
    assert item.data[:3] == bytes([200, 30, 40])
    body = runtime.pooled()
    data = body["data"][0]
    assert data.get("embedding", data.get("data")) == list(VECTOR)
    assert body["usage"]["prompt_tokens"] == len(encode.prompt_token_ids)


def test_an_image_url_is_fetched_before_anything_reaches_the_engine():
    runtime = post("/v1/embeddings", user(image_part("https://example.com/cat.png")))
    assert runtime.commands == [] and runtime.status is None
    assert runtime.fetches == [MediaRequest(0, "https://example.com/cat.png", "image")]
    runtime.feed(MediaFetched(0, png(color=(1, 2, 3)), "image/png"))
    (item,) = runtime.encode.media
    assert item.data[:3] == bytes([1, 2, 3])
    assert runtime.pooled()["object"] == "list"


def test_different_images_give_encodes_that_differ_only_in_their_media():
    red = post("/v1/embeddings", user(image_part(data_url(png(color=(255, 0, 0)))))).encode
    blue = post("/v1/embeddings", user(image_part(data_url(png(color=(0, 0, 255)))))).encode
    assert red.prompt_token_ids == blue.prompt_token_ids
    assert red.media[0].hash != blue.media[0].hash and red.media[0].data != blue.media[0].data


def test_a_bad_image_is_a_400_naming_the_part_and_no_engine_work():
    runtime = post(
        "/v1/embeddings", user({"type": "text", "text": "x"}, image_part("data:image/png;base64,@@@"))
    )
    error = runtime.error()
    assert "messages[0].content[1]" in error["message"] and error["param"] == "messages"
    assert runtime.commands == []


@pytest.mark.parametrize("path", ["/v1/embeddings", "/pooling", "/v1/chat/completions"])
def test_a_bad_image_400_carries_the_request_id_header(path):
    app = make_app(embedding_model() if path != "/v1/chat/completions" else None, enable_request_id_headers=True)
    body = {"model": "tiny-vision-model", "messages": user(image_part("data:image/png;base64,@@@"))}
    headers = [*JSON_HEADERS, (b"x-request-id", b"my-id")]
    runtime = PoolingRuntime(app.handle("POST", path, headers, json.dumps(body).encode()))
    assert runtime.status == 400 and runtime.headers[b"x-request-id"] == b"my-id"


def test_a_text_only_chat_on_the_vision_model_needs_no_media():
    runtime = post("/v1/embeddings", user({"type": "text", "text": "just words"}))
    assert runtime.encode.media == ()
    assert rendered(runtime.encode) == "<|im_start|>user\njust words<|im_end|>\n"
    assert runtime.pooled()["data"][0]["embedding"] == list(VECTOR)


def test_truncation_keeps_the_image_on_its_placeholders_or_refuses_to_cut_it():
    messages = user(image_part(data_url(png())), {"type": "text", "text": "y" * 30})
    full = post("/v1/embeddings", messages).encode
    kept = post("/v1/embeddings", messages, truncate_prompt_tokens=len(full.prompt_token_ids) - 3).encode
    assert kept.prompt_token_ids == full.prompt_token_ids[3:]
    assert kept.media[0].offset == full.media[0].offset - 3
    error = post("/v1/embeddings", messages, truncate_prompt_tokens=20).error()
    assert "truncate_prompt_tokens would cut a media item" in error["message"]


def test_a_typed_placeholder_without_an_image_is_a_400():
    error = post("/v1/embeddings", user({"type": "text", "text": "<image> look"})).error()
    assert "1 image placeholder(s)" in error["message"] and "for 0 image(s)" in error["message"]


def test_a_text_only_embedding_model_refuses_images():
    app = make_app(tiny_pooling_model(name="tiny-vision-model"))
    error = post("/v1/embeddings", user(image_part(data_url(png()))), app=app).error()
    assert "does not support multimodal inputs" in error["message"]


def test_a_generating_vision_model_does_not_serve_embeddings():
    app = make_app(tiny_vision_model(IMAGE_TOKENS, crop=CROP))
    error = post("/v1/embeddings", user(image_part(data_url(png()))), app=app).error()
    assert error["message"] == "The model does not support Embeddings API"


def test_tokenize_and_rerank_still_refuse_media():
    app = make_app(embedding_model())
    tokenize = post("/tokenize", user(image_part(data_url(png()))), app=app)
    assert tokenize.status == 400 and "does not take media inputs" in tokenize.body.decode()
    body = {
        "model": "tiny-vision-model",
        "query": "a cat",
        "documents": [{"content": [image_part(data_url(png()))]}],
    }
    rerank = Runtime(app.handle("POST", "/rerank", JSON_HEADERS, json.dumps(body).encode()))
    assert rerank.status == 400 and rerank.commands == []
