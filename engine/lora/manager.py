"""Adapters served beside their base model: registered by name, kept in memory, placed in slots.

Three tiers, as vLLM's `--max-loras` / `--max-cpu-loras`: every registered adapter has a name and a
folder; at most `max_cpu_loras` of them keep their weights in memory (least recently used first out,
read again from the folder when next needed); at most `max_loras` sit in the slots the batched
kernel reads (`kernels.lora_add`), which is how many different adapters one step can run. The
scheduler keeps the running sequences within `max_loras` adapters (engine.scheduler).

Each adapted projection of the model gets a `LoRALayer` with one `A` [slots, R, in] and `B`
[slots, out, R] stack. Stacked projections (q/k/v, gate/up) stack their adapters block-diagonally:
slice i's A rows at [i*r, (i+1)*r) and its B at those columns of its own output rows, zeros
elsewhere, so one shrink and one expand serve the whole stacked matmul.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

import kernels
from engine.lora.adapter import AdapterError, LoRAAdapter, load_peft_adapter, projection_shapes
from engine.model_config import ModelConfig

logger = logging.getLogger(__name__)

_SLICES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class StepAdapters:
    """Which rows of this step's flat batch use which slot (`kernels.lora_add`'s grouping); None: none."""

    token_indices: torch.Tensor | None = None
    slot_offsets: torch.Tensor | None = None


class LoRALayer:
    """The adapter stacks of one projection; `add_to` adds this step's deltas to its output."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, step: StepAdapters) -> None:
        self.a, self.b, self.step = a, b, step

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> None:
        step = self.step
        if step.token_indices is None:
            return
        kernels.lora_add(
            out.reshape(-1, out.shape[-1]),
            x.reshape(-1, x.shape[-1]),
            self.a,
            self.b,
            step.token_indices,
            step.slot_offsets,
        )


@dataclass(frozen=True)
class Registration:
    uid: int  # a new one per load: prefix-cache keys and slots never mix two loads of one name
    path: str


