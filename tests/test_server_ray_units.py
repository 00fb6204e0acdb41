"""The Ray deployment's own logic without Ray: batches grouped by settings and cut to the image
cap; the deployment's /metrics as one exposition of every replica's series."""
import pytest

pytest.importorskip("prometheus_client")

from sharpfast.server.ray_serve import groups_of as _groups
from sharpfast.server.ray_serve import merge_metrics  # noqa: E402


def body(n=1, steps=5, prompts=1):
    return {"prompts": ["p"] * prompts, "num_images_per_prompt": n, "num_inference_steps": steps,
            "guidance_scale": 7.5, "height": None, "width": None}


def test_batches_are_grouped_by_settings_and_capped():
    bodies = [body(), body(steps=9), body(prompts=3), body(), body(steps=9), body(n=2)]
    groups = _groups(bodies, max_images=4)
    assert sorted(i for g in groups for i in g) == list(range(len(bodies)))  # each request once
    for g in groups:
        keys = {(bodies[i]["num_inference_steps"], bodies[i]["num_images_per_prompt"]) for i in g}
        assert len(keys) == 1, g
        assert sum(len(bodies[i]["prompts"]) * bodies[i]["num_images_per_prompt"] for i in g) <= 4 or len(g) == 1
    assert [0, 2] in groups and [3] in groups  # 1 + 3 images fill a call; the next one opens another


def test_metrics_of_replicas_merge_into_one_exposition():
    from prometheus_client import CollectorRegistry, Counter, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    texts = {}
    for name, v in (("a:1", 3), ("b:2", 5)):
        reg = CollectorRegistry()
        c = Counter("sharpfast_calls", "guarded pipeline calls", ["guard"], registry=reg)
        c.labels("digits").inc(v)
        texts[name] = generate_latest(reg).decode()
    merged = merge_metrics(texts)
    fams = {f.name: f for f in text_string_to_metric_families(merged)}
    totals = {s.labels["replica"]: s.value for s in fams["sharpfast_calls"].samples if s.name.endswith("_total")}
    assert totals == {"a:1": 3.0, "b:2": 5.0}
    assert merged.count("# TYPE sharpfast_calls_total counter") == 1


def test_serve_on_ray_with_port_0_prints_the_port_it_binds(monkeypatch, capsys):
    """Issue 33, item 3: --port 0 picks a free port and prints it (it printed ':0'), and without
    --ray-address a new local cluster is started (address 'local'), never a previous session's.
    Ray is replaced by a recorder: what matters is what sharpfast asks of it."""
    import argparse
    import sys
    import types

    from sharpfast.cli import serve as serve_cli

    calls = {}
    fake_ray = types.ModuleType("ray")
    fake_ray.init = lambda **kw: calls.setdefault("init", kw)
    fake_ray.shutdown = lambda: None
    fake_serve = types.ModuleType("ray.serve")
    fake_serve.start = lambda **kw: calls.setdefault("start", kw)
    fake_serve.run = lambda *a, **kw: None
    fake_serve.shutdown = lambda: None
    fake_ray.serve = fake_serve
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "ray.serve", fake_serve)
    monkeypatch.setattr("sharpfast.server.ray_serve.ray_app", lambda *a, **kw: None)
    # a new local cluster: start_local_ray (its loopback binding is tested on a real cluster, test_ray.py)
    monkeypatch.setattr("sharpfast.server.ray_serve.start_local_ray", lambda **kw: calls.setdefault(
        "init", {"address": "local", **kw}))
    monkeypatch.setattr("sharpfast.server.ray_serve.ray_listeners", lambda pid=None: [("127.0.0.1", 1, "raylet")])
    monkeypatch.setattr("threading.Event.wait", lambda self, *a: True)
    args = argparse.Namespace(replicas=1, gpus_per_replica=0.0, ray_address=None, host="127.0.0.1", port=0,
                              model="digits", device="cpu", dtype="fp32", metric="wen_low", mitigation="auto",
                              max_batch_size=4, max_wait_ms=10.0, no_guard=False, docs="auto")
    assert serve_cli._serve_on_ray(args, "auto", {}, [], None) == 0
    port = calls["start"]["http_options"]["port"]
    assert calls["init"]["address"] == "local" and port > 0
    assert f"listening on http://127.0.0.1:{port}" in capsys.readouterr().err


def test_the_existing_serve_app_notice_is_dropped_and_nothing_else():
    """Issue 33, item 3: after serve.start(http_options=...), serve.run logs "Connecting to existing
    Serve app ... New http_options will not be applied" although they were; the CLI drops that
    record only."""
    import logging

    from sharpfast.server.ray_serve import ExistingAppNotice

    def rec(msg):
        return logging.LogRecord("ray.serve", logging.INFO, __file__, 1, msg, None, None)

    f = ExistingAppNotice()
    assert not f.filter(rec('Connecting to existing Serve app in namespace "serve". New http_options/'
                            'controller_options will not be applied.'))
    assert f.filter(rec("Application 'sharpfast' is ready at http://127.0.0.1:8000/."))
    assert f.filter(rec("Connecting to the cluster"))
