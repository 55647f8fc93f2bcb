"""Load a model, its tokenizer and its generation defaults from a `ModelSource`.

The registry (`engine.registry`) says which implementation an architecture runs on and what it
serves; decoders load here from GGUF files or HF folders, encoders from HF folders.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from engine.gguf_file import GGUFModel
from engine.image_processor import ImageProcessor, image_processor_from_config, read_processor_files
from engine.model_config import (
    ModelConfig,
    UnsupportedModelError,
    multimodal_architecture,
    speech_architecture,
)
from engine.model_files import ModelSource
from engine.models.llama import LlamaForCausalLM
from engine.models.llava import LlavaConfig, LlavaForConditionalGeneration
from engine.models.whisper import WhisperConfig, WhisperForConditionalGeneration
from engine.quantized_weights import QuantizedTensor
from engine.registry import (
    ArchitectureSupport,
    Convert,
    architecture_support,
    decoder_class,
    encoder_architecture,
)
from engine.tokenizer import HFTokenizer
from engine.whisper_features import FeatureSettings
from engine.whisper_tokens import WhisperDecoding, speech_spec, whisper_decoding
from kernels import cpu_ops
from protocol.media.spec import MultimodalSpec, SpeechSpec

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES.update({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16})

# generation_config.json key -> sampling parameter it defaults
_GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class PoolingFacts:
    """What the API needs to know about a pooling model's outputs (`protocol.model.PoolingInfo`)."""

    hidden_size: int
    method: str = "last"  # how an embedding is pooled: mean, cls or last
    normalize: bool = True  # embeddings are L2-normalised unless a request says otherwise
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None
    num_labels: int = 0
    id2label: dict[int, str] = field(default_factory=dict)


