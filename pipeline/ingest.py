"""Ingest: a source → sharded TFRecord of ``tf.Example``, statistics, schema and the data gate.

Two streaming passes over the source (profile, then write), so memory stays flat whatever the
dataset's size. Each example lands in train / val / test by a hash of its key, so re-ingesting a
grown dataset keeps every old example in its old split. Shards are written into a temporary
directory and renamed into ``RUN/shards`` only when the data gate passes; ``artifacts/LATEST``
moves to the new run last.

Both passes work on the source's parts (:mod:`pipeline.sources`): here one after the other, or
with ``ingest.runner = "beam"`` in parallel on Apache Beam (:mod:`pipeline.beam_ingest`). The two
runners share :func:`write_part`, so they give the same examples in the same splits and the same
statistics; only the order of examples inside the shards differs.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import shutil
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from pipeline import artifacts as A
from pipeline.artifacts import PipelineError
from pipeline.config import Config
from pipeline.console import Progress
from pipeline.data_validation import Anomaly, histogram_edges, infer_schema, validate
from pipeline.examples import SPLITS, ExampleEncoder, by_split
from pipeline.sources import Source, open_source
from pipeline.statistics import SplitStats

log = logging.getLogger(__name__)
# A validation or test split smaller than this is reported (small_split).
SMALL_SPLIT = 30

MAX_LISTED_BAD = 1000
# zlib level of GZIP shards: 1 is several times faster than the default 6 and the shards, read
# once per epoch at most, are only a little larger.
GZIP_LEVEL = 1


class IngestBlocked(PipelineError):
    """The data gate found blocking anomalies; nothing was published."""

    # Kinds that say "this data does not fit the schema" rather than "this data is broken".
    SCHEMA_KINDS = frozenset({"missing_column", "type_change", "unseen_label", "unseen_category"})

    def __init__(self, anomalies: list[Anomaly], report: Path, schema: Path | None = None):
        self.anomalies = anomalies
        lines = [str(a) for a in anomalies if a.blocking]
        message = (
            f"data gate failed with {len(lines)} blocking anomalies (report: {report}):\n  "
            + "\n  ".join(lines)
        )
        if schema is not None and any(
            a.blocking and a.kind in self.SCHEMA_KINDS for a in anomalies
        ):
            message += (
                f"\nThe data does not match the schema {schema}. If it is another model, give it "
                "its own name (--set model.name=NAME: its own schema, runs and versions); if "
                "this model's data has changed on purpose, delete that schema to infer a new one."
            )
        super().__init__(message)


@dataclass
class IngestResult:
    run_dir: Path
    counts: dict[str, int]
    anomalies: list[Anomaly]
    bad_records: list[dict[str, str]]


@dataclass
class Plan:
    """What the second pass needs, picklable for Beam's workers."""

    source: Source
    kinds: dict[str, str]
    label_kind: str
    label_name: str
    vector_lengths: dict[str, int]
    edges: dict[str, list[float]]
    split: dict[str, float]
    salt: str

    def new_stats(self) -> dict[str, SplitStats]:
        return {s: SplitStats(self.kinds, self.edges, self.label_kind) for s in (*SPLITS, "all")}


@dataclass
class Written:
    """What the second pass over some parts produced besides the examples; parts merge."""

    stats: dict[str, SplitStats]
    counts: dict[str, int] = field(
        default_factory=lambda: {"total": 0, "bad": 0, "missing_label": 0}
    )
    bad: list[dict[str, str]] = field(default_factory=list)
    examples: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))

    def merge(self, other: Written) -> Written:
        for name, acc in self.stats.items():
            acc.merge(other.stats[name])
        for d, o in ((self.counts, other.counts), (self.examples, other.examples)):
            for k, v in o.items():
                d[k] += v
        self.bad.extend(other.bad[: MAX_LISTED_BAD - len(self.bad)])
        return self


def write_part(
    plan: Plan,
    part: Any,
    encoder: ExampleEncoder,
    written: Written,
    progress: Progress | None = None,
) -> Iterator[tuple[str, list[bytes]]]:
    """The second pass over one part: yields (split, serialized examples); statistics, counts
    and bad records go to ``written``."""
    for batch in plan.source.batches(plan.kinds, part, plan.label_kind, plan.vector_lengths):
        written.counts["total"] += batch.rows
        written.counts["bad"] += len(batch.bad)
        written.counts["missing_label"] += batch.missing_label
        for b in batch.bad[: MAX_LISTED_BAD - len(written.bad)]:
            written.bad.append({"origin": b.origin, "reason": b.reason})
        written.stats["all"].add_batch(batch)
        for split, sub in by_split(batch, plan.split, plan.salt).items():
            if len(sub):
                yield split, encoder.encode(sub)
                written.stats[split].add_batch(sub)
                written.examples[split] += len(sub)
        if progress is not None:
            progress.update(batch.rows)
            if written.counts["bad"]:
                progress.postfix = f"{written.counts['bad']} bad"


