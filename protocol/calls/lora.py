"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter: vLLM's run-time LoRA updates.

The engine reads the adapter (IO stays out of the core); the call waits for its answer, then
updates the base model's list of adapters, which is what routes requests by name. Two rules keep
that list and the engine's in step: an unload leaves the list at once (no new request routes to
an adapter on its way out), and a load whose client goes away before the engine answered is
undone with an `UnloadAdapter`.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from protocol.calls.base import Call, Headers, error_call
from protocol.engine_api import (
    AdapterLoaded,
    AdapterUnloaded,
    Command,
    Event,
    Failed,
    LoadAdapter,
    UnloadAdapter,
)
from protocol.errors import ProtocolError
from protocol.model import ServedModel
from protocol.outputs import Output, Submit, whole_response

TEXT_CONTENT_TYPE: Headers = ((b"content-type", b"text/plain; charset=utf-8"),)


class LoadLoRAAdapterRequest(msgspec.Struct, kw_only=True):
    lora_name: str | None = None
    lora_path: str | None = None
    load_inplace: bool = False  # vLLM: replace an adapter of the same name
    base_model_name: str | None = None  # ours: which served model, when several take adapters


class UnloadLoRAAdapterRequest(msgspec.Struct, kw_only=True):
    lora_name: str | None = None
    lora_int_id: int | None = None  # vLLM's; names suffice here
    base_model_name: str | None = None


class AdapterCall(Call):
    """One load or unload: submit the command, answer once the engine has."""

    def __init__(self, command: LoadAdapter | UnloadAdapter, base: ServedModel, headers: Headers = ()) -> None:
        self.command = command
        self.base = base
        self.model = base.name
        self.headers = headers
        self._done = False

    def start(self) -> list[Output]:
        if isinstance(self.command, UnloadAdapter):
            self.base.lora_modules.pop(self.command.name, None)
        return [Submit((self.command,))]

    def feed(self, events: Sequence[Event]) -> list[Output]:
        for event in events:
            if self._done or event.request_id != self.command.request_id:
                continue
            self._done = True
            name = self.command.name
            if isinstance(event, Failed):
                return list(error_call(ProtocolError(event.message, event.status), self.headers).start())
            if isinstance(event, AdapterLoaded):
                self.base.lora_modules[name] = event.path
                return self._text(f"Success: LoRA adapter '{name}' added successfully.")
            if isinstance(event, AdapterUnloaded):
                return self._text(f"Success: LoRA adapter '{name}' removed successfully.")
        return []

    def disconnected(self) -> list[Command]:
        if self._done:
            return []
        self._done = True
        if isinstance(self.command, LoadAdapter):  # it may load after all: undo it
            return [UnloadAdapter(f"{self.command.request_id}-undo", self.command.name)]
        return []

    @property
    def finished(self) -> bool:
        return self._done

    def _text(self, message: str) -> list[Output]:
        return list(whole_response(200, TEXT_CONTENT_TYPE + self.headers, message.encode()))


def load_adapter_command(
    request: LoadLoRAAdapterRequest, base: ServedModel, request_id: str
) -> LoadAdapter | UnloadAdapter:
    """The engine command a load request asks for; raises `ProtocolError` as vLLM answers."""
    if not request.lora_name or not request.lora_path:
        raise ProtocolError("Both 'lora_name' and 'lora_path' must be provided.", 400, type="InvalidUserInput")
    if request.lora_name in base.lora_modules and not request.load_inplace:
        raise ProtocolError(
            f"The lora adapter '{request.lora_name}' has already been loaded.", 400, type="InvalidUserInput"
        )
    return LoadAdapter(request_id, request.lora_name, request.lora_path, replace=request.load_inplace)


def unload_adapter_command(request: UnloadLoRAAdapterRequest, base: ServedModel, request_id: str) -> UnloadAdapter:
    if not request.lora_name:
        raise ProtocolError(
            "'lora_name' needs to be provided to unload a LoRA adapter.", 400, type="InvalidUserInput"
        )
    if request.lora_name not in base.lora_modules:
        raise ProtocolError(f"The lora adapter '{request.lora_name}' cannot be found.", 404, type="NotFoundError")
    return UnloadAdapter(request_id, request.lora_name)


def lora_base(models: Sequence[ServedModel], base_model_name: str | None) -> ServedModel:
    """The served model a run-time adapter change is for: the named one, else the first taking adapters."""
    candidates = [model for model in models if model.lora_enabled]
    if base_model_name:
        candidates = [model for model in candidates if base_model_name in model.names]
    if not candidates:
        which = f" named {base_model_name!r}" if base_model_name else ""
        raise ProtocolError(
            f"No served model{which} takes LoRA adapters; start the server with --enable-lora.", 400
        )
    return candidates[0]