@dataclass
class LoadedModel:
    source: ModelSource
    config: Any  # ModelConfig for decoders, engine.models.bert.EncoderConfig for encoders
    model: torch.nn.Module
    tokenizer: HFTokenizer
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    spec: ArchitectureSupport | None = None  # None: a decoder that generates (models built by hand in tests)
    pooling: PoolingFacts | None = None
    max_model_len: int | None = None  # a limit below the model's own (sentence-transformers' max_seq_length)
    multimodal: MultimodalSpec | None = None  # the media a vision-language model takes (None: text only)
    speech: SpeechSpec | None = None  # a speech-to-text model's special tokens and limits (None: not one)
    decoding: WhisperDecoding | None = None  # its decoding rules' settings (engine.processors.whisper)

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = architecture_support(self.config.architecture)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), not by emulation
    (False when `SANSLLM_CPU_ISA` stands in for a CPU without it)."""
    if cpu_ops.target() != "native":
        return False
    try:
        with open(cpuinfo) as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(
    dtype: str, device: torch.device, config_dtype: str | None = None, *, pooling: bool = False
) -> torch.dtype:
    """`auto`: on a CPU, bfloat16 where the CPU has native bf16 instructions, else float32; on an
    accelerator the checkpoint's half type, else bfloat16. Pooling models (embeddings, scores)
    get float32 on a CPU: their outputs are compared by cosine distance and ranked, where bfloat16's
    rounding (about 1e-3 relative) moves near ties; the encoders we serve are small, so float32
    costs little.

    Why bfloat16 on such CPUs: decode is bound by reading the weights, and bf16 halves that. Measured
    on a 2-core AVX512-BF16 EPYC: the SmolLM2 matmuls of one decode step take 54 ms instead of 143 ms
    at 32 sequences and 29 instead of 51 ms at one (see bench/RESULTS.md). Pass `float32` for
    results that match float32 references token for token.
    """
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() and not pooling else torch.float32
    if config_dtype in ("bfloat16", "float16"):
        return DTYPES[config_dtype]
    return torch.bfloat16


def resolve_weight_storage(dtype: str, loaded: LoadedModel) -> torch.dtype | None:
    """`auto` on a CPU without native bfloat16 math (where the model computes in float32): keep the
    float32 projection weights of a generating model in bfloat16, read by the quantized kernels and
    widened to float32 in registers, since decode is bound by reading the weights. None elsewhere:
    an explicit dtype, CPUs with bfloat16 math (the model is bfloat16 already), accelerators, pooling
    models (float32 for ranking, see `resolve_dtype`), and where the C++ kernels did not build."""
    parameter = next(loaded.model.parameters())
    if dtype != "auto" or parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return None
    if loaded.pooling is not None or cpu_has_native_bf16() or cpu_ops.load() is None:
        return None
    return torch.bfloat16


def load_model(
    source: ModelSource,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
    convert: Convert = "auto",
    keep_quantized: bool = True,
) -> LoadedModel:
    """Read config, weights and tokenizer; the model comes back in eval mode.

    GGUF tensors in the formats the kernels run (`engine.quantized_weights.KEPT_QUANTIZED`) stay in
    their blocks unless `keep_quantized` is False (then every weight is dequantized to `dtype` at
    load: exactness checks, and the old behaviour)."""
    dev = resolve_device(device)
    clock = _PhaseClock(source.name)
    if source.kind == "gguf":
        gguf = GGUFModel(source.path)
        config = gguf.config
        clock.lap("read the GGUF header")
        torch_dtype = resolve_dtype(dtype, dev, pooling=convert == "embed")
        # The tokenizer (mostly Python: importing transformers, reading the cache) is built on a
        # second thread while the weights are dequantized (numpy and torch, which release the GIL).
        with ThreadPoolExecutor(1, thread_name_prefix="sansllm-tokenizer") as pool:
            tokenizer_job = pool.submit(
                HFTokenizer.from_gguf, source.path, config.vocab_size, config.eos_token_ids
            )
            # float32 as dequantized: the copy into the model's parameters converts to `torch_dtype`
            # (the same rounding as a `.to`) without a second full-size temporary per tensor
            weights = gguf.weights(torch.float32, progress, keep_quantized)
            quantized = gguf.quantized_names() if keep_quantized else {}
            model = build_model(config, torch_dtype, dev, gguf.rope_freq_factors(), weights, quantized)
            how = "kept quantized" if quantized else "dequantized"
            clock.lap(f"loaded the weights ({how}, {torch_dtype}; the tokenizer alongside)")
            tokenizer = tokenizer_job.result()
        clock.lap("built the tokenizer (waited for it)")
        defaults = generation_defaults(source.folder / "generation_config.json")
        return _decoder(source, config, model, tokenizer, defaults, convert)

    raw = _read_json(source.path / "config.json")
    if speech_architecture(raw) is not None:
        return _load_whisper(source, raw, dtype, dev, progress, convert, clock)
    if encoder_architecture(raw) is not None:
        return _load_encoder(source, raw, dtype, dev, progress, convert, clock)
    if multimodal_architecture(raw) is not None:
        return _load_llava(source, raw, dtype, dev, progress, convert, clock)
    config = ModelConfig.from_hf(raw)
    torch_dtype = resolve_dtype(
        dtype, dev, raw.get("torch_dtype") or raw.get("dtype"), pooling=convert == "embed"
    )
    model = build_model(
        config, torch_dtype, dev, None, safetensors_weights(source.path, torch_dtype, progress)
    )
    clock.lap(f"loaded the weights ({torch_dtype})")
    generation = _read_json(source.path / "generation_config.json")
    eos = set(config.eos_token_ids) | set(_ids(generation.get("eos_token_id")))
    tokenizer = HFTokenizer.from_folder(source.path, config.vocab_size, eos)
    clock.lap("built the tokenizer")
    defaults = generation_defaults(source.path / "generation_config.json")
    return _decoder(source, config, model, tokenizer, defaults, convert)


def _decoder(
    source: ModelSource,
    config: ModelConfig,
    model: LlamaForCausalLM,
    tokenizer: HFTokenizer,
    defaults: dict[str, Any],
    convert: Convert,
) -> LoadedModel:
    spec = architecture_support(config.architecture, convert)
    pooling = None if spec.generates else PoolingFacts(config.hidden_size, "last", True)
    return LoadedModel(source, config, model, tokenizer, defaults, spec, pooling)


def _load_encoder(
    source: ModelSource,
    raw: dict[str, Any],
    dtype: str,
    device: torch.device,
    progress: bool,
    convert: Convert,
    clock: _PhaseClock | None = None,
) -> LoadedModel:
    """A BERT-family encoder from an HF folder, with sentence-transformers' pooling settings."""
    from engine.models.bert import EncoderConfig, build_encoder
    from engine.pooling import read_pooling_config

    config = EncoderConfig.from_hf(raw)
    spec = architecture_support(config.architecture, convert, config.num_labels)
    torch_dtype = resolve_dtype(dtype, device, raw.get("torch_dtype") or raw.get("dtype"), pooling=True)
    with _skip_random_init():  # it builds on meta too
        model = build_encoder(
            config, torch_dtype, device, safetensors_weights(source.path, torch_dtype, progress)
        )
    if clock is not None:
        clock.lap(f"loaded the weights ({torch_dtype})")
    pooling_config = read_pooling_config(source.path)
    pooling = PoolingFacts(
        hidden_size=config.hidden_size,
        method=pooling_config.method,
        normalize=pooling_config.normalize,
        is_matryoshka=config.is_matryoshka,
        matryoshka_dimensions=config.matryoshka_dimensions,
        num_labels=config.num_labels if "classify" in spec.tasks else 0,
        id2label=dict(config.id2label) if "classify" in spec.tasks else {},
    )
    tokenizer = HFTokenizer.from_folder(source.path, config.vocab_size)
    if clock is not None:
        clock.lap("built the tokenizer")
    seq_len = _read_json(source.path / "sentence_bert_config.json").get("max_seq_length")
    max_len = min(config.max_model_len, int(seq_len)) if seq_len else None
    return LoadedModel(source, config, model, tokenizer, {}, spec, pooling, max_len)


