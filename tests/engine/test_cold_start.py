"""Start-up speed pieces keep behaviour: the fast GGUF reader, the fast dequantization, the meta build,
and the converted-tokenizer cache (hit equals a fresh conversion; a changed file invalidates it)."""

from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

from engine.gguf_file import GGUFIndex, GGUFModel, _dequantize, _read_metadata
from engine.model_files import DEFAULT_MODEL, resolve_model


@pytest.fixture(scope="module")
def smollm2_path():
    return resolve_model(DEFAULT_MODEL).path


def assert_same_file_view(path):
    fast = GGUFIndex.open(path)
    assert isinstance(fast, GGUFIndex)
    slow = GGUFReader(path)
    # gguf-py flattens arrays of arrays; we keep them nested (asserted below)
    ours = {key: value for key, value in fast.metadata.items() if key != "t.nested"}
    theirs = {key: value for key, value in _read_metadata(slow).items() if key != "t.nested"}
    assert ours == theirs
    assert [t.name for t in fast.tensors] == [t.name for t in slow.tensors]
    for ours, theirs in zip(fast.tensors, slow.tensors, strict=True):
        assert ours.tensor_type == theirs.tensor_type
        assert list(ours.shape) == list(theirs.shape)
        assert (ours.n_elements, ours.n_bytes, ours.data_offset) == (
            theirs.n_elements,
            theirs.n_bytes,
            theirs.data_offset,
        )
        assert ours.data.shape == theirs.data.shape and ours.data.dtype == theirs.data.dtype
        assert np.array_equal(ours.data, theirs.data)


def test_fast_reader_reads_the_packaged_gguf_as_gguf_py_does(smollm2_path):
    assert_same_file_view(smollm2_path)


