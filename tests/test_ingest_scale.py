"""Ingest at scale: the direct tf.Example encoder, pyarrow's CSV path against the row-by-row one,
blocks and parts cut between rows, and the Beam runner against the local one."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from pipeline.examples import ExampleEncoder
from pipeline.ingest import ingest
from pipeline.sources import Batch, CsvPart, CsvSource, batch_records, open_source
from tests.conftest import config, make_images, tabular_rows, write_csv

HEADER = ["x1", "x2", "color", "label"]


def as_dict(data: bytes) -> dict[str, list[Any]]:
    ex = tf.train.Example.FromString(data)
    out = {}
    for name, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        values = list(getattr(feat, kind).value)
        out[name] = [("nan" if isinstance(v, float) and math.isnan(v) else v) for v in values]
    return out


def reference(label: Any, label_name: str, features: dict[str, Any], kinds: dict[str, str]):
    """The example the protobuf library builds, feature by feature."""
    feats = {}
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
    ex = tf.train.Example(features=tf.train.Features(feature=feats))
    return as_dict(ex.SerializeToString())


@pytest.mark.parametrize("label_kind", ["string", "float"])
def test_encoder_parses_like_the_protobuf_library(label_kind):
    rng = np.random.default_rng(0)
    n = 300
    kinds = {"a": "float", "b": "float", "city": "string", "v": "vector", "img": "image"}
    a = rng.normal(size=n) * 1e3
    a[::7] = np.nan
    b = rng.normal(size=n)
    b_present = rng.random(n) > 0.2
    cities = [None if i % 5 == 0 else ["oslo", "lima", "pärnu", "x" * 300][i % 4] for i in range(n)]
    vectors = [None if i % 11 == 0 else rng.normal(size=3) for i in range(n)]
    images = [rng.integers(0, 255, (4, 4, 1), dtype=np.uint8) for _ in range(n)]
    labels: Any = (
        rng.normal(size=n) if label_kind == "float" else [f"class-{i % 3}" for i in range(n)]
    )
    batch = Batch(
        [b"k%d" % i for i in range(n)],
        labels,
        {
            "a": (a, np.ones(n, dtype=bool)),
            "b": (b, b_present),
            "city": cities,
            "v": vectors,
            "img": images,
        },
    )
    got = ExampleEncoder("label", label_kind, kinds).encode(batch)
    for i in range(n):
        features = {
            "a": a[i],
            "b": b[i] if b_present[i] else None,
            "city": cities[i],
            "v": vectors[i],
            "img": images[i],
        }
        label = float(labels[i]) if label_kind == "float" else labels[i]
        assert as_dict(got[i]) == reference(label, "label", features, kinds), i


def tricky_csv(path: Path, rows: int = 400) -> Path:
    """Quotes, embedded delimiters and newlines, spaces, missing values, a BOM, non-ASCII."""
    lines = ["\ufeffx1,x2,color,label"]
    rng = np.random.default_rng(1)
    for i in range(rows):
        x1 = "" if i % 13 == 0 else f" {rng.normal():.4f} "
        x2 = f"{rng.normal():.3e}" if i % 17 else "nan"
        color = ['"red, dark"', "green", '"blue\nish"', "  pärnu ", '"say ""hi"""', ""][i % 6]
        label = "yes" if i % 3 else ("no" if i % 19 else "")
        lines.append(f"{x1},{x2},{color},{label}")
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    return path


def _same_batches(one: list[Batch], two: list[Batch]) -> None:
    def flat(batches: list[Batch]) -> dict[str, Any]:
        out: dict[str, Any] = {"keys": [], "labels": [], "missing": 0, "rows": 0}
        for b in batches:
            out["keys"] += b.keys
            out["labels"] += list(b.labels)
            out["missing"] += b.missing_label
            out["rows"] += b.rows
            for name, col in b.columns.items():
                if isinstance(col, tuple):
                    vals = np.where(col[1], col[0], -999.0)
                    out.setdefault(name, []).extend(np.nan_to_num(vals, nan=-1.5).tolist())
                else:
                    out.setdefault(name, []).extend(col)
        return out

    assert flat(one) == flat(two)


def test_pyarrow_and_row_by_row_readings_agree(tmp_path):
    path = tricky_csv(tmp_path / "t.csv")
    cfg = config(tmp_path, f'data.source="{path}"', "model.task=binary").data
    src = CsvSource(path, cfg)
    assert src.header == HEADER
    (part,) = src.parts()
    (block, line), *_ = src._blocks(part)
    assert line == 2
    fast_profile = src._arrow_profile(block)
    assert fast_profile is not None
    slow_profile = src._python_profile(block, line)
    assert src.finish_profile(fast_profile, None) == src.finish_profile(slow_profile, None)
    kinds = src.finish_profile(fast_profile, None).kinds
    assert kinds == {"x1": "float", "x2": "float", "color": "string"}
    fast = src._arrow_batch(block, kinds, "string")
    assert fast is not None
    slow = list(batch_records(src._python_records(block, line, kinds), kinds, "string", {}))
    assert len(fast) > 300 and fast.missing_label > 0
    _same_batches([fast], slow)