def _load_llava(
    source: ModelSource,
    raw: dict[str, Any],
    dtype: str,
    device: torch.device,
    progress: bool,
    convert: Convert,
    clock: _PhaseClock,
) -> LoadedModel:
    """A LLaVA-style model from an HF folder: config.json, safetensors, the processor files
    (image processing settings) and the tokenizer, which must know the image placeholder token.
    With `convert="embed"` it is an embedding model like the other converted decoders (last prompt
    token, normalised, float32 on a CPU by default), whose prompts may hold images."""
    config = LlavaConfig.from_hf(raw)
    spec = architecture_support(config.text.architecture, convert)
    image_config, processor_config = read_processor_files(source.path)
    if not image_config:
        raise UnsupportedModelError(
            f"{source.path} lacks the image processor's settings (preprocessor_config.json or processor_config.json)"
        )
    processor = image_processor_from_config(image_config)
    side = config.vision.image_size
    if processor.output_size != (side, side):
        raise UnsupportedModelError(
            f"the image processor makes {processor.output_size or 'variable-size'} images; "
            f"the vision tower takes {side}x{side}"
        )
    _check_image_tokens(processor_config, processor, config)
    text_raw = raw.get("text_config") or {}
    config_dtype = (
        raw.get("torch_dtype") or raw.get("dtype") or text_raw.get("torch_dtype") or text_raw.get("dtype")
    )
    torch_dtype = resolve_dtype(dtype, device, config_dtype, pooling=convert == "embed")
    model = build_llava_model(
        config, processor, torch_dtype, device, safetensors_weights(source.path, torch_dtype, progress)
    )
    clock.lap(f"loaded the weights ({torch_dtype}; vision tower and language model)")
    generation = _read_json(source.path / "generation_config.json")
    eos = set(config.text.eos_token_ids) | set(_ids(generation.get("eos_token_id")))
    tokenizer = HFTokenizer.from_folder(source.path, config.text.vocab_size, eos)
    if tokenizer.chat_template is None:  # the hub's llava-hf folders keep it in chat_template.json
        template = _read_json(source.path / "chat_template.json").get("chat_template")
        template = template or processor_config.get("chat_template")
        if isinstance(template, str):
            tokenizer = HFTokenizer(tokenizer.hf, config.text.vocab_size, eos, template)
    clock.lap("built the tokenizer")
    image_token = _image_token(tokenizer, config.image_token_id)
    multimodal = MultimodalSpec(
        modalities=frozenset({"image"}),
        image_token=image_token,
        image_token_id=config.image_token_id,
        image_tokens=config.image_tokens,
        image=processor.spec,
        embeds_hidden_size=config.text.hidden_size,
    )
    logger.info(
        "%s: images of %dx%d take %d %r tokens each",
        source.name,
        side,
        side,
        config.image_tokens,
        image_token,
    )
    defaults = generation_defaults(source.path / "generation_config.json")
    pooling = None if spec.generates else PoolingFacts(config.text.hidden_size, "last", True)
    return LoadedModel(source, config.text, model, tokenizer, defaults, spec, pooling, multimodal=multimodal)


def _image_token(tokenizer: HFTokenizer, token_id: int) -> str:
    """The tokenizer's string for the config's image token id; a clear error when it has none."""
    if not 0 <= token_id < len(tokenizer.hf):
        raise UnsupportedModelError(f"the image token id {token_id} is outside the tokenizer's vocabulary")
    token = tokenizer.convert_ids_to_tokens([token_id])[0]
    if not token or tokenizer.encode(token, add_special_tokens=False) != [token_id]:
        raise UnsupportedModelError(
            f"the tokenizer does not encode the image token {token!r} as id {token_id}"
        )
    return token


