"""sansllm on Ray Serve (the optional `ray` extra): `serve run sansllm.serve_ray:build_app model=...`.

`app.py` holds the deployments, `router.py` the prefix-cache-aware request router, `options.py`
the builder's options, `forwarding.py` how a request travels from the ingress to a replica, and
`metrics_export.py` the copy of each replica's metrics into Ray's. Only `app.py` and `router.py`
import Ray, and only when used: the rest is tested without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def build_app(args: Mapping[str, Any] | None = None) -> Any:
    """The Ray Serve application (`serve run sansllm.serve_ray:build_app key=value ...`); the keys
    are `sansllm.serve_ray.options.RayAppOptions`' fields."""
    from sansllm.serve_ray.app import build_app as build

    return build(args)
