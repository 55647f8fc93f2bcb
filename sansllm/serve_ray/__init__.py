"""sansllm on Ray Serve (the optional `ray` extra): `serve run sansllm.serve_ray:build_app model=...`.

See `app.py` for the deployments, `router.py` for prefix-cache-aware routing, `options.py` for
the builder's options.
"""

from sansllm.serve_ray.app import build_app, build_app_from_options

__all__ = ["build_app", "build_app_from_options"]
