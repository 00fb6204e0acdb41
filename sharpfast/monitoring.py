"""Counters and histograms of a guard, for monitoring.

    g = sharpfast.guard(pipe)
    g.stats                         # a snapshot (dict), no dependency
    g.register_prometheus()         # the same numbers through prometheus_client, when installed

One GuardStats per guard, updated once per request under its own lock (requests run on many
threads). The Prometheus side is a custom collector that reads the snapshot at scrape time, so
the two views can never disagree and nothing is counted twice.

Exported (every series labelled guard=<name> and metric=<the guard's metric>):
  sharpfast_calls_total (guarded pipeline calls: a server batches several HTTP requests into one),
  sharpfast_prompts_total, sharpfast_images_total,
  sharpfast_flagged_total (prompts), sharpfast_mitigated_total (prompts), sharpfast_errors_total,
  sharpfast_score (histogram: the per-prompt score, buckets around the threshold),
  sharpfast_sail_steps (histogram: Adam steps per mitigated request),
  sharpfast_added_latency_seconds (histogram: sharpfast's own work in a request: the scoring at
  step 1 and SAIL), sharpfast_request_latency_seconds (histogram: the whole request).
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)
_RELATIVE = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)


def score_buckets(threshold: float) -> tuple:
    """Bucket bounds for scores: around the threshold (so the flag rate near the cut is
    readable) when it is a positive number, else a log scale."""
    if math.isfinite(threshold) and threshold > 0:
        return tuple(threshold * r for r in _RELATIVE)
    return tuple(10.0 ** e for e in range(-3, 4))


class Histogram:
    """Cumulative-bucket histogram as Prometheus defines it (upper bounds, +Inf implied)."""

    def __init__(self, bounds) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one value."""
        value = float(value)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        """Cumulative buckets, count and sum."""
        cum, total = [], 0
        for c in self.counts:
            total += c
            cum.append(total)
        return {"buckets": list(zip([*self.bounds, math.inf], cum)), "count": total, "sum": self.sum}


class GuardStats:
    """What one guard has seen; `snapshot()` is what `guard.stats` returns."""

    COUNTERS = ("calls", "prompts", "images", "flagged", "mitigated", "unmitigated", "errors")

    def __init__(self, name: str, metric: str, threshold: Any = None) -> None:
        """threshold: the buckets' centre; None (threshold="auto", not resolved yet): set from the
        first recorded request's threshold."""
        self.name, self.metric = name, metric
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.COUNTERS, 0)
        self._hist = {"score": Histogram(score_buckets(threshold) if threshold is not None else ()),
                      "sail_steps": Histogram(STEP_BUCKETS),
                      "added_latency_seconds": Histogram(LATENCY_BUCKETS),
                      "request_latency_seconds": Histogram(LATENCY_BUCKETS)}

    def record(self, *, scores: Any, flagged, mitigated, images: int, sail_steps, added_s: float,
               request_s: float, threshold: Any = None) -> None:
        """mitigated: per prompt, whether its mitigation ran and passed its check (flagged prompts
        that are not are counted as unmitigated); threshold: the request's (sets the score buckets
        of a guard made with threshold="auto", once)."""
        with self._lock:
            if threshold is not None and not self._hist["score"].bounds:  # unset: centred on the first request's
                self._hist["score"] = Histogram(score_buckets(float(threshold)))
            c = self._counts
            c["calls"] += 1
            c["prompts"] += len(scores)
            c["images"] += images
            c["flagged"] += int(sum(bool(f) for f in flagged))
            c["mitigated"] += int(sum(bool(f) and bool(m) for f, m in zip(flagged, mitigated)))
            c["unmitigated"] += int(sum(bool(f) and not bool(m) for f, m in zip(flagged, mitigated)))
            for s in scores:
                self._hist["score"].observe(s)
            if sail_steps is not None:
                self._hist["sail_steps"].observe(sail_steps)
            self._hist["added_latency_seconds"].observe(added_s)
            self._hist["request_latency_seconds"].observe(request_s)

    def record_error(self) -> None:
        """Count a request that raised."""
        with self._lock:
            self._counts["errors"] += 1

    def snapshot(self) -> dict:
        """The counters and histograms as a dict."""
        with self._lock:
            return {"guard": self.name, "metric": self.metric, **self._counts,
                    **{k: h.snapshot() for k, h in self._hist.items()}}

    # -- Prometheus --------------------------------------------------------------------------
    def collector(self):
        """A prometheus_client collector over this object (reads the snapshot at each scrape)."""
        try:
            from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        except ImportError as e:
            from .errors import MissingDependency

            raise MissingDependency("Prometheus metrics need prometheus_client: pip install "
                                    "'sharpfast[serve]' (guard.stats works without it)") from e
        stats = self
        labels = ["guard", "metric"]

        class _Collector:
            def collect(self):
                snap = stats.snapshot()
                values = [snap["guard"], snap["metric"]]
                helps = {"calls": "guarded pipeline calls (a server batch of several HTTP requests is one)",
                         "prompts": "prompts scored",
                         "images": "images generated", "flagged": "prompts flagged as memorized",
                         "mitigated": "flagged prompts whose mitigation ran and passed its check",
                         "unmitigated": "flagged prompts whose mitigation did not pass its check (or none ran)",
                         "errors": "requests that raised"}
                for key in GuardStats.COUNTERS:
                    fam = CounterMetricFamily(f"sharpfast_{key}", helps[key], labels=labels)
                    fam.add_metric(values, snap[key])
                    yield fam
                hhelps = {"score": "per-prompt memorization score at the first step",
                          "sail_steps": "SAIL Adam steps per mitigated request",
                          "added_latency_seconds": "sharpfast's own time in a request (scoring, SAIL)",
                          "request_latency_seconds": "whole guarded request"}
                for key, help_ in hhelps.items():
                    h = snap[key]
                    hist = HistogramMetricFamily(f"sharpfast_{key}", help_, labels=labels)
                    hist.add_metric(values, [(_le(b), c) for b, c in h["buckets"]], sum_value=h["sum"])
                    yield hist

            def describe(self) -> list:  # names known without a scrape: duplicate registrations fail at once
                return list(self.collect())

        return _Collector()


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class ServerMetrics:
    """The server's own Prometheus series (beside the guard's): HTTP status, batch sizes, queue wait."""

    def __init__(self, guard: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        if guard is not None:
            guard.register_prometheus(self.registry)
        self.http = Counter("sharpfast_http_requests", "HTTP requests to /generate by status", ["status"],
                            registry=self.registry)
        self.batch = Histogram("sharpfast_batch_requests", "HTTP requests per pipeline call", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.images = Histogram("sharpfast_batch_images", "images per pipeline call", registry=self.registry,
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.wait = Histogram("sharpfast_queue_wait_seconds", "time a request waited for its batch",
                              registry=self.registry, buckets=LATENCY_BUCKETS)

    def observe(self, requests: int, images: int, waits: list) -> None:
        """Note one pipeline call: its requests, images and each request's queue wait."""
        self.batch.observe(requests)
        self.images.observe(images)
        for w in waits:
            self.wait.observe(w)

    def text(self) -> str:
        """The series as Prometheus text."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")
