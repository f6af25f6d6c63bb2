"""Ingest: a source → sharded TFRecord of ``tf.Example``, statistics, schema and the data gate.

Two streaming passes over the source (profile, then write), so memory stays flat whatever the
dataset's size. Each example lands in train / val / test by a hash of its key, so re-ingesting a
grown dataset keeps every old example in its old split. Shards are written into a temporary
directory and renamed into ``RUN/shards`` only when the data gate passes; ``artifacts/LATEST``
moves to the new run last.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import artifacts as A
from pipeline.artifacts import PipelineError
from pipeline.config import Config
from pipeline.console import Progress
from pipeline.data_validation import Anomaly, histogram_edges, infer_schema, validate
from pipeline.sources import BadRecord, Record, open_source
from pipeline.statistics import SplitStats

log = logging.getLogger(__name__)
# A validation or test split smaller than this is reported (small_split).
SMALL_SPLIT = 30

SPLITS = ("train", "val", "test")
MAX_LISTED_BAD = 1000


class IngestBlocked(PipelineError):
    """The data gate found blocking anomalies; nothing was published."""

    def __init__(self, anomalies: list[Anomaly], report: Path):
        self.anomalies = anomalies
        lines = [str(a) for a in anomalies if a.blocking]
        super().__init__(
            f"data gate failed with {len(lines)} blocking anomalies (report: {report}):\n  "
            + "\n  ".join(lines)
        )


@dataclass
class IngestResult:
    run_dir: Path
    counts: dict[str, int]
    anomalies: list[Anomaly]
    bad_records: list[dict[str, str]]


def split_of(key: bytes, split: dict[str, float], salt: str) -> str:
    """The split of an example, from a stable hash of its key (independent of order or size)."""
    digest = hashlib.sha256(salt.encode() + b"\0" + key).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < split["train"]:
        return "train"
    if u < split["train"] + split["val"]:
        return "val"
    return "test"


class _ShardWriter:
    def __init__(self, directory: Path, split: str, shard_size: int, compression: str):
        import tensorflow as tf

        self._tf = tf
        self.directory = directory
        self.split = split
        self.shard_size = shard_size
        self.options = tf.io.TFRecordOptions(
            compression_type="" if compression == "NONE" else "GZIP"
        )
        self.suffix = ".tfrecord.gz" if compression == "GZIP" else ".tfrecord"
        self.index = 0
        self.in_shard = 0
        self.writer: Any = None
        self.count = 0

    def write(self, data: bytes) -> None:
        if self.writer is None or self.in_shard >= self.shard_size:
            self.close()
            path = self.directory / f"{self.split}-{self.index:05d}{self.suffix}"
            self.writer = self._tf.io.TFRecordWriter(str(path), self.options)
            self.index += 1
            self.in_shard = 0
        self.writer.write(data)
        self.in_shard += 1
        self.count += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def to_example(
    label: str | float, label_name: str, features: dict[str, Any], kinds: dict[str, str]
) -> bytes:
    """Serialize one example; missing values are left out (the reader fills them)."""
    import tensorflow as tf

    feats: dict[str, tf.train.Feature] = {}
    if isinstance(label, float):
        feats[label_name] = tf.train.Feature(float_list=tf.train.FloatList(value=[label]))
    else:
        feats[label_name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[label.encode()]))
    for name, kind in kinds.items():
        value = features.get(name)
        if value is None:
            continue
        if kind == "float":
            feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
        elif kind == "vector":
            feats[name] = tf.train.Feature(float_list=tf.train.FloatList(value=value))
        elif kind == "string":
            feats[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
        else:
            feats[name] = tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[np.ascontiguousarray(value).tobytes()])
            )
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def ingest(cfg: Config) -> IngestResult:
    """Run the data stage and publish a new run directory.

    Raises:
        PipelineError: the source or configuration is unusable.
        IngestBlocked: the data gate found blocking anomalies (report written, nothing published).
    """
    run_id = cfg.run_id or A.new_run_id()
    run_dir = Path(cfg.artifacts) / run_id
    if (run_dir / A.SHARDS).exists():
        raise PipelineError(f"{run_dir / A.SHARDS}: already exists; runs are never overwritten")
    source = open_source(cfg.data)
    schema_path = cfg.schema_path
    schema = A.read_json(schema_path) if schema_path.exists() else None
    if schema is not None and schema.get("task") != cfg.model.task:
        raise PipelineError(
            f"{schema_path}: schema was inferred for task {schema.get('task')!r} but "
            f"model.task is {cfg.model.task!r}; delete the schema to infer a new one"
        )
    previous = _previous_stats(Path(cfg.artifacts))

    log.info("profiling %s", cfg.data.source)
    profile = source.profile(schema["features"] if schema else None)
    for name in profile.kinds:
        if name == cfg.data.label_column:
            raise PipelineError(f"feature {name!r} has the same name as the label")
    # Write the columns the schema knows; a first ingest takes the data's own kinds.
    if schema is not None:
        kinds = {n: e["kind"] for n, e in schema["features"].items() if n in profile.kinds}
    else:
        kinds = dict(profile.kinds)
    label_kind = "float" if cfg.model.task == "regression" else "string"
    edges = histogram_edges(kinds, profile, schema)
    vector_len = {
        n: e["length"] for n, e in (schema or {}).get("features", {}).items() if "length" in e
    }

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".shards-tmp-{run_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writers = {
            s: _ShardWriter(tmp, s, cfg.data.shard_size, cfg.data.compression) for s in SPLITS
        }
        acc = {s: SplitStats(kinds, edges, label_kind) for s in (*SPLITS, "all")}
        counts = {"total": 0, "bad": 0, "missing_label": 0}
        bad: list[dict[str, str]] = []
        progress = Progress("ingest", profile.rows or None, "rows")
        for item in source.records(kinds):
            counts["total"] += 1
            progress.update(1)
            if isinstance(item, Record):
                item = _check_record(item, label_kind, vector_len)
            if isinstance(item, BadRecord):
                counts["bad"] += 1
                progress.postfix = f"{counts['bad']} bad"
                if len(bad) < MAX_LISTED_BAD:
                    bad.append({"origin": item.origin, "reason": item.reason})
                continue
            if item.label is None:
                counts["missing_label"] += 1
                continue
            label: str | float = float(item.label) if label_kind == "float" else item.label
            split = split_of(item.key, cfg.data.split, cfg.data.seed)
            writers[split].write(to_example(label, cfg.data.label_column, item.features, kinds))
            acc[split].add(label, item.features, item.meta)
            acc["all"].add(label, item.features, item.meta)
        progress.close()
        for w in writers.values():
            w.close()

        stats = _stats_json(acc, vector_len)
        first = schema is None
        if first:
            schema = infer_schema(cfg, profile, stats["all"], edges)
        assert schema is not None
        anomalies = validate(cfg, profile, schema, stats["all"], previous, counts)
        for a in anomalies:
            log.warning("%s", a)
        for s in SPLITS:
            if cfg.data.split[s] > 0 and writers[s].count == 0:
                anomalies.append(
                    Anomaly("empty_split", s, f"split {s!r} received no examples", True)
                )
            elif s != "train" and 0 < writers[s].count < SMALL_SPLIT:
                small = Anomaly(
                    "small_split",
                    s,
                    f"split {s!r} has only {writers[s].count} examples: its metrics (and "
                    "early stopping, thresholds, gates that use it) mean little; more data or "
                    "a larger data.split share",
                    "small_split" in cfg.validation.blocking,
                    {"count": writers[s].count},
                )
                log.warning("%s", small)
                anomalies.append(small)
        report = {
            "anomalies": [a.to_json() for a in anomalies],
            "bad_records": bad,
            "counts": counts,
        }
        A.write_json(run_dir / A.ANOMALIES, report)
        A.write_json(run_dir / A.STATS, stats)
        if any(a.blocking for a in anomalies):
            raise IngestBlocked(anomalies, run_dir / A.ANOMALIES)
        # Checked before anything is published: a label that cannot work stops the stage.
        vocab = label_vocabulary(cfg, schema, stats) if label_kind == "string" else None

        A.fsync_dir(tmp)
        tmp.rename(run_dir / A.SHARDS)
        A.fsync_dir(run_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if first:
        A.write_json(schema_path, schema)
    A.write_json(run_dir / A.SCHEMA, schema)
    if vocab is not None:
        A.atomic_write_text(run_dir / A.LABELS, "\n".join(vocab) + "\n")
    A.write_json(
        run_dir / "ingest.json",
        {
            "config": cfg.to_dict(),
            "counts": counts,
            "examples": {s: writers[s].count for s in SPLITS},
        },
    )
    A.atomic_write_text(Path(cfg.artifacts) / A.LATEST, run_id + "\n")
    return IngestResult(run_dir, {s: writers[s].count for s in SPLITS} | counts, anomalies, bad)


def label_vocabulary(cfg: Config, schema: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """Class names in class-id order; for a binary task the positive class is id 1."""
    vocab = sorted(set(schema["label"]["vocabulary"]) | set(stats["all"]["label"]["classes"]))
    if cfg.model.task == "binary":
        if len(vocab) != 2:
            raise PipelineError(
                f"model.task = 'binary' needs exactly 2 classes, "
                f"data has {len(vocab)}: {vocab[:10]}"
            )
        positive = cfg.model.positive_label or vocab[-1]
        if positive not in vocab:
            raise PipelineError(f"model.positive_label: {positive!r} is not one of {vocab}")
        vocab = [v for v in vocab if v != positive] + [positive]
    elif cfg.model.task == "multiclass" and len(vocab) < 2:
        raise PipelineError(f"classification needs at least 2 classes, data has {vocab}")
    examples = sum(stats["all"]["label"]["classes"].values())
    if len(vocab) > 100 and len(vocab) > examples / 2 and _all_numeric(vocab):
        raise PipelineError(
            f"label {cfg.data.label_column!r} has {len(vocab)} distinct numeric values in "
            f"{examples} examples: it looks like a regression target; set model.task = "
            "'regression' (or check data.label_column)"
        )
    return vocab


def _all_numeric(values: list[str]) -> bool:
    try:
        for v in values:
            float(v)
    except ValueError:
        return False
    return True


def _check_record(item: Record, label_kind: str, vector_len: dict[str, int]) -> Record | BadRecord:
    if label_kind == "float" and item.label is not None:
        try:
            float(item.label)
        except ValueError:
            return BadRecord(item.origin, f"label {item.label!r} is not a number")
    for name, value in item.features.items():
        if isinstance(value, np.ndarray) and value.ndim == 1:
            # The first vector seen fixes the length on a first ingest; the schema's otherwise.
            length = vector_len.setdefault(name, len(value))
            if len(value) != length:
                return BadRecord(
                    item.origin, f"feature {name!r} has {len(value)} values, expected {length}"
                )
    return item


def _stats_json(acc: dict[str, SplitStats], vector_len: dict[str, int]) -> dict[str, Any]:
    out = {name: s.to_json() for name, s in acc.items()}
    out["all"]["vector_lengths"] = dict(vector_len)
    return out


def _previous_stats(root: Path) -> dict[str, Any] | None:
    latest = root / A.LATEST
    if not latest.exists():
        return None
    path = root / latest.read_text().strip() / A.STATS
    return A.read_json(path)["all"] if path.exists() else None