def _masked_crcs(data: list[bytes]) -> np.ndarray:
    """TFRecord's masked CRC-32C of each item, as little-endian uint32."""
    crc = np.fromiter(map(google_crc32c.value, data), dtype=np.uint64, count=len(data))
    return ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF).astype("<u4")


_HEADS: dict[int, bytes] = {}  # record length → its 12-byte TFRecord header


def tfrecord_frames(records: list[bytes]) -> bytes:
    """Records in TFRecord framing: length, its masked CRC-32C, data, the data's masked CRC."""
    heads = []
    for n in map(len, records):
        head = _HEADS.get(n)
        if head is None:
            length = struct.pack("<Q", n)
            head = _HEADS[n] = length + _masked_crcs([length]).tobytes()
        heads.append(head)
    tails = _masked_crcs(records).tobytes()
    crcs = [tails[i : i + 4] for i in range(0, len(tails), 4)]
    return b"".join(itertools.chain.from_iterable(zip(heads, records, crcs)))


class _ShardWriter:
    """``SPLIT-00000.tfrecord.gz`` … of at most ``shard_size`` records each.

    Written here rather than with ``tf.io.TFRecordWriter`` so that ingest workers never import
    TensorFlow; TensorFlow reads the files (GZIP: one gzip stream per file) as its own.
    """

    def __init__(self, directory: Path, split: str, shard_size: int, compression: str):
        self.directory = directory
        self.split = split
        self.shard_size = shard_size
        self.gzip = compression == "GZIP"
        self.suffix = ".tfrecord.gz" if self.gzip else ".tfrecord"
        self.index = 0
        self.in_shard = 0
        self.file: Any = None
        self.count = 0

    def write(self, records: list[bytes]) -> None:
        while records:
            if self.file is None or self.in_shard >= self.shard_size:
                self.close()
                path = self.directory / f"{self.split}-{self.index:05d}{self.suffix}"
                self.file = gzip.open(path, "wb", GZIP_LEVEL) if self.gzip else open(path, "wb")  # noqa: SIM115
                self.index += 1
                self.in_shard = 0
            room = self.shard_size - self.in_shard
            self.file.write(tfrecord_frames(records[:room]))
            self.in_shard += len(records[:room])
            self.count += len(records[:room])
            records = records[room:]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def ingest(cfg: Config) -> IngestResult:
    """Run the data stage and publish a new run directory.

    Raises:
        PipelineError: the source or configuration is unusable.
        IngestBlocked: the data gate found blocking anomalies (report written, nothing published).
    """
    run_id = cfg.run_id or A.new_run_id()
    run_dir = cfg.model_dir / run_id
    if (run_dir / A.SHARDS).exists():
        raise PipelineError(f"{run_dir / A.SHARDS}: already exists; runs are never overwritten")
    source = open_source(cfg.data)
    schema_path = cfg.schema_path
    schema = A.read_json(schema_path) if schema_path.exists() else None
    if schema is not None and schema.get("task") != cfg.model.task:
        raise PipelineError(
            f"{schema_path}: schema was inferred for task {schema.get('task')!r} but "
            f"model.task is {cfg.model.task!r}; another model needs its own name (--set "
            "model.name=NAME: its own schema, runs and versions), or delete the schema to "
            "infer a new one"
        )
    previous = _previous_stats(cfg.model_dir)
    # Worker processes for both passes of a large local source (None: this process alone).
    pool = None if cfg.ingest.runner == "beam" else _pool(len(source.parts()))
    try:
        return _ingest(cfg, run_id, run_dir, source, schema, previous, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _ingest(
    cfg: Config,
    run_id: str,
    run_dir: Path,
    source: Source,
    schema: dict[str, Any] | None,
    previous: dict[str, Any] | None,
    pool: Any,
) -> IngestResult:
    schema_path = cfg.schema_path
    log.info("profiling %s", cfg.data.source)
    known = schema["features"] if schema else None
    if cfg.ingest.runner == "beam":
        from pipeline import beam_ingest

        profile = beam_ingest.profile(source, known, cfg.ingest.beam_args)
    else:
        profile = _profile_local(source, known, pool)
    for name in profile.kinds:
        if name == cfg.data.label_column:
            raise PipelineError(f"feature {name!r} has the same name as the label")
    # Write the columns the schema knows; a first ingest takes the data's own kinds.
    if schema is not None:
        kinds = {n: e["kind"] for n, e in schema["features"].items() if n in profile.kinds}
    else:
        kinds = dict(profile.kinds)
    label_kind = "float" if cfg.model.task == "regression" else "string"
    vector_len = {
        n: e["length"] for n, e in (schema or {}).get("features", {}).items() if "length" in e
    } or dict(profile.vector_lengths)
    plan = Plan(
        source,
        kinds,
        label_kind,
        cfg.data.label_column,
        vector_len,
        histogram_edges(kinds, profile, schema),
        cfg.data.split,
        cfg.data.seed,
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".shards-tmp-{run_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if cfg.ingest.runner == "beam":
            from pipeline import beam_ingest

            written = beam_ingest.write(plan, tmp, cfg.data, profile.rows, cfg.ingest.beam_args)
        else:
            written = _write_local(plan, tmp, cfg, profile.rows, pool)
        acc, counts, bad = written.stats, written.counts, written.bad
        examples = written.examples

        stats = _stats_json(acc, vector_len)
        first = schema is None
        if first:
            schema = infer_schema(cfg, profile, stats["all"], plan.edges)
        assert schema is not None
        anomalies = validate(cfg, profile, schema, stats["all"], previous, counts)
        for a in anomalies:
            log.warning("%s", a)
        for s in SPLITS:
            if cfg.data.split[s] > 0 and examples[s] == 0:
                anomalies.append(
                    Anomaly("empty_split", s, f"split {s!r} received no examples", True)
                )
            elif s != "train" and 0 < examples[s] < SMALL_SPLIT:
                small = Anomaly(
                    "small_split",
                    s,
                    f"split {s!r} has only {examples[s]} examples: its metrics (and "
                    "early stopping, thresholds, gates that use it) mean little; more data or "
                    "a larger data.split share",
                    "small_split" in cfg.validation.blocking,
                    {"count": examples[s]},
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
            raise IngestBlocked(anomalies, run_dir / A.ANOMALIES, None if first else schema_path)
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
            "examples": examples,
            "runner": cfg.ingest.runner,
        },
    )
    A.atomic_write_text(cfg.model_dir / A.LATEST, run_id + "\n")
    return IngestResult(run_dir, examples | counts, anomalies, bad)


def _pool(parts: int) -> Any:
    """Worker processes for a source of several parts (one per core), else None.

    Forked (milliseconds) while this process has not started TensorFlow, whose threads a fork
    must not copy; spawned otherwise (each worker then imports the ingest, about 0.5 s).
    """
    import concurrent.futures
    import multiprocessing

    from pipeline.sources import _cores

    workers = min(parts, _cores())
    if workers < 2:
        return None
    context = multiprocessing.get_context("fork" if "tensorflow" not in sys.modules else "spawn")
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)


