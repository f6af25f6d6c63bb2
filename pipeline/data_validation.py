"""The data gate: schema inference and named anomalies with the numbers behind them.

The first ingest infers a schema (feature kinds, numeric ranges, histogram edges, vocabularies,
label classes) and saves it; every later ingest is checked against it and against the previous
ingest's statistics (drift). Each anomaly names its kind, the feature and the numbers, and is
blocking when its kind is listed in ``validation.blocking``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.sources import Profile
from pipeline.statistics import make_edges

SCHEMA_VERSION = 1
MAX_VOCABULARY = 1000
MIN_IDENTIFIER_ROWS = 20  # fewer distinct values prove nothing


@dataclass
class Anomaly:
    kind: str
    feature: str
    message: str
    blocking: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        level = "BLOCKING" if self.blocking else "warning"
        return f"[{level}] {self.kind} {self.feature}: {self.message}"


def histogram_edges(
    kinds: dict[str, str], profile: Profile, schema: dict[str, Any] | None
) -> dict[str, list[float]]:
    """Histogram edges per numeric feature: the schema's, else from this data's range."""
    edges: dict[str, list[float]] = {}
    known = (schema or {}).get("features", {})
    for name, kind in kinds.items():
        if kind in ("float", "vector"):
            if name in known and "edges" in known[name]:
                edges[name] = known[name]["edges"]
            else:
                edges[name] = make_edges(*profile.ranges.get(name, (0.0, 1.0)))
    label = (schema or {}).get("label", {})
    edges["__label__"] = label.get("edges") or make_edges(
        *profile.ranges.get("__label__", (0.0, 1.0))
    )
    return edges


def infer_schema(
    cfg: Config, profile: Profile, stats: dict[str, Any], edges: dict[str, list[float]]
) -> dict[str, Any]:
    """The schema of a first ingest, from its profile and statistics."""
    features: dict[str, Any] = {}
    for name, kind in profile.kinds.items():
        fstats = stats["features"][name]
        entry: dict[str, Any] = {"kind": kind}
        if kind in ("float", "vector"):
            entry.update(min=fstats["min"], max=fstats["max"], edges=edges[name])
            if kind == "vector":
                entry["length"] = stats["vector_lengths"][name]
        elif kind == "string":
            values = sorted(fstats["values"], key=lambda v: (-fstats["values"][v], v))
            entry["vocabulary"] = sorted(values[:MAX_VOCABULARY])
        else:
            entry["shape"] = fstats["shape"]
        features[name] = entry
    label: dict[str, Any] = {"name": cfg.data.label_column}
    if cfg.model.task == "regression":
        label.update(
            kind="float",
            min=stats["label"]["min"],
            max=stats["label"]["max"],
            edges=edges["__label__"],
        )
    else:
        label.update(kind="string", vocabulary=sorted(stats["label"]["classes"]))
    return {
        "version": SCHEMA_VERSION,
        "task": cfg.model.task,
        "label": label,
        "features": features,
    }


def validate(
    cfg: Config,
    profile: Profile,
    schema: dict[str, Any],
    stats: dict[str, Any],
    previous: dict[str, Any] | None,
    counts: dict[str, int],
) -> list[Anomaly]:
    """Every anomaly of this ingest against ``schema`` and the previous statistics.

    Args:
        cfg: the configuration (thresholds and which kinds block).
        profile: the kinds this data has (as inferred from the data itself).
        schema: the schema in force (inferred from this data on a first ingest).
        stats: this ingest's statistics over all splits.
        previous: the previous ingest's statistics, if any.
        counts: ``bad`` and ``missing_label`` record counts and ``total`` inputs read.
    """
    v = cfg.validation
    out: list[Anomaly] = []

    def add(kind: str, feature: str, message: str, **details: Any) -> None:
        out.append(Anomaly(kind, feature, message, kind in v.blocking, details))

    total = max(counts["total"], 1)
    bad_fraction = counts["bad"] / total
    if bad_fraction > cfg.data.max_bad_fraction:
        out.append(
            Anomaly(
                "bad_records",
                "*",
                f"{counts['bad']} of {counts['total']} inputs unreadable "
                f"({bad_fraction:.2%}), above data.max_bad_fraction "
                f"{cfg.data.max_bad_fraction:.2%}",
                True,
                {"bad": counts["bad"], "total": counts["total"], "fraction": bad_fraction},
            )
        )
    if counts["missing_label"]:
        add(
            "missing_label",
            cfg.data.label_column,
            f"{counts['missing_label']} examples have no label and were skipped",
            count=counts["missing_label"],
        )

    features = schema["features"]
    for name, entry in features.items():
        if name not in profile.kinds:
            add("missing_column", name, f"schema feature of kind {entry['kind']} is absent")
        elif profile.kinds[name] != entry["kind"]:
            add(
                "type_change",
                name,
                f"schema says {entry['kind']}, data is {profile.kinds[name]}",
                expected=entry["kind"],
                actual=profile.kinds[name],
            )
    for name, kind in profile.kinds.items():
        if name not in features:
            add("new_column", name, f"{kind} feature not in the schema; it is ignored")

    for name, fstats in stats["features"].items():
        entry = features.get(name)
        if entry is None:
            continue
        kind = entry["kind"]
        if fstats["missing"] and kind != "image":
            total = fstats["missing"] + fstats["count"]
            filled = "the train mean" if kind in ("float", "vector") else "the empty category"
            add(
                "missing_values",
                name,
                f"{fstats['missing']} of {total} values missing "
                f"({fstats['missing'] / total:.1%}); the model fills them with {filled}",
                count=fstats["missing"],
                fraction=fstats["missing"] / total,
            )
        if kind in ("float", "vector"):
            if fstats["nan"] or fstats["inf"]:
                add(
                    "nan_inf",
                    name,
                    f"{fstats['nan']} NaN and {fstats['inf']} Inf values",
                    nan=fstats["nan"],
                    inf=fstats["inf"],
                )
            lo, hi = fstats["min"], fstats["max"]
            if lo is not None and (lo < entry["min"] or hi > entry["max"]):
                add(
                    "out_of_range",
                    name,
                    f"values span [{lo:g}, {hi:g}], schema range is "
                    f"[{entry['min']:g}, {entry['max']:g}]",
                    min=lo,
                    max=hi,
                    schema_min=entry["min"],
                    schema_max=entry["max"],
                )
        elif kind == "image":
            if fstats["shape"] and fstats["shape"] != entry["shape"]:
                add(
                    "type_change",
                    name,
                    f"images are {fstats['shape']} but the schema says {entry['shape']}; set "
                    "data.image_size/channels to the schema's or delete the schema",
                    expected=entry["shape"],
                    actual=fstats["shape"],
                )
        elif kind == "string":
            counts_of = fstats["values"]
            if len(counts_of) >= MIN_IDENTIFIER_ROWS and max(counts_of.values()) == 1:
                add(
                    "identifier",
                    name,
                    f"each of its {len(counts_of)} values is in one row only (e.g. "
                    f"{sorted(counts_of)[:3]}): it identifies rows and cannot generalize, the "
                    "model leaves values seen once in training out; set "
                    f"data.key_column={name!r} to keep it as the example's key instead",
                    distinct=len(counts_of),
                )
                continue  # an id's values are new in every ingest: no unseen_category for it
            vocab = set(entry["vocabulary"])
            unseen = {k: c for k, c in counts_of.items() if k not in vocab}
            if unseen:
                add(
                    "unseen_category",
                    name,
                    f"{sum(unseen.values())} values in {len(unseen)} categories not in the "
                    f"schema, e.g. {sorted(unseen)[:5]}",
                    count=sum(unseen.values()),
                    categories=sorted(unseen)[:50],
                )

    label = schema["label"]
    if label["kind"] == "string":
        classes = stats["label"]["classes"]
        vocab = set(label["vocabulary"])
        unseen = {k: c for k, c in classes.items() if k not in vocab}
        if unseen:
            add(
                "unseen_label",
                label["name"],
                f"labels not in the schema: {sorted(unseen)} ({sum(unseen.values())} examples)",
                labels=unseen,
            )
        absent = sorted(vocab - set(classes))
        if absent:
            add("absent_class", label["name"], f"no examples of {absent}", classes=absent)
        present = [c for c in classes.values() if c > 0]
        if len(present) >= 2:
            ratio = max(present) / min(present)
            if ratio > v.max_class_imbalance:
                add(
                    "class_imbalance",
                    label["name"],
                    f"largest/smallest class = {ratio:.1f}, above "
                    f"validation.max_class_imbalance {v.max_class_imbalance:g}",
                    ratio=ratio,
                    classes=classes,
                )
    else:
        lstats = stats["label"]
        if lstats["nan"] or lstats["inf"]:
            add(
                "nan_inf",
                label["name"],
                f"label has {lstats['nan']} NaN and {lstats['inf']} Inf values",
                nan=lstats["nan"],
                inf=lstats["inf"],
            )

    if previous is not None:
        for name, distance in drift_distances(stats, previous).items():
            if distance > v.drift_linf:
                add(
                    "drift",
                    name,
                    f"L-infinity distance {distance:.3f} to the previous ingest, above "
                    f"validation.drift_linf {v.drift_linf:g}",
                    distance=distance,
                )
    return out


def drift_distances(current: dict[str, Any], previous: dict[str, Any]) -> dict[str, float]:
    """L-infinity distance between the normalized distributions of each feature and the label."""
    out: dict[str, float] = {}
    for name, cur in current["features"].items():
        prev = previous.get("features", {}).get(name)
        if prev is None:
            continue
        a, b = _distribution(cur), _distribution(prev)
        if a is not None and b is not None:
            out[name] = linf(a, b)
    a, b = _distribution(current["label"]), _distribution(previous.get("label", {}))
    if a is not None and b is not None:
        out["<label>"] = linf(a, b)
    return out


def _distribution(fstats: dict[str, Any]) -> dict[str, float] | None:
    if "histogram" in fstats:
        counts = {str(i): c for i, c in enumerate(fstats["histogram"]["counts"])}
    elif "values" in fstats:
        counts = dict(fstats["values"])
    elif "classes" in fstats:
        counts = dict(fstats["classes"])
    elif "brightness" in fstats:
        counts = {str(i): c for i, c in enumerate(fstats["brightness"]["histogram"]["counts"])}
    else:
        return None
    total = sum(counts.values())
    if total == 0:
        return None
    return {k: c / total for k, c in counts.items()}


def linf(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))
