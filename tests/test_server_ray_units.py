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
