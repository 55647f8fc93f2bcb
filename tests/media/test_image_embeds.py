"""`image_embeds` parts: torch.save bytes read without torch (and without running their pickle), and
placed on the prompt like an image. (Outside tests/protocol, whose run may not import torch.)"""

from __future__ import annotations

import base64
import io
import itertools
import json
import pickle
import zipfile

import numpy
import pytest
import torch

from protocol import App, AppConfig, Generate, Submit
from protocol.media.embeds import decode_image_embeds
from protocol.media.tensor_file import TensorFileError, read_tensor
from protocol.outputs import compute_inline
from protocol.testing import IMAGE_ID, tiny_vision_model

HIDDEN = 6


def saved(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset view", "batched"])
def test_read_tensor_equals_torch_load(dtype, layout):
    base = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    tensor = {
        "contiguous": base,
        "transposed": base.t(),
        "offset view": base[2:5, 1:4],
        "batched": base[None],
    }[layout]
    got = read_tensor(saved(tensor))
    assert got.dtype == numpy.float32 and got.shape == tuple(tensor.shape)
    assert numpy.array_equal(got, tensor.float().numpy())


def test_a_pickle_naming_anything_else_is_refused_without_running_it():
    class Exploit:
        def __reduce__(self):
            return (print, ("ran",))

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(Exploit()))
    with pytest.raises(TensorFileError, match="builtins.print, which is not part of a plain tensor"):
        read_tensor(buffer.getvalue())
    with pytest.raises(TensorFileError, match="something else than one tensor"):
        read_tensor(saved({"a": torch.zeros(2)}))  # a dict of tensors: not one tensor


@pytest.mark.parametrize(
    "data",
    [b"", b"not a zip", saved(torch.zeros(3, dtype=torch.int64)), saved(torch.zeros(2))[:-30]],
    ids=["empty", "garbage", "integers", "truncated"],
)
def test_unreadable_tensor_files_are_refused(data):
    with pytest.raises(TensorFileError):
        read_tensor(data)


@pytest.mark.parametrize(
    ("tensor", "said"),
    [
        (torch.zeros(4, HIDDEN + 1), f"shape [positions, {HIDDEN}]"),
        (torch.zeros(2, 4, HIDDEN), f"shape [positions, {HIDDEN}]"),
        (torch.zeros(0, HIDDEN), f"shape [positions, {HIDDEN}]"),
        (torch.full((2, HIDDEN), float("nan")), "NaN"),
    ],
)
def test_embeddings_of_the_wrong_shape_or_values_are_400s(tensor, said):
    value = base64.b64encode(saved(tensor)).decode()
    with pytest.raises(Exception) as caught:
        decode_image_embeds(value, HIDDEN, where="messages[0].content[0]")
    error = caught.value
    assert error.status == 400 and said in error.message and "messages[0].content[0]" in error.message


def chat(app: App, content: list[dict]):
    body = {"model": "tiny-vision-model", "messages": [{"role": "user", "content": content}]}
    return app.handle("POST", "/v1/chat/completions", [(b"content-type", b"application/json")], json.dumps(body).encode())


def test_embeddings_fill_as_many_positions_as_they_have_rows_beside_images():
    ids = itertools.count()
    model = tiny_vision_model(4, embeds_hidden_size=HIDDEN)
    app = App(AppConfig(enable_mm_embeds=True), [model], clock=lambda: 1.0, new_id=lambda: f"r{next(ids)}")
    rows = torch.arange(3 * HIDDEN, dtype=torch.bfloat16).reshape(3, HIDDEN)
    part = {"type": "image_embeds", "image_embeds": base64.b64encode(saved(rows)).decode()}
    call = chat(app, [part, {"type": "text", "text": "hi"}, part])
    (compute,) = call.start()  # the decoding, which a server runs on a worker thread
    outputs = call.feed([compute_inline(compute)])
    (generate,) = [c for o in outputs if isinstance(o, Submit) for c in o.commands if isinstance(c, Generate)]
    first, second = generate.media
    assert (first.kind, first.length, first.shape) == ("image_embeds", 3, (3, HIDDEN))
    assert generate.prompt_token_ids[first.offset : first.offset + 3] == (IMAGE_ID,) * 3
    assert numpy.frombuffer(first.data, "<f4").tolist() == rows.float().flatten().tolist()
    assert first.hash == second.hash and second.offset > first.offset + 3
