"""Soak of the single-process server: steady load for a bounded time, memory every minute.

    .venv/bin/python benchmarks/soak.py --minutes 20           # outside CI (two cores for 20 minutes)

`sharpfast serve --model digits` (guarded, its defaults) on loopback; `--clients` clients send
requests back to back (a quarter memorized prompts, each with its own seed and request_id) until
the deadline; the server's RSS is read every 60 s. Checked: every answer 200 with its own
request_id, flagged => mitigated; then SIGTERM and a graceful stop. Writes --out (JSON): the RSS
series, answered / errors, p50 / p99, and whether memory plateaued (the last third's growth).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from load_test import Server, make_requests  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default=os.path.join(HERE, "results", "soak.json"))
    a = p.parse_args(argv)
    import httpx

    server = Server(guarded=True, steps=a.steps)
    pool = make_requests(4000, 0.25)
    lock, stats, lat, rss = threading.Lock(), {"sent": 0, "answered": 0, "errors": 0, "unmitigated": 0}, [], []
    deadline = time.time() + 60 * a.minutes
    nxt = iter(range(10 ** 9))

    def client():
        with httpx.Client(base_url=server.url, timeout=600) as c:
            while time.time() < deadline:
                with lock:
                    i = next(nxt)
                    stats["sent"] += 1
                req = dict(pool[i % len(pool)], request_id=f"s{i}", seed=i)
                req.pop("_memorized")
                t = time.perf_counter()
                try:
                    r = c.post("/generate", json=req)
                    ok = r.status_code == 200 and r.json()["request_id"] == req["request_id"]
                    bad = ok and any(m["flagged"] and not m["mitigated"] for m in r.json()["memorization"])
                except httpx.HTTPError:
                    ok, bad = False, False
                with lock:
                    stats["answered" if ok else "errors"] += 1
                    stats["unmitigated"] += int(bad)
                    lat.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    start = time.time()
    for th in threads:
        th.start()
    while time.time() < deadline:
        rss.append({"minute": round((time.time() - start) / 60, 1), "rss_mb": round(server.rss_mb(), 1),
                    "answered": stats["answered"]})
        print(json.dumps(rss[-1]), flush=True)
        time.sleep(min(60, max(0, deadline - time.time())))
    for th in threads:
        th.join(900)
    rc, graceful = server.stop()
    lat.sort()
    third = rss[len(rss) * 2 // 3:] or rss
    result = {**stats, "minutes": a.minutes, "clients": a.clients, "p50_s": lat[len(lat) // 2] if lat else None,
              "p99_s": lat[int(0.99 * (len(lat) - 1))] if lat else None, "rss": rss,
              "last_third_growth_mb": round(third[-1]["rss_mb"] - third[0]["rss_mb"], 1), "exit": rc,
              "graceful": graceful}
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "rss"}))
    return 0 if stats["errors"] == 0 and stats["unmitigated"] == 0 and graceful else 1


if __name__ == "__main__":
    sys.exit(main())