def test_blocks_and_parts_cut_between_rows_and_keep_line_numbers(tmp_path, monkeypatch):
    path = tricky_csv(tmp_path / "t.csv", rows=300)
    with open(path, "a", encoding="utf-8") as f:
        f.write("1.0,2.0,red\r\n")  # a short row after 1 + 300 lines + 50 embedded newlines
    cfg = config(tmp_path, f'data.source="{path}"', "model.task=binary").data
    whole = CsvSource(path, cfg)
    kinds = whole.profile(None).kinds
    expected = list(whole.batches(kinds, whole.parts()[0], "string", {}))
    monkeypatch.setattr(CsvSource, "BLOCK", 97)
    monkeypatch.setattr(CsvSource, "PART", 1000)
    cut = CsvSource(path, cfg)
    parts = cut.parts()
    assert len(parts) > 5 and parts[0].start == whole.data_start
    assert all(a.end == b.start for a, b in itertools.pairwise(parts))
    assert cut.profile(None).kinds == kinds
    got = [b for p in parts for b in cut.batches(kinds, p, "string", {})]
    _same_batches(got, expected)
    bad = [b for batch in got for b in batch.bad]
    assert [(b.origin, b.reason) for b in bad] == [(f"{path}:352", "expected 4 fields, got 3")]
    assert isinstance(parts[0], CsvPart)


# --- Beam ------------------------------------------------------------------------------------


def _examples(run_dir: Path) -> dict[str, list[str]]:
    out = {}
    for split in ("train", "val", "test"):
        files = sorted(str(p) for p in (run_dir / "shards").glob(f"{split}-*"))
        out[split] = sorted(
            json.dumps(as_dict(r.numpy()), sort_keys=True, default=str)
            for r in tf.data.TFRecordDataset(files, compression_type="GZIP")
        )
    return out


def _close(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-9), path
    else:
        assert a == b, path


def _tfrecord_source(path: Path) -> Path:
    path.mkdir()
    rng = np.random.default_rng(3)
    for f in range(3):
        opts = tf.io.TFRecordOptions(compression_type="GZIP")
        with tf.io.TFRecordWriter(str(path / f"part-{f}.tfrecord.gz"), opts) as w:
            for i in range(40):
                feature = {
                    "age": tf.train.Feature(float_list=tf.train.FloatList(value=[rng.normal()])),
                    "v": tf.train.Feature(float_list=tf.train.FloatList(value=rng.normal(size=3))),
                    "label": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[b"p" if i % 2 else b"q"])
                    ),
                }
                ex = tf.train.Example(features=tf.train.Features(feature=feature))
                w.write(ex.SerializeToString())
    return path


@pytest.mark.parametrize("kind", ["csv", "images", "tfrecord"])
def test_beam_ingest_equals_local_ingest(tmp_path, kind, monkeypatch):
    if kind == "csv":
        source = write_csv(tmp_path / "d.csv", HEADER, tabular_rows(600, seed=4))
        monkeypatch.setattr(CsvSource, "BLOCK", 2000)
        monkeypatch.setattr(CsvSource, "PART", 4000)  # several parts, read by several workers
        beam_args = (
            '["--runner=DirectRunner", "--direct_num_workers=2", '
            '"--direct_running_mode=multi_processing"]'
        )
        task = "model.task=binary"
    elif kind == "images":
        source = make_images(tmp_path / "img", per_class=15)
        beam_args = '["--runner=DirectRunner"]'
        task = "model.task=multiclass"
    else:
        source = _tfrecord_source(tmp_path / "tfr")
        beam_args = '["--runner=DirectRunner"]'
        task = "model.task=binary"
    common = [f'data.source="{source}"', task, "data.shard_size=50"]
    local = ingest(config(tmp_path / "local", *common))
    beam = ingest(
        config(tmp_path / "beam", *common, "ingest.runner=beam", f"ingest.beam_args={beam_args}")
    )
    if kind == "csv":
        assert len(open_source(config(tmp_path, *common).data).parts()) > 2
    assert beam.counts == local.counts
    assert _examples(beam.run_dir) == _examples(local.run_dir)
    for name in ("stats.json", "schema.json", "anomalies.json", "labels.txt"):
        if (local.run_dir / name).exists():
            one, two = (r.run_dir / name for r in (local, beam))
            if name.endswith(".json"):
                _close(json.loads(one.read_text()), json.loads(two.read_text()), name)
            else:
                assert one.read_text() == two.read_text()
    # The same layout: SPLIT-00000.tfrecord.gz … (the number of shards may differ).
    for run in (local, beam):
        names = [p.name for p in (run.run_dir / "shards").iterdir()]
        assert all(re.fullmatch(r"(train|val|test)-\d{5}\.tfrecord\.gz", n) for n in names)
        assert {n.split("-")[0] for n in names} == {"train", "val", "test"}
    assert json.loads((beam.run_dir / "ingest.json").read_text())["runner"] == "beam"