def test_fast_reader_reads_every_value_type_as_gguf_py_does(tmp_path):
    path = tmp_path / "kinds.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 7)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 700)
    writer.add_int16("t.i16", -700)
    writer.add_uint32("t.u32", 70000)
    writer.add_int32("t.i32", -70000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 1 << 40)
    writer.add_int64("t.i64", -(1 << 40))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.strs", ["a", "bé", ""])
    writer.add_array("t.nested", [[1, 2], [3]])
    writer.add_array("tokenizer.ggml.tokens", ["x", "y"])
    writer.add_array("tokenizer.ggml.scores", [0.5, 0.25])
    writer.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("f16", np.arange(8, dtype=np.float16).reshape(2, 4))
    block = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for qtype in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0):
        writer.add_tensor(f"q.{qtype.name}", quantize(block, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_same_file_view(path)
    meta = GGUFIndex(path).metadata
    assert (
        meta["t.str"] == "héllo" and meta["t.strs"] == ["a", "bé", ""] and meta["t.nested"] == [[1, 2], [3]]
    )
    assert meta["tokenizer.ggml.tokens"] == range(2)


@pytest.mark.parametrize(
    "qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0]
)
def test_fast_dequantization_is_gguf_py_bit_for_bit(qtype):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((7, 96)) * rng.uniform(0.01, 10, (7, 1))).astype(np.float32)
    data = quantize(values, qtype)
    tensor = gguf.ReaderTensor(
        name="w",
        tensor_type=qtype,
        shape=np.array([96, 7], dtype=np.uint64),
        n_elements=values.size,
        n_bytes=data.nbytes,
        data_offset=0,
        data=data,
        field=None,
    )
    ours = _dequantize(tensor)
    assert ours.shape == (7, 96) and ours.dtype == np.float32
    assert np.array_equal(ours, dequantize(data, qtype))


def test_packaged_gguf_dequantizes_as_gguf_py(smollm2_path):
    reader = GGUFIndex.open(smollm2_path)
    for tensor in reader.tensors:
        expected = dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(_dequantize(tensor), expected.reshape(_dequantize(tensor).shape)), tensor.name


def test_gguf_model_config_is_the_same_with_either_reader(smollm2_path):
    model = GGUFModel(smollm2_path)
    assert isinstance(model.reader, GGUFIndex)
    assert model.metadata == _read_metadata(GGUFReader(smollm2_path))


def test_meta_build_skips_initialisers_and_torch_dynamo(tmp_path):
    """The model built on meta runs no initialiser (they pull in torch._dynamo) and is the real class."""
    from engine.loader import _skip_random_init
    from engine.models.llama import LlamaForCausalLM

    with torch.device("meta"), _skip_random_init():
        embedding = torch.nn.Embedding(4, 3)
        linear = torch.nn.Linear(3, 2)
    assert embedding.weight.is_meta and linear.weight.is_meta
    # outside meta the initialisers still run
    with _skip_random_init():
        real = torch.nn.Embedding(4, 3)
    assert real.weight.abs().sum() > 0
    assert LlamaForCausalLM.__name__ == "LlamaForCausalLM"


def test_loading_the_default_model_does_not_import_torch_dynamo(smollm2_path):
    import subprocess

    code = (
        "import sys, torch\n"
        "from engine.gguf_file import GGUFModel\n"
        "from engine.loader import build_model\n"
        f"g = GGUFModel({str(smollm2_path)!r})\n"
        "m = build_model(g.config, torch.float32, torch.device('cpu'), g.rope_freq_factors(), g.weights(torch.float32, False))\n"
        "assert type(m).__name__ == 'LlamaForCausalLM'\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- the converted GGUF tokenizer cache ----

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> special <|im_end|>",
    "unicode: héllo wörld 日本語 🙂",
    "def f(x):\n    return x ** 2  # code",
    "",
]


def same_tokenizer(a, b) -> None:
    """Two HFTokenizers encode, decode and template alike."""
    for text in TEXTS:
        for special in (True, False):
            assert a.encode(text, add_special_tokens=special) == b.encode(text, add_special_tokens=special), (
                text
            )
        ids = a.encode(text)
        assert a.decode(ids) == b.decode(ids)
        assert a.decode(ids, skip_special_tokens=False) == b.decode(ids, skip_special_tokens=False)
        assert a.convert_ids_to_tokens(ids) == b.convert_ids_to_tokens(ids)
    assert a.vocab_size == b.vocab_size
    assert a.eos_token_ids == b.eos_token_ids
    assert a.all_special_ids == b.all_special_ids
    assert (a.bos_token, a.eos_token) == (b.bos_token, b.eos_token)
    assert a.chat_template == b.chat_template
    messages = [{"role": "user", "content": "Hi <|im_end|> there"}]
    rendered = [
        tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for tok in (a, b)
    ]
    assert rendered[0] == rendered[1]
    assert a.encode(rendered[0], add_special_tokens=False) == b.encode(rendered[1], add_special_tokens=False)


@pytest.fixture
def gguf_copy(tmp_path, monkeypatch, smollm2_path):
    """The packaged GGUF copied into a temporary folder, with an empty cache of our own."""
    import shutil

    monkeypatch.setenv("SANSLLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    shutil.copy2(smollm2_path, path)
    return path


def test_cached_gguf_tokenizer_equals_a_fresh_conversion(gguf_copy):
    from engine.tokenizer import HFTokenizer, gguf_tokenizer_cache_entry

    entry = gguf_tokenizer_cache_entry(gguf_copy)
    assert entry is not None and not entry.exists()
    first = HFTokenizer.from_gguf(gguf_copy, 49152, [2])  # converts and writes the cache
    assert (entry / "tokenizer.json").is_file() and (entry / "init.json").is_file()
    second = HFTokenizer.from_gguf(gguf_copy, 49152, [2])  # reads the cache
    same_tokenizer(first, second)
    assert first.hf is not second.hf
    # against transformers' own gguf_file= loading too
    from transformers import AutoTokenizer

    from engine.tokenizer import HFTokenizer as Wrapper

    reference = Wrapper(
        AutoTokenizer.from_pretrained(str(gguf_copy.parent), gguf_file=gguf_copy.name), 49152, [2]
    )
    same_tokenizer(reference, second)


def test_cache_hit_does_not_convert(gguf_copy, monkeypatch):
    from transformers.integrations import gguf as transformers_gguf

    from engine.tokenizer import HFTokenizer

    HFTokenizer.from_gguf(gguf_copy)

    def refuse(*args, **kwargs):
        raise AssertionError("converted although cached")

    monkeypatch.setattr(transformers_gguf, "get_gguf_tokenizer", refuse)
    monkeypatch.setattr(transformers_gguf, "convert_gguf_tokenizer", refuse)
    HFTokenizer.from_gguf(gguf_copy)


def test_a_changed_file_misses_the_cache(gguf_copy):
    import os

    from engine.tokenizer import HFTokenizer, gguf_tokenizer_cache_entry

    HFTokenizer.from_gguf(gguf_copy)
    before = gguf_tokenizer_cache_entry(gguf_copy)
    stat = gguf_copy.stat()
    os.utime(gguf_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched
    touched = gguf_tokenizer_cache_entry(gguf_copy)
    assert touched != before and not touched.exists()
    with gguf_copy.open("ab") as f:  # grown
        f.write(b"\0" * 32)
    grown = gguf_tokenizer_cache_entry(gguf_copy)
    assert grown not in (before, touched)
    HFTokenizer.from_gguf(gguf_copy)
    assert grown.is_dir()


def test_a_damaged_cache_entry_is_converted_afresh(gguf_copy):
    from engine.tokenizer import HFTokenizer, gguf_tokenizer_cache_entry

    fresh = HFTokenizer.from_gguf(gguf_copy)
    entry = gguf_tokenizer_cache_entry(gguf_copy)
    (entry / "tokenizer.json").write_text("{not json")
    same_tokenizer(fresh, HFTokenizer.from_gguf(gguf_copy))


def test_an_unwritable_cache_still_loads(gguf_copy, monkeypatch, tmp_path):
    from engine.tokenizer import HFTokenizer

    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    monkeypatch.setenv("SANSLLM_CACHE", str(blocker))
    tok = HFTokenizer.from_gguf(gguf_copy)
    assert tok.encode("hi")


def test_load_model_weights_equal_converting_each_tensor_first(smollm2_path):
    """load_model copies float32 weights into bfloat16 parameters: the same bits as `.to(bfloat16)` first."""
    from engine.loader import build_model, load_model

    source = resolve_model(DEFAULT_MODEL)
    loaded = load_model(source, dtype="bfloat16", progress=False, keep_quantized=False)
    gguf_model = GGUFModel(smollm2_path)
    reference = build_model(
        gguf_model.config,
        torch.bfloat16,
        torch.device("cpu"),
        gguf_model.rope_freq_factors(),
        gguf_model.weights(torch.bfloat16, False),
    )
    ours, theirs = loaded.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    assert torch.equal(loaded.model.rope_cache, reference.rope_cache)
