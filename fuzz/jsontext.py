"""A tiny JSON writer that can also emit what a strict encoder refuses to.

Fuzz inputs need bytes no ordinary encoder writes: numbers like `1e400`, `NaN` tokens, lone
UTF-16 surrogates escaped as `\\ud800`, raw CESU-8 surrogate bytes, or 10,000 nested brackets.
`json.dumps` can produce some of these but not splice literal text into a document, so values
marked `Raw` are copied verbatim and everything else goes through `json.dumps`.
"""

from __future__ import annotations

import json
from typing import Any


class Raw(str):
    """Literal JSON text, written as-is (may be invalid JSON on purpose)."""

    def __repr__(self) -> str:
        return f"Raw({str.__repr__(self)})"


def _write(value: Any, out: list[str], ascii_only: bool) -> None:
    if isinstance(value, Raw):
        out.append(str(value))
    elif isinstance(value, dict):
        out.append("{")
        for position, (key, item) in enumerate(value.items()):
            if position:
                out.append(",")
            _write(key if isinstance(key, Raw) else str(key), out, ascii_only)
            out.append(":")
            _write(item, out, ascii_only)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for position, item in enumerate(value):
            if position:
                out.append(",")
            _write(item, out, ascii_only)
        out.append("]")
    else:
        # allow_nan: a float NaN/inf becomes the non-standard token, which is a fuzz case too.
        out.append(json.dumps(value, allow_nan=True, ensure_ascii=ascii_only))


def dumps(value: Any, *, ascii_only: bool = True) -> bytes:
    """Serialize `value` to bytes; non-ASCII text is escaped, or written as UTF-8 (surrogates pass through)."""
    parts: list[str] = []
    _write(value, parts, ascii_only)
    text = "".join(parts)
    return text.encode("utf-8", "surrogatepass")
