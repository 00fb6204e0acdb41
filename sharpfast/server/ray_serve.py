"""The guarded pipeline on Ray Serve: replicas behind one endpoint, replaced by Ray when they die.

    from ray import serve
    import sharpfast.server
    serve.run(sharpfast.server.ray_app("digits", num_replicas=2))   # or mount it in your own app
    # sharpfast serve --model digits --engine ray --replicas 2             # the same from the CLI

Ray Serve is the engine: its proxy routes requests to the replicas, `@serve.batch` gathers a
replica's requests (grouped here by generation settings, as the single-process server does, and
cut to max_batch_size images per pipeline call), its controller health-checks every replica
(`check_health`) and starts a new one for each that died. sharpfast writes no router or scheduler.

Each replica holds one Service (sharpfast.server.service: the pipeline, its guard, limits and
the one error mapping) and serves the same app as `sharpfast serve` (sharpfast.server.router,
built in the replica: Ray's late-bound ingress), so both transports answer a request with the
same status and body; thresholds resolved when the replica starts, for the defaults and
`calibrate_for`; other settings refused with a 400.
GET /metrics on any replica answers for the whole deployment: every replica publishes its
Prometheus series to one named Ray actor after each batch, and the answer is all of them with a
`replica` label (a replaced replica's counters stay, so sums over replicas keep counting).
"""
# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time)
import asyncio
import os
import time
from typing import Any, Optional

from ..errors import BadArgument, MissingDependency
from .batching import batch_key

BOARD = "sharpfast-metrics-board"


