"""Streaming per-feature statistics: bounded memory whatever the dataset's size.

Numbers use Welford's running mean/variance and a fixed-edge histogram (the edges come from the
schema so two ingests' histograms can be compared for drift); strings keep a capped value count.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

HIST_BINS = 10
MAX_DISTINCT = 10000  # distinct string values counted per feature; the rest is "other"
TOP_K = 20
BRIGHTNESS_EDGES = [float(x) for x in np.linspace(0.0, 255.0, HIST_BINS + 1)]


def make_edges(lo: float, hi: float) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        hi = lo + 1.0
    return [float(x) for x in np.linspace(lo, hi, HIST_BINS + 1)]


class NumericStats:
    """count / missing / NaN / Inf / min / max / mean / std and a histogram."""

    def __init__(self, edges: list[float]):
        self.edges = np.asarray(edges)
        self.count = self.missing = self.nan = self.inf = 0
        self.n = 0
        self.mean = self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.hist = np.zeros(len(edges) - 1, dtype=np.int64)

    def add_missing(self) -> None:
        self.missing += 1

    def add(self, values: np.ndarray | float) -> None:
        arr = np.atleast_1d(np.asarray(values, dtype=np.float64)).ravel()
        self.count += 1
        nan = np.isnan(arr)
        inf = np.isinf(arr)
        self.nan += int(nan.sum())
        self.inf += int(inf.sum())
        arr = arr[~(nan | inf)]
        if not arr.size:
            return
        # Chan et al.'s parallel update: merge this batch's moments into the running ones.
        n_b = arr.size
        mean_b = float(arr.mean())
        m2_b = float(((arr - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n
        self.min = min(self.min, float(arr.min()))
        self.max = max(self.max, float(arr.max()))
        idx = np.clip(np.searchsorted(self.edges, arr, side="right") - 1, 0, len(self.hist) - 1)
        self.hist += np.bincount(idx, minlength=len(self.hist))

    def to_json(self) -> dict[str, Any]:
        has = self.n > 0
        return {
            "count": self.count,
            "missing": self.missing,
            "nan": self.nan,
            "inf": self.inf,
            "min": self.min if has else None,
            "max": self.max if has else None,
            "mean": self.mean if has else None,
            "std": math.sqrt(self.m2 / self.n) if has else None,
            "histogram": {"edges": self.edges.tolist(), "counts": self.hist.tolist()},
        }


class StringStats:
    """count / missing / distinct values and their frequencies (top values reported)."""

    def __init__(self) -> None:
        self.count = self.missing = self.other = 0
        self.values: Counter[str] = Counter()

    def add_missing(self) -> None:
        self.missing += 1

    def add(self, value: str) -> None:
        self.count += 1
        if value in self.values or len(self.values) < MAX_DISTINCT:
            self.values[value] += 1
        else:
            self.other += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "missing": self.missing,
            "distinct": len(self.values) + (1 if self.other else 0),
            "top": [[v, c] for v, c in self.values.most_common(TOP_K)],
            "values": dict(self.values),
            "other": self.other,
        }


class ImageStats:
    """Original sizes and modes, and the distribution of mean brightness after resizing."""

    def __init__(self) -> None:
        self.count = self.missing = 0
        self.sizes: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()
        self.width = NumericStats(make_edges(0, 1))
        self.height = NumericStats(make_edges(0, 1))
        self.brightness = NumericStats(BRIGHTNESS_EDGES)
        self.shape: list[int] | None = None

    def add_missing(self) -> None:
        self.missing += 1

    def add(self, pixels: np.ndarray, meta: dict[str, Any]) -> None:
        self.count += 1
        self.shape = list(pixels.shape)
        if "width" in meta:
            w, h = int(meta["width"]), int(meta["height"])
            self.width.add(w)
            self.height.add(h)
            if len(self.sizes) < MAX_DISTINCT or f"{w}x{h}" in self.sizes:
                self.sizes[f"{w}x{h}"] += 1
            self.modes[str(meta.get("mode", "?"))] += 1
        self.brightness.add(float(pixels.mean()))

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "missing": self.missing,
            "shape": self.shape,
            "width": {"min": self.width.to_json()["min"], "max": self.width.to_json()["max"]},
            "height": {"min": self.height.to_json()["min"], "max": self.height.to_json()["max"]},
            "sizes": dict(self.sizes.most_common(TOP_K)),
            "modes": dict(self.modes),
            "brightness": self.brightness.to_json(),
        }


class SplitStats:
    """All features' statistics and the label distribution of one split (or of all data)."""

    def __init__(self, kinds: dict[str, str], edges: dict[str, list[float]], label_kind: str):
        self.examples = 0
        self.features: dict[str, NumericStats | StringStats | ImageStats] = {}
        for name, kind in kinds.items():
            if kind in ("float", "vector"):
                self.features[name] = NumericStats(edges[name])
            elif kind == "string":
                self.features[name] = StringStats()
            else:
                self.features[name] = ImageStats()
        self.label_kind = label_kind
        self.labels: Counter[str] = Counter()
        self.label_numeric = NumericStats(edges.get("__label__", make_edges(0, 1)))

    def add(self, label: str | float, features: dict[str, Any], meta: dict[str, Any]) -> None:
        self.examples += 1
        if isinstance(label, float):
            self.label_numeric.add(label)
        else:
            self.labels[label] += 1
        for name, acc in self.features.items():
            value = features.get(name)
            if value is None:
                acc.add_missing()
            elif isinstance(acc, ImageStats):
                acc.add(value, meta)
            else:
                acc.add(value)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "examples": self.examples,
            "features": {name: acc.to_json() for name, acc in self.features.items()},
        }
        if self.label_kind == "float":
            out["label"] = self.label_numeric.to_json()
        else:
            out["label"] = {"classes": dict(sorted(self.labels.items()))}
        return out
