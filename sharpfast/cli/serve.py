"""`sharpfast serve`: the guarded pipeline behind HTTP (FastAPI + uvicorn; see sharpfast.server)."""
from __future__ import annotations

import sys

from ..errors import BadArgument
from .common import add_device_args, device_dtype, load_model, parse_threshold


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
        p.add_argument("--model", required=True, help="'digits' (bundled) or a local diffusers model directory")
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
        p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
        from ..mitigations import REGISTRY
        from ..serving import DEFAULT_METRIC

        p.add_argument("--metric", default=DEFAULT_METRIC,
                       help=f"the guard's metric (default {DEFAULT_METRIC}: one extra CFG call at step 1)")
        p.add_argument("--mitigation", default="auto",
                       help=f"the guard's mitigation: auto (default), none, or one of {', '.join(REGISTRY)}")
        p.add_argument("--threshold", default="auto", help="flag above this score; auto (default) = the model's "
                       "calibration (beside it, cached, or made once on built-in captions)")
        p.add_argument("--no-guard", action="store_true", help="serve the plain pipeline (a baseline for load tests)")
        p.add_argument("--max-batch-size", type=int, default=8, help="images per pipeline call at most (default 8)")
        p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch may wait to fill (default 10)")
        p.add_argument("--steps", type=int, default=None,
                       help="default num_inference_steps of a request (default: the pipeline's own, 50 for SD)")
        p.add_argument("--graceful-timeout", type=float, default=300.0,
                       help="seconds to wait for requests in flight at shutdown (default 300)")
        add_device_args(p)

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
        steps = None if args.steps is None else validate.integer(args.steps, "--steps")
        validate.integer(args.port, "--port", minimum=0)
        device, dtype = device_dtype(args.device, args.dtype)
        pipe = load_model(args.model, device, dtype)
        app = create_app(pipe, guarded=not args.no_guard, metric=args.metric, threshold=threshold,
                         mitigation=None if args.mitigation == "none" else args.mitigation,
                         max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                         defaults={} if steps is None else {"num_inference_steps": steps}, name=args.model)
        print(
            f"sharpfast serve: {args.model} on {device} ({dtype}), "
            "unguarded" if args.no_guard else
            f"guard {args.metric} > {app.state.guard.threshold:.4g} ({app.state.guard.threshold_source})",
            file=sys.stderr,
            flush=True,
        )
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("sharpfast.server").addHandler(handler)
        logging.getLogger("sharpfast.server").setLevel(logging.INFO)
        # SIGTERM / SIGINT: uvicorn stops accepting, waits for the requests in flight (the lifespan
        # then drains the queue), and re-raises the signal, so a process manager sees exit 143 / 130
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                timeout_graceful_shutdown=args.graceful_timeout)
        server = uvicorn.Server(config)
        server.run()
        return 0

