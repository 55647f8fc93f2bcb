"""Parsers by name, built-in ones and plugins alike (`--tool-call-parser`, `--reasoning-parser`).

A plugin is a Python file the server executes; it registers its class with the registry's
decorator (vLLM's equivalent is `ToolParserManager.register_module`), after which the name finds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


class Registry(dict[str, Any]):
    """name -> class; `register(name)` is the class decorator, `lookup(name)` the checked read."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what  # e.g. "tool parser", for the error

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: serve the class under `name` (a later registration replaces it)."""

        def register(cls: T) -> T:
            if not cls.name:
                cls.name = name
            self[name] = cls
            return cls

        return register

    def lookup(self, name: str) -> Any:
        """The class registered as `name`; KeyError naming the known ones, for the startup error."""
        try:
            return self[name]
        except KeyError:
            known = ", ".join(sorted(self)) or "none"
            raise KeyError(f"unknown {self.what} {name!r}; known: {known}") from None
