"""Our BERT-family encoder (BERT, RoBERTa, XLM-RoBERTa) in plain torch: embeddings and cross-encoders.

The forward pass takes a flat, padding-free batch: the tokens of several sequences concatenated, their
0-based positions within their sequence, and the sequence lengths. Every projection runs on the [T, hidden]
rows, so no work is spent on padding; only attention, which must see one sequence at a time, regroups
q/k/v per sequence (see `_SequenceLayout`).

Parameter names are ours (flatter than transformers'), and q/k/v are stacked into one matrix (one matmul
instead of three); `load_weights` takes transformers' checkpoint names, with or without the `bert.` /
`roberta.` prefix, and fills our parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.model_config import UnsupportedModelError
from engine.models.llama import Linear

# architecture -> (family, has a sequence-classification head)
ENCODER_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "BertModel": ("bert", False),
    "BertForSequenceClassification": ("bert", True),
    "RobertaModel": ("roberta", False),
    "RobertaForSequenceClassification": ("roberta", True),
    "XLMRobertaModel": ("roberta", False),
    "XLMRobertaForSequenceClassification": ("roberta", True),
}
# model_type -> the base architecture a config without a supported `architectures` entry maps to
BASE_BY_MODEL_TYPE = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}

# transformers' `hidden_act` names -> the function (`gelu` is exact erf GELU; the `_new`, `_fast`,
# `_pytorch_tanh` variants are all the tanh approximation)
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass(frozen=True)
class EncoderConfig:
    """The shape of a BERT-family encoder, read from an HF config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    # added to 0-based positions: RoBERTa / XLM-R number positions from pad_token_id + 1, BERT from 0
    position_offset: int = 0
    num_labels: int = 2
    id2label: dict[int, str] = field(default_factory=dict)
    # transformers' loss choice ("regression", "single_label_classification", "multi_label_classification"),
    # which also decides the classifier's activation (see `engine.pooling.classifier_activation`)
    problem_type: str | None = None
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> EncoderConfig:
        """Build from a parsed HF config.json, refusing what this implementation does not run."""
        architectures = config.get("architectures") or []
        model_type = config.get("model_type", "")
        architecture = next((a for a in architectures if a in ENCODER_ARCHITECTURES), None)
        if architecture is None:  # no architectures, or only heads we do not run (MLM, ...): the encoder
            architecture = BASE_BY_MODEL_TYPE.get(model_type)
        if architecture is None:
            name = ", ".join(architectures) or f"model_type {model_type!r}"
            raise UnsupportedModelError(
                f"architecture {name} is not a supported encoder; "
                f"supported: {', '.join(ENCODER_ARCHITECTURES)}"
            )
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError(
                f"position_embedding_type {config['position_embedding_type']!r} is not supported "
                "(only absolute)"
            )
        hidden_act = config.get("hidden_act", "gelu")
        if hidden_act not in _ACTIVATIONS:
            raise UnsupportedModelError(
                f"hidden_act {hidden_act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}"
            )
        family = ENCODER_ARCHITECTURES[architecture][0]
        pad = config.get("pad_token_id")
        pad = (0 if family == "bert" else 1) if pad is None else int(pad)
        id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
        num_labels = len(id2label) if id2label else int(config.get("num_labels", 2))
        dims = config.get("matryoshka_dimensions")
        return cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            hidden_act=hidden_act,
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            max_position_embeddings=config.get("max_position_embeddings", 512),
            type_vocab_size=config.get("type_vocab_size", 2),
            pad_token_id=pad,
            position_offset=0 if family == "bert" else pad + 1,
            num_labels=num_labels,
            id2label=id2label,
            problem_type=config.get("problem_type"),
            is_matryoshka=bool(config.get("is_matryoshka", False)) or bool(dims),
            matryoshka_dimensions=tuple(int(d) for d in dims) if dims else None,
        )

    @property
    def family(self) -> str:
        """ "bert" or "roberta" (XLM-R is RoBERTa's architecture with another vocabulary)."""
        return ENCODER_ARCHITECTURES[self.architecture][0]

    @property
    def is_classifier(self) -> bool:
        """True for *ForSequenceClassification (cross-encoders): `classify` gives logits."""
        return ENCODER_ARCHITECTURES[self.architecture][1]

    @property
    def max_model_len(self) -> int:
        """The longest sequence the position table can number (RoBERTa's first slots are reserved)."""
        return self.max_position_embeddings - self.position_offset

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Padding (score entries per head, sum over a group of Lmax^2 - L^2) one attention group may carry before a
# new group is cheaper: one more SDPA call costs about what this many wasted entries do (see _SequenceLayout).
_PAD_BUDGET = 4096


