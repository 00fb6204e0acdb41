"""The HTTP server, in the shape of vLLM's entrypoints: the protocol (protocol.py: limits and the
request / response models), the serving core that knows nothing of transports (service.py:
parse, the served-setting check, the pipeline call, the one error -> status mapping), one
router (router.py: /generate, /health, /metrics), and two thin transports: uvicorn with a
batcher (app.py, batching.py, middleware.py; `create_app`) and Ray Serve (ray_serve.py; `ray_app`)."""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ray_app":
        from .ray_serve import ray_app

        return ray_app
    raise AttributeError(f"module 'sharpfast.server' has no attribute {name!r}")


__all__ = ["create_app", "ray_app"]
