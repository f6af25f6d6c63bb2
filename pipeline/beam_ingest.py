"""The ingest on Apache Beam (``--set ingest.runner=beam``), for data beyond one machine.

The same two passes as the local ingest, each a Beam pipeline over the source's parts (CSV byte
ranges, groups of image files, TFRecord files):

1. profile: every part's :class:`~pipeline.sources.ProfileAcc`, combined into one; the launcher
   turns it into the profile (column kinds, image geometry) exactly as the local ingest does.
2. write: every part through :func:`pipeline.ingest.write_part` (the local ingest's own code),
   examples to ``WriteToTFRecord`` per split, statistics and counts combined into one.

The launcher then renames the shards to the local layout (``train-00000.tfrecord.gz`` …) and
runs the schema checks, the data gate and the atomic publication itself. ``ingest.beam_args``
are Beam's pipeline options. The artifacts directory must be a file system every worker and the
launcher see (local disk with the DirectRunner; NFS, a ReadWriteMany volume or a GCS FUSE mount
on a cluster).
"""

from __future__ import annotations

import logging
import math
import pickle
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import DataConfig
from pipeline.examples import SPLITS
from pipeline.sources import Profile, ProfileAcc, Source

if TYPE_CHECKING:
    from pipeline.ingest import Plan, Written

log = logging.getLogger(__name__)


def _options(beam_args: Sequence[str]) -> Any:
    from apache_beam.options.pipeline_options import PipelineOptions

    # Beam's INFO lines (workers starting, bundles) drown the ingest's own; -v shows them.
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("apache_beam").setLevel(logging.WARNING)

    return PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])


def _save(value: Any, path: str) -> None:
    with open(path, "wb") as f:
        pickle.dump(value, f)


def _load(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)  # our own file, written by this pipeline


def _merge_all(items: Any) -> Any:
    items = list(items)
    out = items[0]
    for item in items[1:]:
        out.merge(item)
    return out


def profile(source: Source, known: dict[str, Any] | None, beam_args: Sequence[str]) -> Profile:
    """The first pass on Beam; the result is the local :meth:`Source.profile`'s."""
    import tempfile

    import apache_beam as beam

    parts = source.parts()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "profile.pickle")
        with beam.Pipeline(options=_options(beam_args)) as p:
            (
                p
                | "parts" >> beam.Create(parts, reshuffle=len(parts) > 1)
                | "profile" >> beam.Map(lambda part, s=source, k=known: s.profile_part(part, k))
                | "combine" >> beam.CombineGlobally(_merge_all)
                | "save" >> beam.Map(_save, out)
            )
        acc: ProfileAcc = _load(Path(out))
    return source.finish_profile(acc, known)


class _WritePart:
    """One part through the local ingest's ``write_part``: (split, example) pairs, and one
    ``Written`` per part on the ``written`` output."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self, part: Any) -> Iterator[Any]:
        import apache_beam as beam

        from pipeline.examples import ExampleEncoder
        from pipeline.ingest import Written, write_part

        plan = self.plan
        encoder = ExampleEncoder(plan.label_name, plan.label_kind, plan.kinds)
        written = Written(plan.new_stats())
        for split, records in write_part(plan, part, encoder, written):
            for record in records:
                yield split, record
        yield beam.pvalue.TaggedOutput("written", written)


def write(plan: Plan, tmp: Path, data: DataConfig, rows: int, beam_args: Sequence[str]) -> Written:
    """The second pass on Beam: shards into ``tmp`` (local names), the rest returned."""
    import apache_beam as beam
    from apache_beam.io.filesystem import CompressionTypes

    gzip = data.compression == "GZIP"
    suffix = ".tfrecord.gz" if gzip else ".tfrecord"
    beam_dir = tmp / ".beam"
    beam_dir.mkdir()
    out = str(beam_dir / "written.pickle")
    parts = plan.source.parts()
    with beam.Pipeline(options=_options(beam_args)) as p:
        results = (
            p
            | "parts" >> beam.Create(parts, reshuffle=len(parts) > 1)
            | "write part" >> beam.FlatMap(_WritePart(plan)).with_outputs("written", main="ex")
        )
        for split in SPLITS:
            if data.split[split] <= 0:
                continue
            shards = max(1, math.ceil(rows * data.split[split] / data.shard_size))
            (
                results.ex
                | f"only {split}" >> beam.Filter(lambda kv, s=split: kv[0] == s)
                | f"values {split}" >> beam.Map(lambda kv: kv[1])
                | f"write {split}"
                >> beam.io.WriteToTFRecord(
                    str(beam_dir / split),
                    file_name_suffix=suffix,
                    num_shards=shards,
                    compression_type=(
                        CompressionTypes.GZIP if gzip else CompressionTypes.UNCOMPRESSED
                    ),
                )
            )
        (
            results.written
            | "combine" >> beam.CombineGlobally(_merge_all)
            | "save" >> beam.Map(_save, out)
        )
    written: Written = _load(Path(out))
    # The local layout: SPLIT-00000.tfrecord.gz …, empty shards dropped.
    for split in SPLITS:
        files = sorted(beam_dir.glob(f"{split}-*-of-*{suffix}"))
        index = 0
        for f in files:
            if _has_records(f, gzip):
                f.rename(tmp / f"{split}-{index:05d}{suffix}")
                index += 1
    shutil.rmtree(beam_dir)  # empty shards, the pickle, anything a runner left behind
    return written


def _has_records(path: Path, gzip: bool) -> bool:
    if not gzip:
        return path.stat().st_size > 0
    import gzip as gz

    with gz.open(path, "rb") as f:
        return bool(f.read(1))