class _SequenceLayout:
    """How a flat batch is regrouped for attention, the one step that must keep sequences apart.

    Sequences are sorted by length and cut into groups; each group is padded to its longest member in one
    buffer (q, k and v side by side), and each group is one `scaled_dot_product_attention` call over
    [n, heads, Lg, head_dim] with a key-padding mask. A group grows while its padding stays under
    `_PAD_BUDGET`, so similar lengths share a call and an outlier does not pad everyone.

    Measured per layer (float32, AVX-512; one thread's CPU time, as the 2-core machine was shared and wall
    time was noise), MiniLM's 12 heads of 32, as one padded grid for all / one SDPA call per sequence /
    groups: 32 sequences of 8-60 tokens 7.0 / 5.9 / 4.6 ms; 31 such and one of 250 tokens 80 / 10.3 / 6.8 ms;
    8 sequences of 100-256 tokens 15.0 / 18.4 / 11.0 ms; 64 of 3-12 tokens 2.8 / 4.0 / 2.5 ms (one group).
    One call over all T tokens with a block-diagonal mask was 80 ms at T = 1109 (T^2 work). When all
    sequences have one length there is one group, which is the flat batch itself: nothing is copied.
    """

    def __init__(self, seq_lens: list[int], device: torch.device):
        order = sorted(range(len(seq_lens)), key=lambda i: -seq_lens[i])  # stable: ties keep batch order
        groups: list[list[int]] = [[]]
        waste = 0
        for i in order:
            group = groups[-1]
            extra = seq_lens[group[0]] ** 2 - seq_lens[i] ** 2 if group else 0
            if group and waste + extra > _PAD_BUDGET:
                groups.append([])
                waste, extra = 0, 0
            groups[-1].append(i)
            waste += extra
        self.groups: list[tuple[int, int, int, torch.Tensor | None]] = []  # (first row, n, Lg, key mask)
        base = [0] * len(seq_lens)  # the buffer row where each sequence starts
        self.rows = 0
        for members in groups:
            lens = [seq_lens[i] for i in members]
            longest, mask = lens[0], None
            if lens[-1] != longest:
                valid = torch.arange(longest, device=device) < torch.tensor(lens, device=device)[:, None]
                mask = valid[:, None, None]  # [n, 1, 1, Lg]: True where a key is real
            self.groups.append((self.rows, len(members), longest, mask))
            for j, i in enumerate(members):
                base[i] = self.rows + j * longest
            self.rows += len(members) * longest
        self.index: torch.Tensor | None = None  # token -> its buffer row; None: the buffer is the batch
        if self.rows != sum(seq_lens) or order != sorted(order):
            lens_t = torch.tensor(seq_lens, device=device)
            shift = torch.tensor(base, device=device) - (lens_t.cumsum(0) - lens_t)  # buffer row - batch row
            self.index = torch.arange(sum(seq_lens), device=device) + shift.repeat_interleave(lens_t)

    def attend(self, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        """qkv [T, 3 * hidden] (q, k, v side by side) -> [T, hidden]: each token attends to all of its own
        sequence and nothing else."""
        width = qkv.shape[1] // 3
        buffer = qkv
        if self.index is not None:
            buffer = qkv.new_zeros(self.rows, qkv.shape[1])
            buffer[self.index] = qkv
        outs = []
        for first, n, length, mask in self.groups:
            group = buffer[first : first + n * length].view(n, length, 3, num_heads, width // num_heads)
            q, k, v = group.permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            outs.append(out.transpose(1, 2).reshape(n * length, width))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out if self.index is None else out[self.index]


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        self.act = _ACTIVATIONS[config.hidden_act]
        self.qkv = Linear(hidden, 3 * hidden, bias=True)
        self.attn_out = Linear(hidden, hidden, bias=True)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up = Linear(hidden, config.intermediate_size, bias=True)
        self.down = Linear(config.intermediate_size, hidden, bias=True)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, layout: _SequenceLayout) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_out(layout.attend(self.qkv(x), self.num_heads)))
        return self.mlp_norm(x + self.down(self.act(self.up(x))))


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm (transformers' names, loaded as they are)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class BertModel(nn.Module):
    """The encoder of BERT, RoBERTa and XLM-R: `forward` gives the last hidden states of a flat batch."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        seq_lens: list[int],
    ) -> torch.Tensor:
        """input_ids, positions (0-based within each sequence), token_type_ids (None: all 0): [T];
        `seq_lens` the lengths of the concatenated sequences (summing to T) -> hidden states [T, hidden].

        A sequence longer than `config.max_model_len` has no position embeddings and is refused.
        """
        if sum(seq_lens) != input_ids.shape[0] or not seq_lens or min(seq_lens) < 1:
            raise ValueError(f"seq_lens {seq_lens} do not split {input_ids.shape[0]} tokens into sequences")
        if max(seq_lens) > self.config.max_model_len:
            raise ValueError(
                f"a sequence of {max(seq_lens)} tokens is longer than this model's "
                f"{self.config.max_model_len}"
            )
        emb = self.embeddings
        x = emb.word_embeddings(input_ids) + emb.position_embeddings(positions + self.config.position_offset)
        if token_type_ids is None:
            x = x + emb.token_type_embeddings.weight[0]
        else:
            x = x + emb.token_type_embeddings(token_type_ids)
        x = emb.LayerNorm(x)
        layout = _SequenceLayout(seq_lens, input_ids.device)
        for layer in self.layers:
            x = layer(x, layout)
        return x

    def pack_weights(self, storage: torch.dtype | None = None) -> None:
        """Give every projection the device's faster weight layout (`kernels.pack_linear_weight`).

        For serving, after loading: the plain weights are freed, so a packed model cannot load weights again.
        float32 weights are packed too: an encoder step is hundreds of rows, where that pays.
        `storage` is ignored: embeddings and scores keep float32 weights (see `resolve_dtype`).
        """
        del storage
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack(keep_weight=False, float32=True)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (transformers names) into our parameters; every one must be filled.

        Tensors of heads this model does not run (a masked-LM head, BERT's pooler in an embedding model)
        and position/token-type id buffers are skipped; any other unknown name is an error, so a checkpoint
        of another layout cannot load silently half-filled.
        """
        params = dict(self.named_parameters())
        missing = {(name, i) for name in params for i in range(3 if ".qkv." in name else 1)}
        for name, tensor in weights:
            target = self._our_name(name)
            if target is None:
                continue
            target, part = target
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            dest = params[target].data
            if ".qkv." in target:
                size = dest.shape[0] // 3
                dest = dest[part * size : (part + 1) * size]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            missing.discard((target, part))
        if missing:
            names = sorted(f"{name}[{'qkv'[i]}]" if ".qkv." in name else name for name, i in missing)
            raise ValueError(
                f"checkpoint lacks tensors for {self.config.architecture}: {', '.join(names[:8])}"
                + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            )

    # heads of other architectures that a checkpoint may carry next to the encoder
    _SKIPPED_HEADS: tuple[str, ...] = ("cls.", "lm_head.", "qa_outputs.", "classifier.", "pooler.")

    def _our_name(self, name: str) -> tuple[str, int] | None:
        """Checkpoint name -> (our parameter name, q/k/v part), or None for a tensor we skip."""
        name = re.sub(r"^(bert|roberta)\.", "", name)
        if name.endswith(("position_ids", "token_type_ids")):  # buffers some checkpoints persist
            return None
        name = re.sub(
            r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        )
        if (mapped := self._head_name(name)) is not None:
            return mapped
        if name.startswith(self._SKIPPED_HEADS):
            return None
        match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
        if match is None:
            return name, 0
        layer, module, kind = match.groups()
        if module in _QKV:
            return f"layers.{layer}.qkv.{kind}", _QKV[module]
        return f"layers.{layer}.{_LAYER_MODULES.get(module, module)}.{kind}", 0

    def _head_name(self, name: str) -> tuple[str, int] | None:
        """The base encoder has no head; `BertForSequenceClassification` maps its own."""
        return None


_QKV = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2}
_LAYER_MODULES = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up",
    "output.dense": "down",
    "output.LayerNorm": "mlp_norm",
}
# the classification head, per family: checkpoint module -> ours. BERT's pooler (dense + tanh on [CLS])
# followed by its classifier is the same computation as RoBERTa's head (dense + tanh + out_proj on <s>).
_HEADS = {
    "bert": {"pooler.dense": "head_dense", "classifier": "head_out"},
    "roberta": {"classifier.dense": "head_dense", "classifier.out_proj": "head_out"},
}