def _check_image_tokens(
    processor_config: dict[str, Any], processor: ImageProcessor, config: LlavaConfig
) -> None:
    """Refuse processor files that expand an image into another number of placeholders than the model
    fills (transformers would fail on such a prompt): `image_seq_length`, or the count LlavaProcessor
    derives from `patch_size`, `num_additional_image_tokens` and its selection strategy."""
    stated = processor_config.get("image_seq_length")
    patch = processor_config.get("patch_size")
    if stated is None and patch and "num_additional_image_tokens" in processor_config:
        height, width = processor.output_size or (0, 0)
        strategy = processor_config.get("vision_feature_select_strategy") or config.select_strategy
        stated = (height // patch) * (width // patch) + int(processor_config["num_additional_image_tokens"])
        stated -= strategy == "default"
    if stated is not None and int(stated) != config.image_tokens:
        raise UnsupportedModelError(
            f"the processor expands an image into {stated} tokens; the model makes {config.image_tokens} embeddings"
        )


def build_llava_model(
    config: LlavaConfig,
    processor: ImageProcessor,
    dtype: torch.dtype,
    device: torch.device,
    weights: Iterator[tuple[str, torch.Tensor]],
) -> LlavaForConditionalGeneration:
    """A LLaVA model on `device` in `dtype`, filled from `weights`, built on meta first as `build_model` does."""
    with torch.device("meta"), _skip_random_init():
        model = LlavaForConditionalGeneration(config, processor, _built_without_rope(LlamaForCausalLM))
        model.language_model.__class__ = LlamaForCausalLM
        model = model.to(dtype).to_empty(device=device)
    language = model.language_model
    if config.text.tie_word_embeddings:  # to_empty unties shared parameters
        language.lm_head.weight = language.model.embed_tokens.weight
    model.init_rope()
    model.load_weights((name, tensor.to(device)) for name, tensor in weights)
    return model.eval().requires_grad_(False)


def _load_whisper(
    source: ModelSource,
    raw: dict[str, Any],
    dtype: str,
    device: torch.device,
    progress: bool,
    convert: Convert,
    clock: _PhaseClock,
) -> LoadedModel:
    """A Whisper model from an HF folder: config.json, safetensors, tokenizer, preprocessor_config.json
    (the log-mel settings; transformers' defaults when absent) and generation_config.json (special
    tokens, languages, the suppress lists of the decoding rules)."""
    config = WhisperConfig.from_hf(raw)
    spec = architecture_support(speech_architecture(raw) or "", convert)
    preprocessor = _read_json(source.path / "preprocessor_config.json")
    features = FeatureSettings.from_hf(preprocessor, config.num_mel_bins)
    torch_dtype = resolve_dtype(dtype, device, raw.get("torch_dtype") or raw.get("dtype"))
    model = build_whisper_model(
        config, features, torch_dtype, device, safetensors_weights(source.path, torch_dtype, progress)
    )
    clock.lap(f"loaded the weights ({torch_dtype}; encoder and decoder)")
    generation = _read_json(source.path / "generation_config.json")
    for key in ("suppress_tokens", "begin_suppress_tokens"):  # older folders keep them in config.json
        if generation.get(key) is None and raw.get(key) is not None:
            generation[key] = raw[key]
    eos = {config.eos_token_id, *_ids(generation.get("eos_token_id"))}
    tokenizer = HFTokenizer.from_folder(source.path, config.vocab_size, eos)
    clock.lap("built the tokenizer")
    speech = speech_spec(tokenizer.hf.get_vocab(), generation, config, features)
    decoding = whisper_decoding(generation, speech, config)
    languages = f"{len(speech.languages)} languages" if speech.languages else "English only"
    logger.info(
        "%s: speech to text (%s), %d s windows of %d mel bins, %d decoder positions",
        source.name,
        languages,
        features.chunk_length,
        features.feature_size,
        config.max_target_positions,
    )
    defaults = generation_defaults(source.path / "generation_config.json")
    return LoadedModel(
        source, model.config, model, tokenizer, defaults, spec, speech=speech, decoding=decoding
    )


def build_whisper_model(
    config: WhisperConfig,
    features: FeatureSettings,
    dtype: torch.dtype,
    device: torch.device,
    weights: Iterator[tuple[str, torch.Tensor | QuantizedTensor]],
) -> WhisperForConditionalGeneration:
    """A Whisper model on `device` in `dtype`, filled from `weights` (transformers' names, from any
    checkpoint format), built on meta first as `build_model` does."""
    with torch.device("meta"), _skip_random_init():
        model = WhisperForConditionalGeneration(config, features)
        model = model.to(dtype).to_empty(device=device)
    model.tie_weights()  # to_empty unties shared parameters
    model.load_weights((name, tensor.to(device)) for name, tensor in weights)
    return model.eval().requires_grad_(False)


class _PhaseClock:
    """Logs how long each step of a model's load took (`bench.cold_start` reads these lines)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._last = time.perf_counter()

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        logger.info("%s: %s in %.2f s", self.model, what, now - self._last)
        self._last = now


def build_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    rope_freq_factors: torch.Tensor | None,
    weights: Iterator[tuple[str, torch.Tensor | QuantizedTensor]],
    quantized: dict[str, int] | None = None,
) -> LlamaForCausalLM:
    """The model on `device` in `dtype`, filled from `weights`; `quantized` names the checkpoint
    tensors that arrive as `QuantizedTensor`s (their layers allocate no float weight)."""
    model_class = decoder_class(config.architecture)
    with torch.device("meta"), _skip_random_init():
        model = _built_without_rope(model_class)(config)
        model.__class__ = model_class
        if quantized:
            model.expect_quantized(quantized)
        # dtype first, on meta (free), so the real memory is allocated once, in `dtype`
        model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty unties shared parameters
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(rope_freq_factors)  # computed, not loaded: the meta build left it empty
    model.load_weights((name, tensor.to(device)) for name, tensor in weights)  # type: ignore[misc]
    return model.eval().requires_grad_(False)


@functools.cache
def _built_without_rope(model_class: type[LlamaForCausalLM]) -> type[LlamaForCausalLM]:
    """`model_class` as built on `meta`: without its rotary tables, which `build_model` computes on the
    real device afterwards (math on meta tensors runs torch's Python refs, which import torch._dynamo:
    seconds of a cold start). `build_model` gives the result the real class back."""
    return type(f"_Meta{model_class.__name__}", (_NoRopeOnMeta, model_class), {})


class _NoRopeOnMeta:
    def init_rope(self, rope_freq_factors: torch.Tensor | None = None) -> None:
        """Skipped: the model is on `meta` while this class is its class."""


_RANDOM_INITS = frozenset(
    {
        torch.Tensor.normal_,
        torch.Tensor.uniform_,
        torch.Tensor.fill_,
        torch.Tensor.zero_,
        torch.Tensor.random_,
        torch.Tensor.bernoulli_,
        torch.Tensor.exponential_,
        torch.Tensor.geometric_,
        torch.Tensor.log_normal_,
        torch.Tensor.cauchy_,
    }
)


class _skip_random_init(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch.device
    """Build on the meta device without torch's Python refs: skip the in-place initialisers modules
    call in `reset_parameters` (normal_, uniform_, ...), and let `to_empty`'s `empty_like` of a
    contiguous meta tensor be a plain `torch.empty`.

    Both are no-ops in effect: meta tensors hold no data, and every weight is loaded afterwards. But
    meta `normal_` runs through torch's Python refs, whose first call imports torch._dynamo, and
    meta `empty_like` imports sympy: about 3 s of a cold start together, measured.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self", kwargs.get("input")))
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            if func in _RANDOM_INITS or getattr(func, "__module__", None) == "torch.nn.init":
                return tensor
            if func is torch.empty_like and len(args) <= 1 and tensor.is_contiguous() and _plain(kwargs):
                return torch.empty(
                    tensor.shape,
                    dtype=kwargs.get("dtype") or tensor.dtype,
                    device=kwargs.get("device") or tensor.device,
                    requires_grad=bool(kwargs.get("requires_grad", False)),
                )
        return func(*args, **kwargs)


def _plain(kwargs: dict[str, Any]) -> bool:
    """empty_like's keyword arguments we reproduce with `torch.empty` (no layout or memory format)."""
    return set(kwargs) <= {"input", "dtype", "device", "requires_grad"}


def safetensors_weights(
    folder: Path, dtype: torch.dtype, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, converted to `dtype`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    for filename in tqdm(
        files, desc=f"Loading {folder.name}", unit="file", disable=not progress or len(files) < 2
    ):
        with safe_open(str(folder / filename), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, handle.get_tensor(name).to(dtype)


def generation_defaults(path: Path) -> dict[str, Any]:
    """Sampling defaults from a generation_config.json, under sampling-parameter names."""
    config = _read_json(path)
    return {
        ours: config[theirs]
        for theirs, ours in _GENERATION_DEFAULTS.items()
        if config.get(theirs) is not None
    }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