def require() -> None:
    """MissingDependency unless the 'ray' extra is installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"the Ray deployment needs the 'ray' extra: pip install 'sharpfast[ray]' ({e})") from e


def start_local_ray(**init_kwargs: Any) -> None:
    """Starts a new single-machine Ray cluster whose own listeners are on loopback only.

    Ray binds its servers (GCS, raylet, workers, agents) to the node's address, which it takes
    from the machine's network interface even when asked for 127.0.0.1; a Ray cluster reachable
    from the network runs code. Here the node's address is loopback (Ray's own switch for
    single-machine clusters, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) and token authentication is
    on (Ray's default for a new local cluster: `RAY_AUTH_MODE` unset becomes `token`; a
    warning when the environment turned it off). Replicas bind their inter-deployment gRPC server there too (see
    `_replica_grpc_on_node_address`). Only the Serve proxy listens where `http_options` say.

    Args:
        **init_kwargs: passed to `ray.init` (not `address`: the cluster is always new).

    Raises:
        MissingDependency: ray[serve] is not installed.
    """
    require()
    import warnings

    import ray
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # (read at import: the module may be loaded already)
    mode = os.environ.get("RAY_AUTH_MODE")  # unset: Ray turns it on for a new local cluster (sets it to "token")
    if mode is not None and mode.lower() != "token":
        warnings.warn(f"RAY_AUTH_MODE={mode}: the local Ray cluster runs without token authentication "
                      "(any local user can submit code to it)", stacklevel=2)
    ray.init(address="local", **init_kwargs)


class ExistingAppNotice:
    """A logging filter for Ray Serve's "Connecting to existing Serve app ... New http_options will
    not be applied": `serve.run` says it whenever `serve.start` came first, as it does in
    `sharpfast serve --engine ray`, where the options it names were applied (the proxy listens on
    the printed port); an operator reads it as its port being ignored. Every other record passes."""

    def filter(self, record: Any) -> bool:
        """False for that notice only."""
        return not str(record.getMessage()).startswith("Connecting to existing Serve app")


def _replica_grpc_on_node_address() -> None:
    """Binds this replica's inter-deployment gRPC server to the node's address when that is loopback.

    Ray Serve binds it to `[::]` (every interface) whatever the node's address; on a node whose
    address is loopback (a cluster from start_local_ray) nothing outside the machine could use it,
    so it listens on loopback instead. Elsewhere nothing changes (a cluster sharpfast joins is the
    operator's to secure: docs/serving.md).
    """
    import ipaddress

    import ray

    try:
        from ray.serve._private import replica as ray_replica
    except ImportError:  # another Ray layout: nothing to pin (the socket test says so)
        return
    ip = ray.util.get_node_ip_address()
    original = getattr(ray_replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "sharpfast_pinned", False) or not ipaddress.ip_address(ip).is_loopback:
        return

    def bind(server: Any, address: str) -> Any:
        host, _, port = address.rpartition(":")
        return original(server, f"{ip}:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    bind.sharpfast_pinned = True  # type: ignore[attr-defined]
    ray_replica.add_port_to_grpc_server = bind


def ray_listeners(pid: Optional[int] = None) -> list:
    """The TCP sockets listening in process `pid` (default: this one) and its descendants.

    Args:
        pid: the root process (the one that started Ray).

    Returns:
        Sorted (address, port, process name) tuples; [] when psutil is not installed.
    """
    try:
        import psutil
    except ImportError:
        return []
    root = psutil.Process(pid or os.getpid())
    procs = [root] + root.children(recursive=True)
    found = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp") if hasattr(p, "net_connections") else p.connections(kind="tcp")
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found.add((str(c.laddr.ip), int(c.laddr.port), name))
    return sorted(found)


def is_loopback(address: str) -> bool:
    """Whether a listening address is loopback only (127.0.0.0/8, ::1, ::ffff:127.x)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def _board() -> Any:
    """The named actor that holds every replica's latest Prometheus text (created on first use)."""
    import ray

    @ray.remote(num_cpus=0)
    class Board:
        def __init__(self) -> None:
            self.texts: dict = {}

        def put(self, replica: str, text: str) -> None:
            self.texts[replica] = text

        def all(self) -> dict:
            return dict(self.texts)

    return Board.options(  # type: ignore[attr-defined]
        name=BOARD, get_if_exists=True, lifetime="detached", namespace="sharpfast").remote()


def merge_metrics(texts: dict) -> str:
    """Prometheus text of several replicas as one exposition: each sample gains a `replica` label
    (HELP / TYPE written once per family)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            f = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                f[2].append((s.name, {**s.labels, "replica": replica}, s.value))
    out = []
    for name, (kind, doc, samples) in families.items():
        head = f"{name}_total" if kind == "counter" else name  # (the text format names counters with _total)
        out += [f"# HELP {head} {doc}", f"# TYPE {head} {kind}"]
        for sname, labels, value in samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            out.append(f"{sname}{{{lab}}} {value!r}")
    return "\n".join(out) + "\n"


def _escape(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def groups_of(bodies: list, max_images: int) -> list:
    """Indices of `bodies` grouped by generation settings, each group at most max_images images."""
    groups: list = []
    open_: dict = {}
    for i, b in enumerate(bodies):
        key, size = batch_key(b), len(b["prompts"]) * b["num_images_per_prompt"]
        g = open_.get(key)
        if g is None or g[1] + size > max_images:
            g = open_[key] = [[], 0]
            groups.append(g[0])
        g[0].append(i)
        g[1] += size
    return groups


def ray_app(model: str, *, device: str = "auto", dtype: str = "auto", num_replicas: int = 2, num_gpus: float = 0,
            num_cpus: float = 1, metric: Optional[str] = None, threshold: Any = "auto", mitigation: Any = "auto",
            max_batch_size: int = 8, max_wait_ms: float = 10.0, defaults: Optional[dict] = None,
            calibrate_for: Optional[list] = None, limits: Any = None, guarded: bool = True,
            api_key: Optional[str] = None, docs: Optional[bool] = None) -> Any:
    """A Ray Serve application of the guarded pipeline (`serve.run(ray_app(...))`).

    Args:
        model: 'digits' or a local diffusers model directory, loaded by every replica.
        device: each replica's torch device ('auto': its GPU when Ray gave it one).
        dtype: 'auto', 'fp32', 'fp16' or 'bf16'.
        num_replicas: replicas (one pipeline each).
        num_gpus: GPUs per replica (0 on CPU machines).
        num_cpus: CPUs Ray reserves per replica.
        metric: the guard's metric (default: the guard's).
        threshold: "auto" or a number.
        mitigation: the guard's mitigation ("auto", a registry name, or None).
        max_batch_size: images per pipeline call (and per request) at most.
        max_wait_ms: how long `@serve.batch` waits for a batch to fill.
        defaults: request defaults (num_inference_steps, guidance_scale, num_images_per_prompt).
        calibrate_for: further settings each replica serves (dicts, as for create_app).
        limits: a sharpfast.server.protocol.Limits (default: scaled to the model).
        guarded: False serves the plain pipeline.
        api_key: the key /generate and /metrics require (`Authorization: Bearer <key>`), or None.
        docs: serve /docs and /redoc, open (None: only without api_key; Limits.docs).

    Returns:
        The bound Ray Serve application.

    Raises:
        MissingDependency: ray[serve] is not installed.
        BadArgument: a bad replica count or size.
    """
    require()
    from .. import validate

    num_replicas = validate.integer(num_replicas, "num_replicas")
    max_batch_size = validate.integer(max_batch_size, "max_batch_size")
    if num_gpus < 0 or num_cpus < 0:
        raise BadArgument("num_gpus and num_cpus must be >= 0")
    cfg = dict(model=model, device=device, dtype=dtype, metric=metric, threshold=threshold, mitigation=mitigation,
               max_batch_size=max_batch_size, defaults=dict(defaults or {}), calibrate_for=list(calibrate_for or []),
               limits=limits, guarded=guarded, api_key=api_key, docs=docs)
    return _deployment(cfg, num_replicas, num_gpus, num_cpus, max_batch_size, max_wait_ms).bind()




def _deployment(cfg: dict, num_replicas: int, num_gpus: float, num_cpus: float, max_batch_size: int,
                max_wait_ms: float) -> Any:
    from ray import serve

    @serve.deployment(num_replicas=num_replicas, ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus},
                      health_check_period_s=2, health_check_timeout_s=30, max_ongoing_requests=4 * max_batch_size,
                      graceful_shutdown_timeout_s=10)
    @serve.ingress()
    class SharpfastReplica:
        def __init__(self) -> None:
            _replica_grpc_on_node_address()  # before Serve starts that server (after this constructor)
            self.replica = RayTransport(cfg)

        def __serve_build_asgi_app__(self) -> Any:
            """The same app as `sharpfast serve` (sharpfast.server.router), over this replica."""
            from .router import build_app

            self.replica.batch = self._batch
            return build_app(self.replica.service, self.replica, title="sharpfast (Ray Serve)")

        def check_health(self) -> None:
            """Ray's health check: the pipeline is loaded and its guard is installed."""
            self.replica.check()

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_ms / 1000.0)
        async def _batch(self, bodies: list) -> list:
            return await self.replica.run(bodies)

    return SharpfastReplica


