"""Prometheus metrics under TF Serving's names, served at the monitoring config's path.

``:tensorflow:serving:request_count{model_name,status}`` is exposed as an untyped sample with
exactly that name (prometheus-client's Counter would append ``_total``, which TF Serving's
dashboards do not expect); latencies are histograms in microseconds, as TF Serving's are.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import Metric

# Microsecond buckets: 10 µs … ~100 s, roughly ×2.5 apart.
LATENCY_BUCKETS = tuple(float(10 * 2.5**i) for i in range(18))
MAX_CACHED_LABELS = 4096


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: dict[str, Counter[tuple[tuple[str, str], ...]]] = {}
        self.docs: dict[str, str] = {}

    def declare(self, name: str, doc: str) -> None:
        self.values[name] = Counter()
        self.docs[name] = doc

    def inc(self, name: str, **labels: str) -> None:
        self.inc_key(name, tuple(sorted(labels.items())))

    def inc_key(self, name: str, key: tuple[tuple[str, str], ...]) -> None:
        with self.lock:
            self.values[name][key] += 1

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            for name, counts in self.values.items():
                metric = Metric(name, self.docs[name], "untyped")
                for labels, value in counts.items():
                    metric.add_sample(name, dict(labels), float(value))
                yield metric


class Metrics:
    REQUEST_COUNT = ":tensorflow:serving:request_count"
    LOAD_ATTEMPTS = ":tensorflow:cc:saved_model:load_attempt_count"

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._counters = _Counters()
        # Per request: the counter's key and the histogram's child, looked up once per labels.
        self._requests: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._counters.declare(self.REQUEST_COUNT, "The total number of requests.")
        self._counters.declare(self.LOAD_ATTEMPTS, "The number of times a SavedModel was loaded.")
        self.registry.register(self._counters)  # type: ignore[arg-type]
        self._latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ["model_name", "API", "entrypoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._load_latency = Histogram(
            ":tensorflow:cc:saved_model:load_latency",
            "Latency in microseconds for SavedModels that were successfully loaded.",
            ["model_path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._warmup_latency = Histogram(
            ":tensorflow:serving:model_warmup_latency",
            "Distribution of wall time (in microseconds) for warming up the model.",
            ["model_path", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def request(self, model: str, api: str, entrypoint: str, status: str, seconds: float) -> None:
        labels = (model, api, entrypoint, status)
        cached = self._requests.get(labels)
        if cached is None:
            if len(self._requests) >= MAX_CACHED_LABELS:
                self._requests.clear()
            count_key = (("model_name", model), ("status", status))
            child = self._latency.labels(model, api, entrypoint)
            cached = self._requests[labels] = (count_key, child)
        self._counters.inc_key(self.REQUEST_COUNT, cached[0])
        cached[1].observe(seconds * 1e6)

    def load_attempt(self, path: str, status: str, seconds: float) -> None:
        self._counters.inc(self.LOAD_ATTEMPTS, model_path=path, status=status)
        if status == "OK":
            self._load_latency.labels(path).observe(seconds * 1e6)

    def warmup_latency(self, path: str, seconds: float) -> None:
        self._warmup_latency.labels(path, "OK").observe(seconds * 1e6)

    def render(self) -> bytes:
        return generate_latest(self.registry)
