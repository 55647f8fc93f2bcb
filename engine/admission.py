"""Admission control shared by the decoder and encoder cores: a queue past its limit is answered at
once with a 503 (the protocol adds `Retry-After`) rather than grown into latency nobody waits for."""

from __future__ import annotations


def over_capacity(
    queued_requests: int,
    queued_tokens: int,
    prompt_tokens: int,
    *,
    max_num_queued_requests: int | None,
    max_num_queued_tokens: int | None,
) -> str | None:
    """Why a new request of `prompt_tokens` is refused, or None when it may join the queue."""
    if max_num_queued_requests is not None and queued_requests >= max_num_queued_requests:
        return (
            f"The server is at capacity: {queued_requests} requests are waiting to be scheduled "
            f"(--max-num-queued-requests {max_num_queued_requests}). Retry shortly."
        )
    if max_num_queued_tokens is not None and queued_tokens + prompt_tokens > max_num_queued_tokens:
        return (
            f"The server is at capacity: {queued_tokens} prompt tokens are waiting to be scheduled and this "
            f"request adds {prompt_tokens} (--max-num-queued-tokens {max_num_queued_tokens}). Retry shortly."
        )
    return None