class BertForSequenceClassification(BertModel):
    """The encoder plus transformers' sequence-classification head (cross-encoders, rerankers):
    logits = out(tanh(dense(first token))), with the first token [CLS] / <s>."""

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.head_dense = Linear(config.hidden_size, config.hidden_size, bias=True)
        self.head_out = Linear(config.hidden_size, config.num_labels, bias=True)

    def classify(self, hidden: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """hidden [T, hidden] from `forward` -> float32 logits [B, num_labels], one row per sequence."""
        starts = torch.tensor([0, *seq_lens[:-1]], device=hidden.device).cumsum(0)
        return self.head_out(torch.tanh(self.head_dense(hidden[starts]))).float()

    def _head_name(self, name: str) -> tuple[str, int] | None:
        match = re.fullmatch(r"(.+)\.(weight|bias)", name)
        if match is None or match[1] not in _HEADS[self.config.family]:
            return None
        return f"{_HEADS[self.config.family][match[1]]}.{match[2]}", 0


def build_encoder(
    config: EncoderConfig,
    dtype: torch.dtype,
    device: torch.device,
    weights: Iterable[tuple[str, torch.Tensor]],
) -> BertModel:
    """Build the model `config.architecture` names (on `meta`, so nothing is initialised twice), fill it from
    `weights` (checkpoint names and tensors, e.g. `engine.loader.safetensors_weights`) and return it in
    eval mode without gradients."""
    cls = BertForSequenceClassification if config.is_classifier else BertModel
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=device).to(dtype)
    model.load_weights((name, tensor.to(device=device, dtype=dtype)) for name, tensor in weights)
    return model.eval().requires_grad_(False)
