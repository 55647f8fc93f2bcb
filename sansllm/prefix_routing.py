"""Prefix-cache-aware replica choice, for serving one model from several replicas (issue 14).

A replica that has served a prompt keeps its prefix in its KV cache (the prefix cache), so the next
request that starts the same way (a shared system prompt, the next turn of a chat) is cheapest
there. The router does not tokenize: it cuts the request's prompt text into fixed-size chunks and
chains their hashes, like the engine's block hashes but over characters, and remembers which
replica last served each chunk chain. A request goes to the replica holding the longest run of its
leading chunks (the deepest chunk it served: each key stands for its whole prefix), unless that replica is busier than the least loaded one by more than `imbalance`
requests; then load wins, as a cache hit is worth less than a queue. Pure: no Ray, no IO, no
clock; the Ray deployment feeds it replica ids and their queue lengths.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CHUNK_CHARS = 256  # ~64 tokens of English: a few KV blocks
DEFAULT_MAX_ENTRIES = 200_000  # chunk chains remembered (~30 MB of keys)


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text a request's prompt starts with, from its JSON body: chat messages (role and text of
    each, in order) or a completion prompt; "" when there is none the router can read."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if not isinstance(message, dict):
                break
            content = message.get("content")
            if isinstance(content, list):  # content parts: their texts
                content = "".join(
                    part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
            parts.append(f"\x00{message.get('role')}\x00{content if isinstance(content, str) else ''}")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else ""


@dataclass
class PrefixAffinity:
    """Which replica to send a request to; remembers where each chunk chain was last served."""

    chunk_chars: int = DEFAULT_CHUNK_CHARS
    imbalance: int = 4  # queued requests a cache hit may cost at most, against the least loaded replica
    max_entries: int = DEFAULT_MAX_ENTRIES
    _owner: OrderedDict[bytes, str] = field(default_factory=OrderedDict)

    def keys(self, text: str) -> list[bytes]:
        """The chained hashes of the text's full chunks (a partial last chunk is not cached either)."""
        keys: list[bytes] = []
        parent = b""
        for start in range(0, len(text) - self.chunk_chars + 1, self.chunk_chars):
            chunk = text[start : start + self.chunk_chars].encode("utf-8", "surrogatepass")
            parent = hashlib.sha256(parent + chunk).digest()
            keys.append(parent)
        return keys

    def prefer(self, keys: Sequence[bytes], loads: Mapping[str, int]) -> str:
        """The replica for a request with these chunk keys, given each live replica's load (queued
        and running requests). Ties go to the first replica in `loads`."""
        if not loads:
            raise ValueError("no replica to route to")
        least = min(loads.values())
        chosen = next(replica for replica, load in loads.items() if load == least)
        # the deepest chunk a live replica served: a chain key stands for its whole prefix
        owner = next((self._owner[key] for key in reversed(keys) if self._owner.get(key) in loads), None)
        if owner is not None and loads[owner] - least <= self.imbalance:
            chosen = owner
        return chosen

    def choose(self, keys: Sequence[bytes], loads: Mapping[str, int]) -> str:
        """`prefer`, remembered: for a caller whose choice is final."""
        chosen = self.prefer(keys, loads)
        self.remember(keys, chosen)
        return chosen

    def remember(self, keys: Sequence[bytes], replica: str) -> None:
        """The request with these keys went to `replica`: its cache now holds that prefix."""
        for key in keys:
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def replicas(self) -> set[str]:
        """The replicas some remembered prefix points at."""
        return set(self._owner.values())

    def forget(self, replica: str) -> None:
        """A replica went away (died, scaled down): its cache went with it."""
        for key in [key for key, owner in self._owner.items() if owner == replica]:
            del self._owner[key]