def _profile_local(source: Source, known: dict[str, Any] | None, pool: Any) -> Any:
    if pool is None:
        return source.profile(known)
    parts = source.parts()
    accs = list(pool.map(source.profile_part, parts, [known] * len(parts)))
    acc = accs[0]
    for other in accs[1:]:
        acc.merge(other)
    return source.finish_profile(acc, known)


def _write_shards(
    plan: Plan, parts: list[Any], directory: Path, cfg: Config, progress: Progress | None = None
) -> Written:
    """The parts' shards into ``directory`` (SPLIT-00000… of ``data.shard_size``)."""
    writers = {
        s: _ShardWriter(directory, s, cfg.data.shard_size, cfg.data.compression) for s in SPLITS
    }
    encoder = ExampleEncoder(plan.label_name, plan.label_kind, plan.kinds)
    written = Written(plan.new_stats())
    try:
        for part in parts:
            for split, records in write_part(plan, part, encoder, written, progress):
                writers[split].write(records)
    finally:
        for w in writers.values():
            w.close()
    return written


def _write_local(plan: Plan, tmp: Path, cfg: Config, rows: int, pool: Any) -> Written:
    """The second pass in this process, or over the parts on one worker process per core; the
    shards are then renamed part by part into one sequence per split, so the result does not
    depend on how many workers ran."""
    parts = plan.source.parts()
    progress = Progress("ingest", rows or None, "rows")
    try:
        if pool is None:
            return _write_shards(plan, parts, tmp, cfg, progress)
        written = Written(plan.new_stats())
        dirs = [tmp / f".part-{i:05d}" for i in range(len(parts))]
        for d in dirs:
            d.mkdir()
        futures = [pool.submit(_write_shards, plan, [p], d, cfg) for p, d in zip(parts, dirs)]
        for future in futures:  # in order: the merged statistics are the same every run
            part = future.result()
            written.merge(part)
            progress.update(part.counts["total"])
        index = dict.fromkeys(SPLITS, 0)
        for d in dirs:
            for split in SPLITS:
                for f in sorted(d.glob(f"{split}-*")):
                    f.rename(tmp / f"{split}-{index[split]:05d}{f.name[f.name.index('.') :]}")
                    index[split] += 1
            d.rmdir()
        return written
    finally:
        progress.close()


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
