"""Load test of `sharpfast serve` on loopback: the guarded server against the same server unguarded.

    .venv/bin/python benchmarks/load_test.py                     # 32 clients, 320 requests per server
    .venv/bin/python benchmarks/load_test.py --requests 64 --clients 8 --steps 10   # a quick one
    pytest benchmarks/load_test.py --benchmark-only -s          # the same, as a pytest-benchmark run

For each server (started here as a subprocess on 127.0.0.1, a free port, the bundled digits model),
`--clients` concurrent httpx clients send `--requests` POST /generate requests in all, prompts mixed
from the digits model's memorized and non-memorized sets (memorized share `--memorized`), each with
its own seed and request_id. Checked for every response: status 200, its own request_id (none lost
or duplicated), one decodable PNG per prompt, a report per prompt with flagged => mitigated
(guarded); and the server's memory (RSS) after the first quarter of the requests against the end.
Then SIGTERM: the server must shut down gracefully (answer what is in flight, say so, exit).
Reports p50 / p99 latency, throughput
and the guarded / unguarded ratios, and writes them to --out (JSON). Bounded: every request has a
timeout, the whole run a deadline.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`sharpfast serve` in a subprocess; stopped with SIGTERM (graceful) on exit."""

    def __init__(self, guarded: bool, steps: int, max_batch_size: int = 8, startup_s: float = 180.0):
        self.port = free_port()
        cmd = [sys.executable, "-m", "sharpfast", "serve", "--model", "digits", "--port", str(self.port),
               "--num-inference-steps", str(steps), "--max-batch-size", str(max_batch_size), "--device", "cpu"]
        if not guarded:
            cmd.append("--no-guard")
        import tempfile

        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready(startup_s)

    def _wait_ready(self, limit_s):
        import httpx

        deadline = time.time() + limit_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.stderr()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).json()["status"] == "ok":
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError(f"the server was not ready in {limit_s} s")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2 ** 20

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout_s: float = 120.0) -> tuple[int, bool]:
        """SIGTERM; (exit code, whether the server said it stopped gracefully). uvicorn re-raises
        the signal after its graceful shutdown, so the exit code is -SIGTERM then."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = -9
        graceful = "stopped gracefully" in self.stderr()
        self.log.close()
        return rc, graceful


def make_requests(n: int, memorized_share: float, seed0: int = 0):
    sys.path.insert(0, ROOT)
    from sharpfast import zoo

    mem = [r["prompt"] for r in zoo.prompts("digits", "memorized")]
    normal = [r["prompt"] for r in zoo.prompts("digits", "non_memorized")]
    every = max(1, round(1 / memorized_share)) if memorized_share > 0 else None
    out = []
    for i in range(n):
        is_mem = every is not None and i % every == 0
        pool = mem if is_mem else normal
        out.append({"prompt": pool[(i * 7) % len(pool)], "seed": seed0 + i, "request_id": f"r{i}",
                    "_memorized": is_mem})
    return out


def check_response(req: dict, status: int, body: dict, guarded: bool) -> str | None:
    """Why this response is wrong, or None."""
    from PIL import Image

    if status != 200:
        return f"status {status}: {body}"
    if body.get("request_id") != req["request_id"]:
        return f"request_id {body.get('request_id')!r} for {req['request_id']!r}"
    if body.get("seed") != req["seed"] or len(body.get("images", [])) != 1:
        return "wrong seed or image count"
    img = body["images"][0]
    if img["prompt"] != req["prompt"]:
        return "image of another prompt"
    try:
        Image.open(io.BytesIO(base64.b64decode(img["png_base64"]))).verify()
    except Exception as e:  # noqa: BLE001
        return f"PNG does not decode: {e}"
    rep = body.get("memorization")
    if guarded:
        if not rep or len(rep) != 1 or rep[0]["prompt"] != req["prompt"]:
            return "no report for the prompt"
        if rep[0]["flagged"] and not rep[0]["mitigated"]:
            return "flagged, not mitigated"
    elif rep is not None:
        return "an unguarded server returned a report"
    return None


async def drive(url: str, requests: list, clients: int, guarded: bool, timeout_s: float, on_quarter=None):
    import httpx

    queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    results, errors = {}, []
    quarter = max(1, len(requests) // 4)

    async def client():
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as c:
            while True:
                try:
                    req = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                resp = await c.post("/generate", json={k: v for k, v in req.items() if not k.startswith("_")})
                dt = time.perf_counter() - t0
                body = resp.json()
                why = check_response(req, resp.status_code, body, guarded)
                if why:
                    errors.append(f"{req['request_id']}: {why}")
                if req["request_id"] in results:
                    errors.append(f"{req['request_id']}: answered twice")
                results[req["request_id"]] = {"latency": dt, "report": body.get("memorization"),
                                              "memorized": req["_memorized"], "batch": body.get("batch_images")}
                if len(results) == quarter and on_quarter:
                    on_quarter()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return results, errors, time.perf_counter() - t0


def percentile(xs, q):
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def run_one(guarded: bool, args) -> dict:
    requests = make_requests(args.requests, args.memorized)
    server = Server(guarded, args.steps, args.max_batch_size)
    try:
        # warm-up (first-call costs), not counted
        asyncio.run(drive(server.url, make_requests(4, 0.5, seed0=10 ** 6), 4, guarded, args.timeout))
        rss = {}
        results, errors, wall = asyncio.run(drive(server.url, requests, args.clients, guarded, args.timeout,
                                                  on_quarter=lambda: rss.__setitem__("quarter", server.rss_mb())))
        rss["end"] = server.rss_mb()
        metrics = __import__("httpx").get(server.url + "/metrics", timeout=10).text
    finally:
        rc, graceful = server.stop()
    missing = {r["request_id"] for r in requests} - set(results)
    lat = [r["latency"] for r in results.values()]
    flagged = [r for r in results.values() if r["report"] and r["report"][0]["flagged"]]
    return {"guarded": guarded, "requests": len(requests), "answered": len(results), "missing": sorted(missing),
            "errors": errors[:20], "n_errors": len(errors), "exit_code": rc, "graceful": graceful,
            "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99), "throughput_rps": len(results) / wall,
            "wall_s": wall, "rss_mb_quarter": rss.get("quarter"), "rss_mb_end": rss["end"],
            "flagged": len(flagged), "flagged_memorized": sum(r["memorized"] for r in flagged),
            "memorized_sent": sum(r["_memorized"] for r in requests),
            "mean_batch": sum(r["batch"] or 0 for r in results.values()) / max(1, len(results)),
            "metrics_has_guard_series": "sharpfast_calls_total" in metrics}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=320)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--steps", type=int, default=50, help="the digits calibration's setting (default 50)")
    p.add_argument("--memorized", type=float, default=0.25, help="share of memorized prompts (default 0.25)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--out", default=os.path.join(HERE, "results", "load_test.json"))
    args = p.parse_args(argv)
    runs = {}
    for guarded in (False, True):
        runs["guarded" if guarded else "plain"] = r = run_one(guarded, args)
        shutdown = "graceful" if r["graceful"] else "NOT graceful"
        print(f"{'guarded' if guarded else 'plain':8s}: {r['answered']}/{r['requests']} answered, "
              f"{r['n_errors']} bad, exit {r['exit_code']} ({shutdown}); "
              f"p50 {r['p50_s']:.3f} s, p99 {r['p99_s']:.3f} s, "
              f"{r['throughput_rps']:.2f} req/s; mean batch {r['mean_batch']:.1f}; RSS {r['rss_mb_quarter']:.0f} -> "
              f"{r['rss_mb_end']:.0f} MB; flagged {r['flagged']} ({r['flagged_memorized']} of "
              f"{r['memorized_sent']} memorized sent)", flush=True)
        for e in r["errors"]:
            print("   ", e)
    g, b = runs["guarded"], runs["plain"]
    ratios = {"p50": g["p50_s"] / b["p50_s"], "p99": g["p99_s"] / b["p99_s"],
              "throughput": g["throughput_rps"] / b["throughput_rps"]}
    print(
        f"guarded / plain: p50 {ratios['p50']:.2f}x, p99 {ratios['p99']:.2f}x, throughput {ratios['throughput']:.2f}x"
    )
    result = {"settings": vars(args), "runs": runs, "ratios": ratios}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def ok(result) -> list[str]:
    """What went wrong in a load test (empty when every check passed)."""
    bad = []
    for name, r in result["runs"].items():
        if r["answered"] != r["requests"] or r["missing"] or r["n_errors"]:
            bad.append(f"{name}: {r['n_errors']} bad responses, {len(r['missing'])} missing")
        if r["exit_code"] not in (0, -signal.SIGTERM) or not r["graceful"]:
            bad.append(f"{name}: no graceful shutdown on SIGTERM (exit code {r['exit_code']})")
        if r["rss_mb_end"] > r["rss_mb_quarter"] * 1.10 + 50:
            bad.append(f"{name}: memory grew {r['rss_mb_quarter']:.0f} -> {r['rss_mb_end']:.0f} MB")
        if name == "guarded" and not r["metrics_has_guard_series"]:
            bad.append("guarded: /metrics has no guard series")
    return bad


def test_load(benchmark):
    result = benchmark.pedantic(lambda: main([]), rounds=1, iterations=1)
    benchmark.extra_info.update(result["ratios"])
    assert not ok(result), ok(result)


if __name__ == "__main__":
    res = main()
    problems = ok(res)
    for p_ in problems:
        print("FAILED:", p_)
    sys.exit(1 if problems else 0)
