"""The data stage: every source, the stable split, schema inference, each anomaly kind and
bad-record handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from pipeline.__main__ import main
from pipeline.artifacts import PipelineError
from pipeline.examples import split_indices
from pipeline.ingest import IngestBlocked, ingest
from tests.conftest import config, make_images, tabular_rows, write_csv

HEADER = ["x1", "x2", "color", "label"]


def read_split(run_dir: Path, split: str) -> list[dict]:
    files = sorted(str(p) for p in (run_dir / "shards").glob(f"{split}-*"))
    out = []
    for raw in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        ex = tf.train.Example.FromString(raw.numpy())
        row = {}
        for k, f in ex.features.feature.items():
            kind = f.WhichOneof("kind")
            row[k] = list(getattr(f, kind).value)
        out.append(row)
    return out


def kinds(result) -> dict[str, list]:
    out: dict[str, list] = {}
    for a in result.anomalies:
        out.setdefault(a.kind, []).append(a)
    return out


def test_image_folder(tmp_path, image_dir):
    cfg = config(tmp_path, f'data.source="{image_dir}"')
    result = ingest(cfg)
    counts = result.counts
    assert counts["train"] + counts["val"] + counts["test"] == 24
    run = result.run_dir
    assert (run / "labels.txt").read_text() == "a\nb\n"
    schema = json.loads((run / "schema.json").read_text())
    assert schema["features"]["image"] == {"kind": "image", "shape": [8, 8, 1]}
    stats = json.loads((run / "stats.json").read_text())
    img = stats["all"]["features"]["image"]
    assert img["sizes"] == {"8x8": 24} and img["modes"] == {"L": 24}
    assert sum(stats[s]["examples"] for s in ("train", "val", "test")) == 24
    rows = read_split(run, "train")
    assert len(rows[0]["image"][0]) == 64
    assert (tmp_path / "artifacts" / "m" / "LATEST").read_text().strip() == run.name


def test_images_are_resized_and_converted(tmp_path):
    from PIL import Image

    root = tmp_path / "rgb"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20 + i, 10), (i * 40, 0, 0)).save(root / cls / f"{i}.jpg")
        Image.new("RGB", (5, 5)).save(root / cls / "x.bmp")
        Image.new("P", (5, 5)).save(root / cls / "x.gif")
    (root / "cat" / "notes.txt").write_text("not an image")
    cfg = config(tmp_path, f'data.source="{root}"', "data.image_size=[4,6]", "data.channels=3")
    result = ingest(cfg)
    assert result.counts["bad"] == 0
    assert sum(result.counts[s] for s in ("train", "val", "test")) == 16
    stats = json.loads((result.run_dir / "stats.json").read_text())
    assert stats["all"]["features"]["image"]["shape"] == [4, 6, 3]
    assert stats["all"]["features"]["image"]["width"] == {"min": 5.0, "max": 25.0}


def test_csv_types_and_stats(tmp_path, binary_csv):
    cfg = config(tmp_path, f'data.source="{binary_csv}"', "model.task=binary")
    result = ingest(cfg)
    schema = json.loads((result.run_dir / "schema.json").read_text())
    assert {k: v["kind"] for k, v in schema["features"].items()} == {
        "x1": "float",
        "x2": "float",
        "color": "string",
    }
    assert schema["features"]["color"]["vocabulary"] == ["blue", "green", "red"]
    stats = json.loads((result.run_dir / "stats.json").read_text())["all"]
    x1 = stats["features"]["x1"]
    assert x1["count"] == 120 and x1["missing"] == 0
    assert x1["min"] <= x1["mean"] <= x1["max"] and x1["std"] > 0
    assert sum(stats["label"]["classes"].values()) == 120
    # The positive class of a binary task is class id 1 (last line).
    assert (result.run_dir / "labels.txt").read_text().splitlines() == ["no", "yes"]


def test_csv_missing_values_are_counted(tmp_path):
    rows = tabular_rows(60)
    rows[3][0] = ""
    rows[4][2] = ""
    path = write_csv(tmp_path / "m.csv", HEADER, rows)
    result = ingest(config(tmp_path, f'data.source="{path}"', "model.task=binary"))
    stats = json.loads((result.run_dir / "stats.json").read_text())["all"]["features"]
    assert stats["x1"]["missing"] == 1 and stats["color"]["missing"] == 1


def test_na_markers_are_missing_values_before_types_are_inferred(tmp_path):
    """Issue #15 point 5: "NA" in a numeric column keeps it numeric; the rows stay, and the
    missing values are counted in anomalies.json."""
    rows = [
        [("NA" if i % 14 == 0 else i * 0.5), "?" if i % 9 == 0 else "red", "yes" if i % 2 else "no"]
        for i in range(100)
    ]
    path = write_csv(tmp_path / "na.csv", ["x", "color", "label"], rows)
    result = ingest(config(tmp_path, f'data.source="{path}"', "model.task=binary"))
    schema = json.loads((result.run_dir / "schema.json").read_text())
    assert schema["features"]["x"]["kind"] == "float"
    assert sum(result.counts[s] for s in ("train", "val", "test")) == 100
    stats = json.loads((result.run_dir / "stats.json").read_text())["all"]["features"]
    assert stats["x"]["missing"] == 8 and stats["color"]["missing"] == 12
    assert "?" not in stats["color"]["values"]
    missing = {a.feature: a for a in kinds(result)["missing_values"]}
    assert missing["x"].details["count"] == 8 and not missing["x"].blocking
    assert "train mean" in missing["x"].message
    report = json.loads((result.run_dir / "anomalies.json").read_text())
    assert {a["kind"] for a in report["anomalies"]} >= {"missing_values"}


def test_npz_vectors_and_images(tmp_path):
    rng = np.random.default_rng(0)
    np.savez_compressed(tmp_path / "v.npz", x=rng.normal(size=(50, 5)), y=rng.integers(0, 3, 50))
    result = ingest(config(tmp_path, f'data.source="{tmp_path / "v.npz"}"', "run_id=vec"))
    schema = json.loads((result.run_dir / "schema.json").read_text())
    assert schema["features"]["x"]["kind"] == "vector" and schema["features"]["x"]["length"] == 5
    assert (result.run_dir / "labels.txt").read_text().split() == ["0", "1", "2"]

    np.savez(
        tmp_path / "i.npz",
        x=rng.integers(0, 255, (30, 6, 6), dtype=np.uint8),
        y=np.array(["u", "v"] * 15),
    )
    cfg = config(tmp_path / "img", f'data.source="{tmp_path / "i.npz"}"', "data.image_size=[6,6]")
    result = ingest(cfg)
    rows = read_split(result.run_dir, "train")
    assert len(rows[0]["image"][0]) == 36


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 2)), y=np.zeros(4))
    with pytest.raises(PipelineError, match="x has 3 rows but y has 4"):
        ingest(config(tmp_path, f'data.source="{tmp_path / "bad.npz"}"'))
    np.savez(tmp_path / "noy.npz", x=np.zeros((3, 2)))
    with pytest.raises(PipelineError, match="no array named 'y'"):
        ingest(config(tmp_path, f'data.source="{tmp_path / "noy.npz"}"'))


def test_tfrecord_source(tmp_path):
    path = tmp_path / "in.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(40):
            ex = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "age": tf.train.Feature(float_list=tf.train.FloatList(value=[float(i)])),
                        "n": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 3])),
                        "city": tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[b"x" if i % 2 else b"y"])
                        ),
                        "label": tf.train.Feature(
                            bytes_list=tf.train.BytesList(value=[b"p" if i % 2 else b"q"])
                        ),
                    }
                )
            )
            w.write(ex.SerializeToString())
    result = ingest(config(tmp_path, f'data.source="{path}"'))
    schema = json.loads((result.run_dir / "schema.json").read_text())
    assert {k: v["kind"] for k, v in schema["features"].items()} == {
        "age": "float",
        "n": "float",
        "city": "string",
    }
    assert sum(result.counts[s] for s in ("train", "val", "test")) == 40


def test_split_is_stable_when_data_grows(tmp_path):
    old = tabular_rows(150, seed=1)
    new = tabular_rows(80, seed=2)
    first = write_csv(tmp_path / "a.csv", HEADER, old)
    r1 = ingest(config(tmp_path, f'data.source="{first}"', "model.task=binary", "run_id=one"))
    grown = list(new[:40]) + list(reversed(old)) + list(new[40:])  # reordered and grown
    second = write_csv(tmp_path / "b.csv", HEADER, grown)
    r2 = ingest(config(tmp_path, f'data.source="{second}"', "model.task=binary", "run_id=two"))

    def where(run_dir):
        out = {}
        for split in ("train", "val", "test"):
            for row in read_split(run_dir, split):
                out[(round(row["x1"][0], 4), round(row["x2"][0], 4))] = split
        return out

    before, after = where(r1.run_dir), where(r2.run_dir)
    assert len(before) == 150 and len(after) == 230
    assert all(after[k] == s for k, s in before.items())
    assert {"train", "val", "test"} <= set(before.values())


def test_split_follows_ratios_and_depends_only_on_the_key():
    split = {"train": 0.7, "val": 0.1, "test": 0.2}
    keys = [str(i).encode() for i in range(20000)]
    got = split_indices(keys, split, "s").tolist()
    assert abs(got.count(0) / 20000 - 0.7) < 0.02
    assert abs(got.count(2) / 20000 - 0.2) < 0.02
    assert split_indices(keys[::-1], split, "s").tolist() == got[::-1]


# --- the data gate on a second ingest ----------------------------------------------------------


def _reingest(tmp_path, header, rows, *overrides):
    base = write_csv(tmp_path / "base.csv", HEADER, tabular_rows(200, seed=3))
    ingest(config(tmp_path, f'data.source="{base}"', "model.task=binary", "run_id=base"))
    path = write_csv(tmp_path / "next.csv", header, rows)
    return ingest(
        config(tmp_path, f'data.source="{path}"', "model.task=binary", "run_id=next", *overrides)
    )


def test_missing_column_blocks(tmp_path):
    rows = [[r[0], r[2], r[3]] for r in tabular_rows(100, seed=4)]
    with pytest.raises(IngestBlocked, match="missing_column x2") as e:
        _reingest(tmp_path, ["x1", "color", "label"], rows)
    next_dir = tmp_path / "artifacts" / "m" / "next"
    assert not (next_dir / "shards").exists()  # nothing half-written
    assert not list(next_dir.glob(".shards-tmp*"))
    report = json.loads((next_dir / "anomalies.json").read_text())
    assert report["anomalies"][0]["kind"] == "missing_column"
    assert (tmp_path / "artifacts" / "m" / "LATEST").read_text().strip() == "base"
    assert e.value.anomalies


def test_new_column_warns(tmp_path):
    rows = [[*r[:3], 1.0, r[3]] for r in tabular_rows(100, seed=4)]
    result = _reingest(tmp_path, ["x1", "x2", "color", "extra", "label"], rows)
    assert "new_column" in kinds(result)
    assert not kinds(result)["new_column"][0].blocking


def test_type_change_blocks(tmp_path):
    rows = [[f"v{i}", *r[1:]] for i, r in enumerate(tabular_rows(100, seed=4))]
    with pytest.raises(IngestBlocked, match="type_change x1: schema says float, data is string"):
        _reingest(tmp_path, HEADER, rows)


def test_nan_and_inf_block(tmp_path):
    rows = tabular_rows(100, seed=4)
    rows[0][0] = "nan"
    rows[1][1] = "inf"
    with pytest.raises(IngestBlocked, match="nan_inf"):
        _reingest(tmp_path, HEADER, rows)


def test_out_of_range_unseen_category_and_drift(tmp_path):
    rows = tabular_rows(100, seed=4)
    for r in rows:
        r[0] = r[0] + 5.0
    rows[0][2] = "purple"
    result = _reingest(tmp_path, HEADER, rows)
    found = kinds(result)
    assert found["out_of_range"][0].feature == "x1"
    assert found["out_of_range"][0].details["schema_max"] < found["out_of_range"][0].details["max"]
    assert found["unseen_category"][0].details["categories"] == ["purple"]
    drifted = {a.feature for a in found["drift"]}
    assert "x1" in drifted and "x2" not in drifted


def test_unseen_label_blocks(tmp_path):
    rows = tabular_rows(100, seed=4)
    rows[5][3] = "maybe"
    with pytest.raises(IngestBlocked, match="unseen_label"):
        _reingest(tmp_path, HEADER, rows)


def test_missing_label_absent_class_and_imbalance(tmp_path):
    rows = [r for r in tabular_rows(300, seed=4) if r[3] == "yes"][:100]
    rows += [r for r in tabular_rows(300, seed=5) if r[3] == "no"][:5]
    rows[0][3] = ""
    result = _reingest(tmp_path, HEADER, rows)
    found = kinds(result)
    assert found["missing_label"][0].details["count"] == 1
    assert found["class_imbalance"][0].details["ratio"] > 10
    only_yes = [r for r in rows if r[3] == "yes"]
    path = write_csv(tmp_path / "yes.csv", HEADER, only_yes)
    # A retrain that lost a class is blocked by default...
    with pytest.raises(IngestBlocked, match="absent_class"):
        ingest(config(tmp_path, f'data.source="{path}"', "model.task=binary", "run_id=yes"))
    # ...and reported with the missing class when the user lets it through.
    result = ingest(
        config(
            tmp_path,
            f'data.source="{path}"',
            "model.task=binary",
            "run_id=yes2",
            'validation.blocking=["missing_column"]',
        )
    )
    assert kinds(result)["absent_class"][0].details["classes"] == ["no"]


def test_each_model_keeps_its_own_schema_runs_and_versions(tmp_path):
    """Issue #15 point 1: after the quick start's model, a user's own CSV in the same project
    (no model.name) becomes its own model, never the first one's; the same model name with
    other data is refused with a message naming the schema file and what to do."""
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate
    from pipeline.export import export
    from pipeline.train import train

    empty = tmp_path / "empty.toml"
    empty.touch()
    base = [
        f'artifacts="{tmp_path / "artifacts"}"',
        f'export.model_base_path="{tmp_path / "models"}"',
        "train.epochs=2",
        "tune.enabled=false",
    ]
    digits = load_config(empty, [*base, f'data.source="{make_images(tmp_path / "digits")}"'])
    ingest(digits)
    penguins_csv = write_csv(tmp_path / "penguins.csv", HEADER, tabular_rows(120))
    penguins = load_config(empty, [*base, f'data.source="{penguins_csv}"', "model.task=binary"])
    assert (digits.model.name, penguins.model.name) == ("digits", "penguins")
    result = ingest(penguins)
    assert not [a for a in result.anomalies if a.blocking]
    assert result.run_dir.parent == tmp_path / "artifacts" / "penguins"
    schemas = {p.parent.name for p in (tmp_path / "artifacts").glob("*/schema.json")}
    assert schemas == {"digits", "penguins"}
    train(penguins)
    evaluate(penguins)
    assert Path(export(penguins)).parent == tmp_path / "models" / "penguins"
    assert not (tmp_path / "models" / "digits").exists()

    mixed_up = [*base, f'data.source="{penguins_csv}"', "model.name=digits"]
    with pytest.raises(PipelineError, match=r"schema.json: .*--set model.name=NAME"):
        ingest(load_config(empty, [*mixed_up, "model.task=binary"]))
    with pytest.raises(IngestBlocked) as info:
        ingest(load_config(empty, mixed_up))
    message = str(info.value)
    assert str(tmp_path / "artifacts" / "digits" / "schema.json") in message
    assert "--set model.name=NAME" in message and "delete that schema" in message


def test_data_source_must_be_set(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.touch()
    from pipeline.config import load_config

    with pytest.raises(PipelineError, match="data.source: not set; pass --set data.source=PATH"):
        ingest(load_config(empty, [f'artifacts="{tmp_path}"']))


def test_blocking_kinds_are_configurable(tmp_path):
    rows = tabular_rows(100, seed=4)
    rows[0][2] = "purple"
    with pytest.raises(IngestBlocked, match="unseen_category"):
        _reingest(tmp_path, HEADER, rows, 'validation.blocking=["unseen_category"]')


# --- bad records ----------------------------------------------------------------------------


def test_bad_images_are_listed_and_skipped(tmp_path):
    root = make_images(tmp_path / "imgs", per_class=60)
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = (root / "b" / "000.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    result = ingest(config(tmp_path, f'data.source="{root}"', "data.max_bad_fraction=0.05"))
    assert result.counts["bad"] == 2
    origins = sorted(Path(b["origin"]).name for b in result.bad_records)
    assert origins == ["corrupt.png", "truncated.png"]
    report = json.loads((result.run_dir / "anomalies.json").read_text())
    assert len(report["bad_records"]) == 2


def test_too_many_bad_records_fail(tmp_path):
    root = make_images(tmp_path / "imgs", per_class=10)
    for i in range(3):
        (root / "a" / f"bad{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(IngestBlocked, match="bad_records"):
        ingest(config(tmp_path, f'data.source="{root}"'))
    assert not (tmp_path / "artifacts" / "m" / "LATEST").exists()


def test_bad_csv_rows_name_the_line(tmp_path):
    rows = tabular_rows(300, seed=6)
    path = tmp_path / "bad.csv"
    write_csv(path, HEADER, rows)
    lines = path.read_text().splitlines()
    lines[10] = "1.0,2.0,red"  # short row (file line 11)
    lines[20] = "abc,2.0,red,yes"  # unparsable number (file line 21)
    path.write_text("\n".join(lines) + "\n")
    result = ingest(config(tmp_path, f'data.source="{path}"', "model.task=binary"))
    assert {(b["origin"], b["reason"]) for b in result.bad_records} == {
        (f"{path}:11", "expected 4 fields, got 3"),
        (f"{path}:21", "column 'x1': cannot parse 'abc' as a number"),
    }


def test_csv_encoding_and_delimiter_errors_say_where_and_what(tmp_path):
    rows = tabular_rows(200, seed=6)
    path = write_csv(tmp_path / "latin.csv", HEADER, rows)
    data = path.read_bytes().splitlines(keepends=True)
    data[121] = data[121].replace(b"red", b"r\xe9d").replace(b"blue", b"bl\xe9e")
    data[121] = data[121].replace(b"green", b"gr\xe9en")
    path.write_bytes(b"".join(data))
    result = ingest(config(tmp_path, f'data.source="{path}"', "model.task=binary"))
    assert [(b["origin"], b["reason"]) for b in result.bad_records] == [
        (f"{path}:122", "not valid UTF-8 (byte 0xe9)")
    ]
    semi = tmp_path / "semi.csv"
    semi.write_text("x1;x2;color;label\n" + "\n".join(";".join(map(str, r)) for r in rows) + "\n")
    with pytest.raises(PipelineError, match="looks ';'-delimited; set data.csv_delimiter"):
        ingest(config(tmp_path / "semi", f'data.source="{semi}"'))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("x1,x2,color,label\n" + "\n".join("1,2" for _ in rows) + "\n")
    with pytest.raises(PipelineError, match=r"every row has \[2\] fields, the header 4"):
        ingest(config(tmp_path / "ragged", f'data.source="{ragged}"'))


def test_csv_header_errors(tmp_path):
    path = write_csv(tmp_path / "h.csv", ["a", "b"], [[1, 2]])
    with pytest.raises(PipelineError, match="label column 'label' not in header"):
        ingest(config(tmp_path, f'data.source="{path}"'))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PipelineError, match="empty file"):
        ingest(config(tmp_path, f'data.source="{tmp_path / "empty.csv"}"'))


def test_missing_source(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        ingest(config(tmp_path, f'data.source="{tmp_path / "nope"}"'))


def test_cli_exit_codes(tmp_path, capsys):
    root = make_images(tmp_path / "imgs", per_class=10)
    for i in range(3):
        (root / "a" / f"bad{i}.png").write_bytes(b"garbage")
    args = ["ingest", "--set", f'artifacts="{tmp_path / "art"}"', "--set", f'data.source="{root}"']
    assert main([*args, "--config", str(tmp_path / "none.toml")]) == 2
    (tmp_path / "e.toml").write_text("")
    assert main([*args, "--config", str(tmp_path / "e.toml")]) == 1
    assert "data gate failed" in capsys.readouterr().err
    assert main([*args, "--config", str(tmp_path / "e.toml"), "--set", "train.epochs=0"]) == 2


def test_image_geometry_is_inferred_then_kept(tmp_path):
    from PIL import Image

    root = tmp_path / "photos"
    for cls, color in (("hotdog", (200, 40, 40)), ("not_hotdog", (40, 200, 40))):
        (root / cls).mkdir(parents=True)
        for i in range(8):  # every size different, all 3:2
            Image.new("RGB", (150 + 30 * i, 100 + 20 * i), color).save(root / cls / f"{i}.jpg")
    result = ingest(config(tmp_path, f'data.source="{root}"'))  # no image_size, no channels
    schema = json.loads((result.run_dir / "schema.json").read_text())
    # The median aspect with the median longer side capped at 160, and 3 channels for color.
    assert schema["features"]["image"]["shape"] == [107, 160, 3]
    # A later ingest of differently sized images keeps the schema's geometry.
    Image.new("L", (640, 480), 128).save(root / "hotdog" / "gray.png")
    again = ingest(config(tmp_path, f'data.source="{root}"', "run_id=again"))
    stats = json.loads((again.run_dir / "stats.json").read_text())
    assert stats["all"]["features"]["image"]["shape"] == [107, 160, 3]


def test_inferred_image_size_is_the_median_aspect_capped():
    from collections import Counter

    from pipeline.sources import median_shape

    # Aspects 1, 0.75, 0.6 → 0.75; longer sides 60, 80, 100 → 80 (under the cap).
    assert median_shape(Counter({(60, 60): 1, (80, 60): 1, (100, 60): 1})) == (60, 80)
    # Portrait: aspects 2, 2, 1.2 → 2; longer sides 200, 200, 60 → 200, capped at 160.
    assert median_shape(Counter({(100, 200): 2, (50, 60): 1})) == (160, 80)
    # No single size is most common: the result does not depend on which image comes first.
    sizes = Counter({(103 + i, 160 - i): 1 for i in range(9)})
    assert median_shape(sizes) == median_shape(Counter(dict(reversed(sizes.items()))))


def test_explicit_geometry_that_contradicts_the_schema_blocks(tmp_path, image_dir):
    ingest(config(tmp_path, f'data.source="{image_dir}"'))
    with pytest.raises(IngestBlocked, match=r"type_change image: images are \[16, 16, 1\]"):
        ingest(
            config(
                tmp_path, f'data.source="{image_dir}"', "data.image_size=[16,16]", "run_id=bigger"
            )
        )


def test_a_numeric_target_under_a_classification_task_is_caught(tmp_path):
    rows = [[i * 0.1, i * 0.2, "red", f"{i * 1.37:.2f}"] for i in range(300)]
    path = write_csv(tmp_path / "reg.csv", HEADER, rows)
    with pytest.raises(PipelineError, match="looks like a regression target"):
        ingest(config(tmp_path, f'data.source="{path}"'))
    assert not list((tmp_path / "artifacts").glob("**/shards"))  # nothing was published


def test_a_tiny_validation_or_test_split_is_warned_about(tmp_path):
    path = write_csv(tmp_path / "small.csv", HEADER, tabular_rows(60, seed=2))
    result = ingest(config(tmp_path, f'data.source="{path}"', "model.task=binary"))
    small = {a.feature: a for a in kinds(result)["small_split"]}
    assert set(small) == {"val", "test"} and not any(a.blocking for a in small.values())
    assert small["test"].details["count"] == result.counts["test"] < 30
