"""`sharpfast serve`: the guarded pipeline behind HTTP (FastAPI + uvicorn; see sharpfast.server)."""
from __future__ import annotations

import sys

from ..errors import BadArgument
from . import options
from .common import device_dtype, load_model
from .options import parse_threshold


class ServeCommand:
    name = "serve"

    @staticmethod
    def register(sub) -> None:
        p = sub.add_parser("serve", help="serve a guarded pipeline over HTTP (POST /generate, /metrics, /health)",
                           description="Start an HTTP server (FastAPI + uvicorn) for a pipeline wrapped by "
                                       "sharpfast.guard: POST /generate returns PNG images (base64) with the "
                                       "memorization report; /metrics is Prometheus text; /health. Requests with "
                                       "the same settings are batched into one pipeline call. SIGTERM / Ctrl-C "
                                       "finishes the requests in flight, then exits.")
        options.add(p, "serve", "--model", "--host", "--port", "--metric", "--mitigation", "--threshold", "--no-guard",
                    "--max-batch-size", "--max-wait-ms", "--num-inference-steps", "--guidance-scale",
                    "--graceful-timeout", "--device", "--dtype")

    @staticmethod
    def run(args) -> int:
        from .. import validate
        from ..errors import MissingDependency
        from ..server import _require, create_app

        _require()
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
        device, dtype = device_dtype(args.device, args.dtype)
        pipe = load_model(args.model, device, dtype)
        app = create_app(pipe, guarded=not args.no_guard, metric=args.metric, threshold=threshold,
                         mitigation=None if args.mitigation == "none" else args.mitigation,
                         max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                         defaults=own, name=args.model)
        g = app.state.guard  # its threshold is resolved here, at start, not in the first request
        what = "unguarded" if g is None else f"guard {args.metric} > {g.threshold:.4g} ({g.threshold_source})"
        print(f"sharpfast serve: {args.model} on {device} ({dtype}), {what}", file=sys.stderr, flush=True)
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("sharpfast.server").addHandler(handler)
        logging.getLogger("sharpfast.server").setLevel(logging.INFO)
        # SIGTERM / SIGINT: uvicorn stops accepting, waits for the requests in flight (the lifespan
        # then drains the queue), and re-raises the signal, so a process manager sees exit 143 / 130
        import socket

        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as err:
            sock.close()
            raise BadArgument(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
        host, port = sock.getsockname()[:2]
        print(f"sharpfast serve: listening on http://{host if family == socket.AF_INET else f'[{host}]'}:{port}",
              file=sys.stderr, flush=True)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.graceful_timeout)
        uvicorn.Server(config).run(sockets=[sock])
        return 0
