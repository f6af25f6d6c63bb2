"""Streaming per-feature statistics: bounded memory whatever the dataset's size.

Numbers use Welford's running mean/variance and a fixed-edge histogram (the edges come from the
schema so two ingests' histograms can be compared for drift); strings keep a capped value count.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.sources import Batch

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
        """One example's value (or vector of values)."""
        self.count += 1
        self._add_values(np.atleast_1d(np.asarray(values, dtype=np.float64)).ravel())

    def add_column(self, values: np.ndarray, present: np.ndarray) -> None:
        """A column of scalar values, one per example; ``present`` is False where missing."""
        kept = int(present.sum())
        self.count += kept
        self.missing += len(present) - kept
        self._add_values(values[present] if kept < len(present) else values)

    def _add_values(self, arr: np.ndarray) -> None:
        nan = np.isnan(arr)
        inf = np.isinf(arr)
        self.nan += int(nan.sum())
        self.inf += int(inf.sum())
        arr = arr[~(nan | inf)]
        if not arr.size:
            return
        mean_b = float(arr.mean())
        self._merge_moments(arr.size, mean_b, float(((arr - mean_b) ** 2).sum()))
        self.min = min(self.min, float(arr.min()))
        self.max = max(self.max, float(arr.max()))
        idx = np.clip(np.searchsorted(self.edges, arr, side="right") - 1, 0, len(self.hist) - 1)
        self.hist += np.bincount(idx, minlength=len(self.hist))

    def _merge_moments(self, n_b: int, mean_b: float, m2_b: float) -> None:
        # Chan et al.'s parallel update: merge a batch's moments into the running ones.
        n = self.n + n_b
        if n == 0:
            return
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    def merge(self, other: NumericStats) -> None:
        """Add another accumulator's values (another part of the data, same edges)."""
        self.count += other.count
        self.missing += other.missing
        self.nan += other.nan
        self.inf += other.inf
        self._merge_moments(other.n, other.mean, other.m2)
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.hist += other.hist

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
        self._count(value, 1)

    def add_many(self, values: list[str | None]) -> None:
        """A column of values, None where missing."""
        for value, n in Counter(values).items():
            if value is None:
                self.missing += n
            else:
                self._count(value, n)

    def _count(self, value: str, n: int) -> None:
        self.count += n
        if value in self.values or len(self.values) < MAX_DISTINCT:
            self.values[value] += n
        else:
            self.other += n

    def merge(self, other: StringStats) -> None:
        self.missing += other.missing
        self.count += other.count - sum(other.values.values())
        self.other += other.other
        for value, n in other.values.items():
            self._count(value, n)

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

    def merge(self, other: ImageStats) -> None:
        self.count += other.count
        self.missing += other.missing
        self.shape = self.shape or other.shape
        for size, n in other.sizes.items():
            if len(self.sizes) < MAX_DISTINCT or size in self.sizes:
                self.sizes[size] += n
        self.modes.update(other.modes)
        self.width.merge(other.width)
        self.height.merge(other.height)
        self.brightness.merge(other.brightness)

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

    def add_batch(self, batch: Batch) -> None:
        """Every example of a batch (the columnar form of :meth:`add`)."""
        if not len(batch):
            return
        self.examples += len(batch)
        if isinstance(batch.labels, np.ndarray):
            self.label_numeric.add_column(batch.labels, np.ones(len(batch), dtype=bool))
        else:
            self.labels.update(batch.labels)
        for name, acc in self.features.items():
            column = batch.columns.get(name)
            if isinstance(column, tuple):
                assert isinstance(acc, NumericStats)
                acc.add_column(*column)
            elif isinstance(acc, StringStats):
                acc.add_many(column if column is not None else [None] * len(batch))
            else:
                for i, value in enumerate(column or [None] * len(batch)):
                    if value is None:
                        acc.add_missing()
                    elif isinstance(acc, ImageStats):
                        acc.add(value, batch.meta[i] if batch.meta else {})
                    else:
                        acc.add(value)

    def merge(self, other: SplitStats) -> None:
        self.examples += other.examples
        self.labels.update(other.labels)
        self.label_numeric.merge(other.label_numeric)
        for name, acc in self.features.items():
            acc.merge(other.features[name])  # type: ignore[arg-type]

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
