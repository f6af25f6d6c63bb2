"""Export: version numbering, atomic publication, signatures, warmup, manifest and parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from pipeline import export as export_module
from pipeline.artifacts import PipelineError
from pipeline.evaluate import evaluate
from pipeline.export import export, verify_manifest
from pipeline.ingest import ingest
from pipeline.train import train
from tests.conftest import config, make_images, tabular_rows, write_csv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    root = make_images(tmp / "imgs", per_class=20)
    cfg = config(tmp, f'data.source="{root}"', "model.name=shapes", "export.warmup_records=5")
    ingest(cfg)
    train(cfg)
    evaluate(cfg)
    return tmp, cfg


def numeric_dirs(base):
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit()) if base.exists() else []


def test_versions_increase_and_never_reuse(trained, tmp_path):
    _, cfg = trained
    from dataclasses import replace

    cfg = replace(cfg, export=replace(cfg.export, model_base_path=str(tmp_path / "m")))
    v1 = export(cfg)
    v2 = export(cfg)
    assert (v1.name, v2.name) == ("1", "2")
    import shutil

    shutil.rmtree(v2)  # even if the newest version is deleted, its number is not reused
    assert export(cfg).name == "3"
    assert numeric_dirs(tmp_path / "m" / "shapes") == [1, 3]


def test_never_overwrites_an_existing_version(trained, tmp_path, monkeypatch):
    _, cfg = trained
    from dataclasses import replace

    cfg = replace(cfg, export=replace(cfg.export, model_base_path=str(tmp_path / "m")))
    existing = export(cfg)
    before = (existing / "saved_model.pb").read_bytes()
    monkeypatch.setattr(export_module, "next_version", lambda base, scheme: 1)
    with pytest.raises(OSError):
        export(cfg)
    assert (existing / "saved_model.pb").read_bytes() == before
    assert not list((tmp_path / "m" / "shapes").glob(".tmp-*"))


@pytest.mark.parametrize("kill_in", ["write_manifest", "rename"])
def test_killed_export_leaves_no_numeric_directory(trained, tmp_path, kill_in):
    _, cfg = trained
    base = tmp_path / "m"
    script = textwrap.dedent(f"""
        import os, signal
        from pipeline import export as e
        from pipeline.config import load_config
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        if {kill_in!r} == "rename":
            e.os.rename = die
        else:
            e.write_manifest = die
        cfg = load_config({str(tmp_path / "e.toml")!r}, [
            'artifacts="{cfg.artifacts}"', 'export.model_base_path="{base}"',
            'model.name=shapes', 'export.warmup_records=5'])
        e.export(cfg)
    """)
    (tmp_path / "e.toml").write_text("")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    model_dir = base / "shapes"
    assert numeric_dirs(model_dir) == []
    assert list(model_dir.glob(".tmp-*"))  # the half-built version is hidden from TF Serving
    from dataclasses import replace

    out = export(replace(cfg, export=replace(cfg.export, model_base_path=str(base))))
    assert out.name == "1" and not list(model_dir.glob(".tmp-*"))


def test_signatures_have_documented_names_and_methods(trained):
    _, cfg = trained
    version = export(cfg)
    loaded = tf.saved_model.load(str(version))
    sigs = loaded.signatures
    assert set(sigs) == {"serving_default", "serving_bytes", "classification"}
    inputs = sigs["serving_default"].structured_input_signature[1]
    assert inputs["image"].dtype == tf.float32 and inputs["image"].shape.as_list() == [
        None,
        8,
        8,
        1,
    ]
    outputs = sigs["serving_default"].structured_outputs
    assert {k: v.dtype for k, v in outputs.items()} == {
        "probabilities": tf.float32,
        "class_ids": tf.int64,
        "classes": tf.string,
    }
    assert set(sigs["serving_bytes"].structured_input_signature[1]) == {"image_bytes"}
    sm = saved_model_pb2.SavedModel.FromString((version / "saved_model.pb").read_bytes())
    methods = {k: v.method_name for k, v in sm.meta_graphs[0].signature_def.items()}
    assert methods["classification"] == "tensorflow/serving/classify"
    assert methods["serving_default"] == "tensorflow/serving/predict"
    fp = tf.saved_model.experimental.read_fingerprint(str(version))
    assert fp.saved_model_checksum != 0
    assert (version / "assets" / "labels.txt").read_text() == "a\nb\n"


def test_signatures_agree_on_real_inputs(trained):
    tmp, cfg = trained
    version = export(cfg)
    sigs = tf.saved_model.load(str(version)).signatures
    files = sorted((tmp / "imgs" / "b").glob("*.png"))[:4]
    pixels = np.stack([np.asarray(Image.open(f), dtype=np.float32)[..., None] for f in files])
    dense = sigs["serving_default"](image=tf.constant(pixels))
    encoded = sigs["serving_bytes"](image_bytes=tf.constant([f.read_bytes() for f in files]))
    np.testing.assert_allclose(dense["probabilities"], encoded["probabilities"], atol=1e-4)
    assert [c.decode() for c in dense["classes"].numpy()] == ["b"] * 4
    examples = [
        tf.train.Example(
            features=tf.train.Features(
                feature={
                    "image": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[p.astype(np.uint8).tobytes()])
                    )
                }
            )
        ).SerializeToString()
        for p in pixels
    ]
    cls = sigs["classification"](inputs=tf.constant(examples))
    np.testing.assert_allclose(cls["scores"], dense["probabilities"], atol=1e-6)
    assert cls["classes"].numpy()[0].tolist() == [b"a", b"b"]


def test_warmup_model_card_and_manifest(trained):
    _, cfg = trained
    version = export(cfg)
    records = list(
        tf.data.TFRecordDataset(str(version / "assets.extra/tf_serving_warmup_requests"))
    )
    assert 0 < len(records) <= 5
    entry = prediction_log_pb2.PredictionLog.FromString(records[0].numpy())
    request = entry.predict_log.request
    assert request.model_spec.name == "shapes"
    assert tf.make_ndarray(request.inputs["image"]).shape == (1, 8, 8, 1)
    card = json.loads((version / "assets.extra/model_card.json").read_text())
    assert card["task"] == "multiclass" and card["version"] == int(version.name)
    assert {"metrics", "hyperparameters", "data", "git_commit", "libraries", "created_at"} <= set(
        card
    )
    assert len(card["data"]["fingerprint"]) == 64
    assert verify_manifest(version) == []
    check = subprocess.run(
        ["sha256sum", "-c", "--quiet", "assets.extra/MANIFEST.sha256"],
        cwd=version,
        capture_output=True,
    )
    assert check.returncode == 0
    with open(version / "variables" / "variables.index", "ab") as f:
        f.write(b"tampered")
    assert verify_manifest(version) == ["variables/variables.index: checksum mismatch"]


def test_parity_mismatch_aborts(trained, tmp_path, monkeypatch):
    _, cfg = trained
    from dataclasses import replace

    cfg = replace(cfg, export=replace(cfg.export, model_base_path=str(tmp_path / "m")))
    real = export_module.check_parity

    def skewed(out, model, x, c):
        original = model.call

        def noisy(*a, **k):
            return original(*a, **k) + 0.01

        model.call = noisy
        try:
            return real(out, model, x, c)
        finally:
            model.call = original

    monkeypatch.setattr(export_module, "check_parity", skewed)
    with pytest.raises(PipelineError, match="differs from the trained model"):
        export(cfg)
    assert numeric_dirs(tmp_path / "m" / "shapes") == []


def test_regression_and_binary_signatures(tmp_path):
    for task in ("regression", "binary"):
        path = write_csv(
            tmp_path / f"{task}.csv", ["x1", "x2", "color", "label"], tabular_rows(120, task=task)
        )
        cfg = config(
            tmp_path / task, f'data.source="{path}"', f"model.task={task}", f"model.name={task}"
        )
        ingest(cfg)
        train(cfg)
        evaluate(cfg)
        sigs = tf.saved_model.load(str(export(cfg))).signatures
        inputs = sigs["serving_default"].structured_input_signature[1]
        assert {k: v.dtype for k, v in inputs.items()} == {
            "x1": tf.float32,
            "x2": tf.float32,
            "color": tf.string,
        }
        out = sigs["serving_default"](
            x1=tf.constant([0.1, 2.0]),
            x2=tf.constant([0.0, -1.0]),
            color=tf.constant(["red", "unknown"]),
        )
        if task == "regression":
            assert set(out) == {"predictions"} and out["predictions"].shape == (2,)
            assert "regression" in sigs
            ex = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "x1": tf.train.Feature(float_list=tf.train.FloatList(value=[0.1])),
                        "x2": tf.train.Feature(float_list=tf.train.FloatList(value=[0.0])),
                        "color": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"red"])),
                    }
                )
            )
            reg = sigs["regression"](inputs=tf.constant([ex.SerializeToString()]))
            assert reg["outputs"].numpy()[0] == pytest.approx(
                out["predictions"].numpy()[0], abs=1e-5
            )
        else:
            assert out["probabilities"].shape == (2, 2)
            np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, atol=1e-6)
            assert set(out["classes"].numpy().tolist()) <= {b"yes", b"no"}


def test_numbers_may_be_integers_or_missing_and_errors_keep_tensorflows_text(tmp_path):
    """Issue #15 point 5: an int64_list where a float feature is expected (TF Serving's REST API
    sends JSON integers that way) is a number; a missing number is the train mean in every
    signature (NaN in Predict); a wrong type fails with TensorFlow's own whole message."""
    import json

    from serving.server.servable import status_text

    path = write_csv(tmp_path / "d.csv", ["x1", "x2", "color", "label"], tabular_rows(150))
    cfg = config(tmp_path, f'data.source="{path}"', "model.task=binary")
    result = ingest(cfg)
    train(cfg)
    evaluate(cfg)
    sigs = tf.saved_model.load(str(export(cfg))).signatures
    mean_x2 = json.loads((result.run_dir / "stats.json").read_text())["train"]["features"]
    mean_x2 = mean_x2["x2"]["mean"]

    def example(**features):
        feature = {}
        for name, value in features.items():
            if isinstance(value, bytes):
                feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
            elif isinstance(value, int):
                feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
            else:
                feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
        ex = tf.train.Example(features=tf.train.Features(feature=feature))
        return ex.SerializeToString()

    def scores(*examples):
        return sigs["classification"](inputs=tf.constant(list(examples)))["scores"].numpy()

    as_float = scores(example(x1=2.0, x2=-1.0, color=b"red"), example(x1=0.0, x2=mean_x2))
    as_int = scores(example(x1=2, x2=-1, color=b"red"), example(x1=0))
    np.testing.assert_allclose(as_int, as_float, atol=1e-6)
    predict = sigs["serving_default"](
        x1=tf.constant([0.0]), x2=tf.constant([np.nan]), color=tf.constant([""])
    )["probabilities"].numpy()
    np.testing.assert_allclose(predict, as_float[1:], atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        scores(example(x1=b"two", x2=1.0))
    text = status_text(info.value.message)
    assert text.startswith("assertion failed: [Key: x1.  Data types do not match")
    assert "Graph execution" not in text and "[Op:" not in text


def test_export_requires_evaluation(tmp_path):
    root = make_images(tmp_path / "imgs", per_class=6)
    cfg = config(tmp_path, f'data.source="{root}"')
    ingest(cfg)
    train(cfg)
    with pytest.raises(PipelineError, match="run `python -m pipeline evaluate` first"):
        export(cfg)


def test_export_to_an_object_store_path(trained):
    """ram:// is TensorFlow's in-memory filesystem: the same tf.io.gfile path as gs://."""
    from dataclasses import replace

    _, cfg = trained
    remote = replace(cfg, export=replace(cfg.export, model_base_path="ram://bucket/models"))
    first = export(remote)
    second = export(remote)
    assert (first, second) == ("ram://bucket/models/shapes/1", "ram://bucket/models/shapes/2")
    names = tf.io.gfile.listdir("ram://bucket/models/shapes/2")
    assert {"saved_model.pb", "variables", "assets.extra"} <= {n.rstrip("/") for n in names}
    loaded = tf.saved_model.load("ram://bucket/models/shapes/2")
    assert "serving_default" in loaded.signatures


def test_timestamp_versions_never_collide_and_still_grow():
    import time

    from pipeline.export import choose_version

    now = int(time.time())
    assert choose_version([1, 2], "sequence") == 3
    assert now <= choose_version([1, 2], "timestamp") <= int(time.time())
    future = now + 10_000  # a version from a runner whose clock runs ahead
    assert choose_version([future], "timestamp") == future + 1
