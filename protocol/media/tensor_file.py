"""Read one tensor from `torch.save` bytes without torch: the format vLLM's `image_embeds` parts carry.

Why not `torch.load`: the protocol core must not import torch, and these bytes come from clients.
A `torch.save` file is a zip holding `data.pkl` (a pickle that rebuilds the tensor from storages)
and one file per storage. Unpickling untrusted data runs whatever it names, so the pickle is read
by an `Unpickler` that resolves only the handful of names a plain tensor needs (the same set
`torch.load(weights_only=True)` starts from); anything else is refused. numpy lays the values out.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

# storage class name -> (numpy dtype of its elements, bytes per element)
_STORAGES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened by hand: numpy has no bfloat16
}
MAX_ELEMENTS = 64 * 1024 * 1024  # 256 MiB of float32: far above any prompt's embeddings


class TensorFileError(ValueError):
    """The bytes are not a `torch.save` file of one plain floating-point tensor."""


@dataclass(frozen=True)
class _Storage:
    kind: str
    key: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise TensorFileError("a tensor must be built from a storage")
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)):
        raise TensorFileError("malformed tensor record")
    if len(size) != len(stride) or not all(isinstance(n, int) and n >= 0 for n in (*size, *stride)):
        raise TensorFileError("malformed tensor shape")
    return _Tensor(storage, offset, size, stride)


class _StorageClass:
    def __init__(self, name: str) -> None:
        self.name = name


class _Unpickler(pickle.Unpickler):
    """Resolves only what a plain tensor's pickle names; persistent ids become storage records."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return _StorageClass(name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise TensorFileError(f"the file names {module}.{name}, which is not part of a plain tensor")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TensorFileError("malformed storage reference")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageClass) or not isinstance(key, str) or not isinstance(numel, int):
            raise TensorFileError("malformed storage reference")
        return _Storage(kind.name, key, numel)


def read_tensor(data: bytes) -> np.ndarray:
    """The tensor in `data` (`torch.save` of one float32/float64/float16/bfloat16 tensor) as float32."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise TensorFileError("not a torch.save file (no data.pkl)")
        root = pickles[0].removesuffix("data.pkl")
        tensor = _Unpickler(io.BytesIO(archive.read(pickles[0]))).load()
        if not isinstance(tensor, _Tensor):
            raise TensorFileError("the file holds something else than one tensor")
        storage = tensor.storage
        if storage.numel > MAX_ELEMENTS:
            raise TensorFileError(f"the tensor is larger than {MAX_ELEMENTS} values")
        raw = archive.read(f"{root}data/{storage.key}")
    except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        if isinstance(exc, TensorFileError):
            raise
        raise TensorFileError("not a readable torch.save file") from None
    except RecursionError:
        raise TensorFileError("not a readable torch.save file") from None
    dtype = _STORAGES[storage.kind]
    if len(raw) != storage.numel * dtype.itemsize:
        raise TensorFileError("the storage's size does not match its record")
    values = np.frombuffer(raw, dtype=dtype)
    if any(n == 0 for n in tensor.size):
        return np.zeros(tensor.size, dtype=np.float32)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride, strict=True))
    if tensor.offset < 0 or last >= storage.numel:
        raise TensorFileError("the tensor reaches outside its storage")
    strided = np.lib.stride_tricks.as_strided(
        values[tensor.offset :],
        shape=tensor.size,
        strides=tuple(s * dtype.itemsize for s in tensor.stride),
        writeable=False,
    )
    if storage.kind == "BFloat16Storage":
        return (strided.astype(np.uint32) << 16).view(np.float32)
    return strided.astype(np.float32)
