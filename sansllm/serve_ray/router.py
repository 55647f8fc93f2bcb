"""Ray Serve request router that sends a request to the engine replica holding its prompt prefix.

The ingress puts the prompt's chunk keys on each `ForwardedRequest` (hashing happens there, in
parallel, not in the router's loop); this router asks `PrefixAffinity` which replica served the
deepest of those chunks and ranks that replica first, the others by their queue length after it,
so Ray falls back to them when the preferred one is full. The affinity remembers where requests
actually went (`on_request_routed`), not where they were hoped to go, and forgets replicas that
died. Requests without keys (GETs, prompts shorter than a chunk) go to the less loaded of two
replicas picked at random, as with Ray's default router.

Each process holding a handle to the engines (each ingress replica) runs its own router and
learns on its own; with one ingress, the usual set-up, that is the whole picture.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from sansllm.prefix_routing import DEFAULT_CHUNK_CHARS, PrefixAffinity
from sansllm.serve_ray.forwarding import ForwardedRequest
from sansllm.serve_ray.options import DEFAULT_IMBALANCE


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Prefix-cache affinity within a load bound; least loaded otherwise."""

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, chunk_chars: int = DEFAULT_CHUNK_CHARS, **_: Any) -> None:
        self.affinity = PrefixAffinity(chunk_chars=chunk_chars, imbalance=imbalance)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        keys = _prefix_keys(pending_request)
        if not keys:  # nothing to be near: Ray's power of two choices (the less loaded of two at random)
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))  # ties broken at random
        loads = {replica.replica_id.unique_id: self._load(replica) for replica in shuffled}
        by_load = sorted(shuffled, key=lambda replica: loads[replica.replica_id.unique_id])
        preferred = self.affinity.prefer(keys, loads)
        first = next(replica for replica in candidate_replicas if replica.replica_id.unique_id == preferred)
        return [[first], *([replica] for replica in by_load if replica is not first)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        keys = _prefix_keys(pending_request)
        if keys:
            self.affinity.remember(keys, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.affinity.forget(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {replica.replica_id.unique_id for replica in replicas}
        for gone in self.affinity.replicas() - live:  # scaled down or replaced: its cache is gone
            self.affinity.forget(gone)

    def _load(self, replica: RunningReplica) -> int:
        """Requests queued and running there, as Ray last learnt (0 when it has not asked yet)."""
        return self.replica_queue_len_cache.get(replica.replica_id) or 0


def _prefix_keys(pending_request: PendingRequest | None) -> list[bytes]:
    if pending_request is None:
        return []
    for arg in pending_request.args:
        if isinstance(arg, ForwardedRequest):
            return arg.prefix_keys
    return []