class LoRAManager:
    """The adapters of one model (see the module docstring for the tiers)."""

    def __init__(
        self, model: nn.Module, config: ModelConfig, *, max_loras: int, max_rank: int, max_cpu_loras: int | None
    ) -> None:
        if max_loras < 1 or max_rank < 1:
            raise ValueError("--max-loras and --max-lora-rank must be at least 1")
        self.config = config
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.registered: dict[str, Registration] = {}
        self._uids = itertools.count(1)
        self._memory: OrderedDict[int, LoRAAdapter] = OrderedDict()  # uid -> weights, least recent first
        self._slots: list[int | None] = [None] * max_loras  # uid in each slot
        self._slot_use: OrderedDict[int, None] = OrderedDict((s, None) for s in range(max_loras))  # LRU order
        self.step = StepAdapters()
        param = next(model.parameters())
        dtype, device = param.dtype, param.device
        self.layers: dict[tuple[int, str], LoRALayer] = {}
        shapes = projection_shapes(config)
        for index, layer in enumerate(model.model.layers):
            for parent in (layer.self_attn, layer.mlp):
                for name, linear in parent.named_children():
                    if name not in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                        continue
                    parts = _SLICES.get(name, (name,))
                    fan_in = shapes[parts[0]][0]
                    fan_out = sum(shapes[part][1] for part in parts)
                    rows = len(parts) * max_rank
                    a = torch.zeros(max_loras, rows, fan_in, dtype=dtype, device=device)
                    b = torch.zeros(max_loras, fan_out, rows, dtype=dtype, device=device)
                    linear.lora = self.layers[index, name] = LoRALayer(a, b, self.step)

    # ---- registry ----

    def register(self, name: str, path: str, *, replace: bool = False) -> LoRAAdapter:
        """Load and check the adapter now (`AdapterError` if it cannot be served) and serve it as
        `name`; `replace`: in place of an adapter of that name (requests running it finish with it)."""
        if name in self.registered and not replace:
            raise AdapterError(f"The lora adapter '{name}' has already been loaded.")
        adapter = load_peft_adapter(name, path, self.config, self.max_rank)
        self.unregister(name)
        uid = next(self._uids)
        self.registered[name] = Registration(uid, adapter.path)
        self._remember(uid, adapter)
        logger.info("LoRA adapter %r (rank %d, %d projections) loaded from %s", name, adapter.rank, len(adapter.weights), adapter.path)
        return adapter

    def adopt(self, old: LoRAManager) -> None:
        """Serve what `old` served (a core rebuilt after a fault): names and ids; weights come back
        from memory as they are needed."""
        self.registered = dict(old.registered)
        self._uids = old._uids
        self._memory = old._memory

    def unregister(self, name: str) -> bool:
        """Stop serving `name` (requests already running keep their slot until they finish)."""
        registration = self.registered.pop(name, None)
        if registration is None:
            return False
        self._memory.pop(registration.uid, None)
        return True

    def uid_of(self, name: str) -> int | None:
        registration = self.registered.get(name)
        return None if registration is None else registration.uid

    # ---- one step ----

    def begin_step(self, adapters: Sequence[int | None], lengths: Sequence[int]) -> None:
        """Rows of a step: span i has `lengths[i]` tokens and runs adapter uid `adapters[i]` (None:
        the base model). Puts the adapters in slots and groups the rows by slot for the kernel."""
        rows_by_uid: dict[int, list[int]] = {}
        start = 0
        for uid, length in zip(adapters, lengths, strict=True):
            if uid is not None:
                rows_by_uid.setdefault(uid, []).extend(range(start, start + length))
            start += length
        if not rows_by_uid:
            self.end_step()
            return
        if len(rows_by_uid) > self.max_loras:
            raise RuntimeError(f"{len(rows_by_uid)} adapters in one step, above --max-loras {self.max_loras}")
        slot_of = self._place(list(rows_by_uid))
        indices: list[int] = []
        offsets = [0]
        for slot in range(self.max_loras):
            for uid, rows in rows_by_uid.items():
                if slot_of[uid] == slot:
                    indices.extend(rows)
            offsets.append(len(indices))
        device = next(iter(self.layers.values())).a.device
        self.step.token_indices = torch.tensor(indices, dtype=torch.int64, device=device)
        self.step.slot_offsets = torch.tensor(offsets, dtype=torch.int64, device=device)

    def end_step(self) -> None:
        self.step.token_indices = self.step.slot_offsets = None

    def _place(self, uids: list[int]) -> dict[int, int]:
        """A slot for each of `uids`: where it already is, else the least recently used slot not
        needed by this step (its weights written in)."""
        slot_of = {uid: self._slots.index(uid) for uid in uids if uid in self._slots}
        for uid in uids:
            if uid not in slot_of:
                slot = next(s for s in self._slot_use if self._slots[s] not in slot_of)
                self._write(slot, self._weights(uid))
                self._slots[slot] = uid
                slot_of[uid] = slot
        for slot in slot_of.values():
            self._slot_use.move_to_end(slot)
        return slot_of

    def _weights(self, uid: int) -> LoRAAdapter:
        adapter = self._memory.get(uid)
        if adapter is not None:
            self._memory.move_to_end(uid)
            return adapter
        name, registration = next(((n, r) for n, r in self.registered.items() if r.uid == uid), (None, None))
        if registration is None or name is None:
            raise AdapterError(f"LoRA adapter #{uid} was unloaded")
        logger.info("LoRA adapter %r: reading it again from %s", name, registration.path)
        adapter = load_peft_adapter(name, registration.path, self.config, self.max_rank)
        self._remember(uid, adapter)
        return adapter

    def _remember(self, uid: int, adapter: LoRAAdapter) -> None:
        self._memory[uid] = adapter
        self._memory.move_to_end(uid)
        while len(self._memory) > self.max_cpu_loras:
            self._memory.popitem(last=False)

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy `adapter` into `slot` of every layer's stacks (zeros where it adapts nothing)."""
        shapes = projection_shapes(self.config)
        r, rank = self.max_rank, adapter.rank
        for (index, name), layer in self.layers.items():
            layer.a[slot].zero_()
            layer.b[slot].zero_()
            row = 0
            for part, module in enumerate(_SLICES.get(name, (name,))):
                out = shapes[module][1]
                weights = adapter.weights.get((index, module))
                if weights is not None:
                    a, b = weights
                    layer.a[slot, part * r : part * r + rank] = a.to(layer.a.dtype)
                    layer.b[slot, row : row + out, part * r : part * r + rank] = b.to(layer.b.dtype)
                row += out
