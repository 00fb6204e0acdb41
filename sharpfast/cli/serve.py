"""`sharpfast serve`: the guarded pipeline behind HTTP (FastAPI + uvicorn; see sharpfast.server)."""
from __future__ import annotations

import os
import sys
from typing import Any

from ..errors import BadArgument
from . import options
from .common import device_dtype, load_model
from .options import parse_threshold


class ServeCommand:
    name = "serve"

    @staticmethod
    def register(sub: Any) -> None:
        p = sub.add_parser("serve", help="serve a guarded pipeline over HTTP (POST /generate, /metrics, /health)",
                           description="Start an HTTP server (FastAPI + uvicorn) for a pipeline wrapped by "
                                       "sharpfast.guard: POST /generate returns PNG images (base64) with the "
                                       "memorization report; /metrics is Prometheus text; /health. Requests with "
                                       "the same settings are batched into one pipeline call. SIGTERM / Ctrl-C "
                                       "finishes the requests in flight, then exits.")
        options.add(p, "serve", "--model", "--host", "--port", "--metric", "--mitigation", "--threshold", "--no-guard",
                    "--max-batch-size", "--max-wait-ms", "--num-inference-steps", "--guidance-scale",
                    "--calibrate-for", "--engine", "--replicas", "--ray-address",
                    "--gpus-per-replica", "--api-key-file", "--docs", "--max-prompt-chars", "--header-timeout",
                    "--body-timeout", "--max-connections",
                    "--graceful-timeout", "--device", "--dtype")

    @staticmethod
    def run(args: Any) -> int:
        from .. import validate
        from ..errors import MissingDependency
        from ..server.app import create_app, require

        require()
        try:
            import uvicorn
        except ImportError as e:
            raise MissingDependency("sharpfast serve needs uvicorn: pip install 'sharpfast[serve]'") from e
        threshold = parse_threshold(args.threshold)
        if threshold is None:
            raise BadArgument("--threshold none: serve without a guard with --no-guard")
        own: dict = {}
        if args.num_inference_steps is not None:
            own["num_inference_steps"] = validate.integer(args.num_inference_steps, "--num-inference-steps")
        if args.guidance_scale is not None:
            own["guidance_scale"] = validate.finite(args.guidance_scale, "--guidance-scale")
        validate.integer(args.port, "--port", minimum=0)
        extra = [parse_setting(t) for t in args.calibrate_for]
        key = read_api_key(args.api_key_file) if args.api_key_file else None
        if args.engine == "ray":
            return _serve_on_ray(args, threshold, own, extra, key)
        sock, where = _listen(args.host, args.port)  # a port in use fails before the model loads
        device, dtype = device_dtype(args.device, args.dtype)
        pipe = load_model(args.model, device, dtype)
        limits = _limits(pipe, args, key)
        app = create_app(pipe, guarded=not args.no_guard, metric=args.metric, threshold=threshold,
                         mitigation=None if args.mitigation == "none" else args.mitigation,
                         max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                         defaults=own, name=args.model, calibrate_for=extra, limits=limits)
        g = app.state.guard  # its thresholds are resolved at start, never in a request
        what = "unguarded" if g is None else f"guard {args.metric} > {app.state.threshold:.4g} at the default settings"
        print(f"sharpfast serve: {args.model} on {device} ({dtype}), {what}" +
              ("" if g is None else f"; serves {len(g.served_settings())} setting(s)") +
              ("; API key required" if key else ""), file=sys.stderr, flush=True)
        _log_to_stderr()
        print(f"sharpfast serve: listening on {where}", file=sys.stderr, flush=True)
        # SIGTERM / SIGINT: uvicorn stops accepting, waits up to --graceful-timeout for the requests in
        # flight, then the lifespan stops what is left, and the signal is re-raised (exit 143 / 130)
        from ..server.middleware import timed_h11

        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.graceful_timeout,
                                limit_concurrency=limits.max_connections,
                                http=timed_h11(validate.finite(args.header_timeout, "--header-timeout", above=0)))
        _server_class()(config, app.state.batcher, args.graceful_timeout).run(sockets=[sock])
        return 0


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server that says, when the signal comes, what it holds and how long it waits
        (the lifespan's own line comes only after the graceful wait, when the held requests are done)."""

        def __init__(self, config: Any, batcher: Any, graceful: Any) -> None:
            super().__init__(config)
            self.batcher, self.graceful = batcher, graceful

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                import logging
                import signal

                b = self.batcher
                logging.getLogger("sharpfast.server").info(
                    "sharpfast server: %s: %d request(s) held (%d queued, %d in the pipeline call); answering them, "
                    "up to %s", signal.Signals(sig).name, len(b.pending) + b.in_flight, len(b.pending), b.in_flight,
                    "no limit" if self.graceful is None else f"{self.graceful:g} s")
            super().handle_exit(sig, frame)

    return Server


def _serve_on_ray(args: Any, threshold: Any, own, extra, key: Any) -> int:
    """`--engine ray`: the deployment of sharpfast.server.ray_serve on Ray Serve, until SIGTERM / Ctrl-C."""
    import signal
    import threading

    from .. import validate
    from ..server.ray_serve import ExistingAppNotice, is_loopback, ray_app, ray_listeners, require, start_local_ray

    require()
    import ray
    from ray import serve

    replicas = validate.integer(args.replicas, "--replicas")
    gpus = args.gpus_per_replica
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    port = args.port or _free_port(args.host)  # --port 0: the port is chosen here, so it can be printed
    # without --ray-address a new local cluster ("local"), never one a previous session left running
    # (whose Serve app would keep its own http_options)
    if args.ray_address:  # a cluster the operator runs and secures (docs/serving.md)
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    else:  # every Ray listener on loopback, token authentication on
        start_local_ray(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": port})
    import logging

    logging.getLogger("ray.serve").addFilter(ExistingAppNotice())  # (its options were applied: see the class)
    serve.run(ray_app(args.model, device=args.device, dtype=args.dtype, num_replicas=replicas, num_gpus=gpus,
                      metric=args.metric, threshold=threshold,
                      mitigation=None if args.mitigation == "none" else args.mitigation,
                      max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, defaults=own,
                      calibrate_for=extra, guarded=not args.no_guard, api_key=key, docs=_docs(args)),
              name="sharpfast", route_prefix="/")
    print(f"sharpfast serve: {args.model} on Ray Serve, {replicas} replica(s) ({gpus:g} GPU each); listening on "
          f"http://{args.host}:{port}", file=sys.stderr, flush=True)
    own = [(a, p) for a, p, _ in ray_listeners() if p != port] if not args.ray_address else None
    if own == []:  # (psutil missing: nothing listed, so nothing to claim)
        print("sharpfast serve: Ray's listeners not checked (pip install psutil to list them)", file=sys.stderr,
              flush=True)
    elif own:
        wide = sorted({f"{a}:{p}" for a, p in own if not is_loopback(a)})
        print(f"sharpfast serve: Ray's own {len(own)} ports listen on loopback only; token authentication "
              f"{'on' if os.environ.get('RAY_AUTH_MODE', '').lower() == 'token' else 'OFF'}" if not wide else
              f"sharpfast serve: WARNING: Ray listens beyond loopback on {', '.join(wide)}: firewall these ports",
              file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("sharpfast serve: shutting the deployment down", file=sys.stderr, flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


def _limits(pipe: Any, args: Any, key: Any) -> Any:
    from .. import validate
    from ..adapters import ScoreModel
    from ..server.protocol import Limits

    model = ScoreModel(pipe)
    return Limits.for_model(model.default_size(), validate.integer(args.max_batch_size, "--max-batch-size"), model,
                            max_prompt_chars=validate.integer(args.max_prompt_chars, "--max-prompt-chars"),
                            header_timeout=args.header_timeout, api_key=key, docs=_docs(args),
                            body_timeout=validate.finite(args.body_timeout, "--body-timeout", above=0),
                            max_connections=validate.integer(args.max_connections, "--max-connections"))


def _docs(args: Any) -> Any:
    """--docs as Limits.docs: None (auto), True or False."""
    return {"auto": None, "on": True, "off": False}[args.docs]


def _log_to_stderr() -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("sharpfast.server").addHandler(handler)
    logging.getLogger("sharpfast.server").setLevel(logging.INFO)


def _free_port(host: str) -> int:
    """A port free on `host` now (the OS's choice for port 0)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _listen(host: str, port: int) -> tuple:
    """A bound socket and the address it listens on (the chosen port with --port 0)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise BadArgument(f"cannot listen on {host}:{port}: {err.strerror}") from None
    h, p = sock.getsockname()[:2]
    return sock, f"http://{h if family == socket.AF_INET else f'[{h}]'}:{p}"


def parse_setting(text: str) -> dict:
    """A --calibrate-for value: 'HxW' or key=value pairs of the four settings."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if m:
        return {"height": int(m.group(1)), "width": int(m.group(2))}
    kinds = {"num_inference_steps": int, "guidance_scale": float, "height": int, "width": int}
    out: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, eq, v = item.partition("=")
        if not eq or k.strip() not in kinds:
            raise BadArgument(f"--calibrate-for takes HxW or key=value pairs of {', '.join(kinds)}; got {item!r}")
        try:
            out[k.strip()] = kinds[k.strip()](v)
        except ValueError:
            raise BadArgument(f"--calibrate-for: {k.strip()} must be a number, got {v!r}") from None
    if not out:
        raise BadArgument("--calibrate-for is empty")
    return out


def read_api_key(path: str) -> str:
    """The API key in `path` (its first line, surrounding spaces dropped; at least 16 characters)."""
    import os

    from ..errors import MissingInput

    if not os.path.isfile(path):
        raise MissingInput(f"--api-key-file not found: {path}")
    with open(path, encoding="utf-8") as f:
        key = (f.readline() or "").strip()
    if len(key) < 16:
        raise BadArgument(f"the API key in {path} has {len(key)} characters; use at least 16 (e.g. "
                          f"python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path})")
    return key
