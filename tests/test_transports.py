"""The two transports answer alike: the same request through the uvicorn transport (its batcher)
and through the Ray Serve transport (its replica's batch, without Ray) gets the same status and
body for every error class, a refused body, a schema error and a success; a 500 names an
incident, never the exception's text."""
import asyncio
import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from sharpfast.errors import (  # noqa: E402
    BadArgument,
    NonFiniteOutput,
    NotCalibrated,
    OutputMismatch,
    SharpfastError,
    UnsupportedPipeline,
    UsageError,
)
from sharpfast.server.app import UvicornTransport  # noqa: E402
from sharpfast.server.ray_serve import RayTransport  # noqa: E402
from sharpfast.server.router import build_app  # noqa: E402
from sharpfast.server.service import Service, Stopped  # noqa: E402
from sharpfast.testing import tiny_pipeline  # noqa: E402

# every class of failure a request can end with, and the status the one mapping gives it
OUTCOMES = [(BadArgument("guidance_scale must be finite"), 422), (NotCalibrated("no threshold at 7 steps"), 422),
            (UnsupportedPipeline("not for this family"), 422), (NonFiniteOutput("NaN at step 3"), 422),
            (OutputMismatch("other settings"), 422), (SharpfastError("a sharpfast error"), 422),
            (UsageError("the server is shutting down"), 503), (Stopped("the request was withdrawn"), 503),
            (RuntimeError("CUDA error: secret /home/model/path"), 500), (KeyError("weights.bin"), 500)]


class _Board:  # the replicas' metrics board, without Ray
    class put:  # noqa: N801
        @staticmethod
        def remote(*a):
            return None


def _ray_transport(service):
    t = RayTransport.__new__(RayTransport)  # its __init__ loads a model by name and joins Ray
    t.service, t.max_images, t.name, t.started, t.board = service, service.max_batch_size, "test:1", 0.0, _Board()

    async def batch(body):  # what @serve.batch does with one request
        return (await t.run([body]))[0]
    t.batch = batch
    return t


@pytest.fixture(scope="module")
def clients():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    service = Service(pipe, guarded=False, defaults={"num_inference_steps": 2})
    uv = UvicornTransport(service, 8, 0.0)
    with TestClient(build_app(service, uv, lifespan=uv.lifespan())) as a, \
            TestClient(build_app(service, _ray_transport(service))) as b:
        yield service, a, b


def _same(ra, rb):
    body = lambda r: re.sub(r"incident \w+", "incident ID", r.text)  # noqa: E731
    assert (ra.status_code, body(ra)) == (rb.status_code, body(rb))


@pytest.mark.parametrize("err,status", OUTCOMES, ids=[type(e).__name__ for e, _ in OUTCOMES])
def test_every_error_class_gets_the_same_answer_on_both_transports(clients, monkeypatch, err, status):
    service, uv, ray = clients

    def fail(bodies, should_stop=None):
        raise err
    monkeypatch.setattr(service, "runner", fail)
    req = {"prompt": "a red house", "seed": 1, "request_id": "r-1"}
    ra, rb = uv.post("/generate", json=req), ray.post("/generate", json=req)
    _same(ra, rb)
    assert ra.status_code == status, ra.text
    out = ra.json()
    assert out["request_id"] == "r-1" and set(out) == {"error", "request_id"}
    if status == 500:  # the model's text stays in the server's log
        assert "secret" not in ra.text and "weights.bin" not in ra.text and "incident" in out["error"]
    else:
        assert out["error"] == str(err)


def test_refusals_and_answers_are_the_same_on_both_transports(clients):
    _, uv, ray = clients
    for req in ({"prompt": ""}, {"prompt": "x", "num_inference_steps": 0}, {"prompt": "x", "bogus": 1},
                {"prompt": "x", "height": 12}, {"prompt": ["x"] * 65}):
        _same(uv.post("/generate", json=req), ray.post("/generate", json=req))
    deep = "[" * 40 + "]" * 40
    _same(uv.post("/generate", content=deep, headers={"content-type": "application/json"}),
          ray.post("/generate", content=deep, headers={"content-type": "application/json"}))
    ok = {"prompt": "a red house", "seed": 3, "num_inference_steps": 2}
    ra, rb = uv.post("/generate", json=ok), ray.post("/generate", json=ok)
    assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
    a, b = ra.json(), rb.json()
    assert b.pop("replica") == "test:1" and a.pop("replica", None) is None
    assert a["images"] == b["images"]  # the same pipeline call, the same seed: the same PNG
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_the_mapping_is_one_function():
    """Both transports answer through Service.answer; a planted second mapping would diverge."""
    from sharpfast.server.service import error_status

    for err, status in OUTCOMES:
        assert error_status(err) == status, err
    assert error_status(asyncio.CancelledError()) == 500