class RayTransport:
    """What one replica does, apart from Ray's decorators (so it can be tested without Ray):
    requests reach the pipeline through `@serve.batch` (grouped by settings here); /metrics
    answers for the whole deployment."""

    def __init__(self, cfg: dict) -> None:
        from ..loading import device_dtype, load_model
        from .service import Service

        device, dtype = device_dtype(cfg["device"], cfg["dtype"])
        self.service = Service(load_model(cfg["model"], device, dtype), guarded=cfg["guarded"], metric=cfg["metric"],
                               threshold=cfg["threshold"], mitigation=cfg["mitigation"], name=cfg["model"],
                               calibrate_for=cfg["calibrate_for"], defaults=cfg["defaults"], limits=cfg["limits"],
                               max_batch_size=cfg["max_batch_size"], api_key=cfg.get("api_key"),
                               docs=cfg.get("docs"))
        self.max_images = cfg["max_batch_size"]
        self.name = f"{os.uname().nodename}:{os.getpid()}"
        self.started = time.time()
        self.board = _board()
        self.batch: Any = None  # the replica's @serve.batch method

    def check(self) -> None:
        """UsageError when the guard's hook is gone."""
        from ..errors import UsageError

        g = self.service.guard
        if g is not None and not g.installed:
            raise UsageError("the guard's hook is gone")

    async def run(self, bodies: list) -> list:
        """One `@serve.batch`: a pipeline call per settings group; each request its own answer or error."""
        out: list = [None] * len(bodies)
        for group in groups_of(bodies, self.max_images):
            self.service.metrics.observe(requests=len(group), images=sum(
                len(bodies[i]["prompts"]) * bodies[i]["num_images_per_prompt"] for i in group), waits=[])
            try:
                res = await asyncio.to_thread(self.service.runner, [bodies[i] for i in group])
            except Exception as err:  # noqa: BLE001 (the request's own answer, not the replica's death)
                res = [err] * len(group)  # type: ignore[list-item]
            for i, r in zip(group, res):
                out[i] = r
        self.board.put.remote(self.name, self.service.metrics.text())
        return out

    async def submit(self, body: dict, request: Any) -> dict:
        """The body through this replica's batch; its answer (an error raised as it came)."""
        result = await self.batch(body)
        if isinstance(result, BaseException):
            raise result
        return {**result, "replica": self.name}

    def health(self) -> dict:
        """The replica's own fields."""
        return {"status": "ok", "replica": self.name, "up_s": time.time() - self.started}

    async def metrics_text(self) -> str:
        """Every replica's series, merged (this replica's current)."""
        import ray

        texts = await asyncio.to_thread(ray.get, self.board.all.remote())
        texts[self.name] = self.service.metrics.text()
        return merge_metrics(texts)
