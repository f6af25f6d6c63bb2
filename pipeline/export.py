"""Export: publish the trained model as ``MODEL_BASE_PATH/NAME/VERSION/`` for TF Serving.

The version is built in a hidden ``NAME/.tmp-VERSION-PID/`` directory (TF Serving only looks at
integer-named children), checked, fsynced and then renamed into place in one ``rename(2)``: a
server polling the directory, or a process killed at any point, never sees half a model. A file
lock serializes concurrent exports; version numbers only grow (a high-water mark survives the
deletion of the newest version).

Signatures:
    serving_default   the model's natural inputs → probabilities, class_ids, classes
                      (classification) or predictions (regression)
    serving_bytes     image models: encoded JPEG/PNG/GIF/BMP bytes → the same outputs
    classification    serialized tf.Example ``inputs`` → classes, scores (TF Serving Classify)
    regression        serialized tf.Example ``inputs`` → outputs (TF Serving Regress)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from pipeline import artifacts as A
from pipeline.artifacts import PipelineError
from pipeline.config import Config
from pipeline.datasets import (
    DataSpec,
    decode_features,
    load_spec,
    make_dataset,
    parse_serving_examples,
    to_numpy,
)
from pipeline.models import load_model

log = logging.getLogger(__name__)

WARMUP_FILE, MODEL_CARD, MANIFEST = A.WARMUP_FILE, A.MODEL_CARD, A.MANIFEST
SIGNATURE, LABELS_FILE = A.SIGNATURE, A.LABELS_FILE
HIGH_WATER = ".last_version"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"


def export(cfg: Config) -> Path | str:
    """Publish the run's model as a new version; return its directory (a URI when remote)."""
    from filelock import FileLock, Timeout

    run_dir = A.resolve_run_dir(cfg.model_dir, cfg.run_id)
    spec = load_spec(run_dir)
    model = load_model(A.require(run_dir / A.MODEL, "train"))
    metrics = A.read_json(A.require(run_dir / A.METRICS, "evaluate"))
    if metrics.get("beats_trivial") is False and not cfg.export.allow_below_baseline:
        raise PipelineError(
            f"export refused: {metrics['diagnosis']['reason'].split('; export')[0]} "
            f"({run_dir / A.METRICS}). Fix the data or the model, or publish anyway with "
            "--set export.allow_below_baseline=true"
        )
    x_test, _ = to_numpy(make_dataset(spec, "test", batch_size=256, cache=False))

    if "://" in cfg.export.model_base_path:
        final_uri = export_remote(cfg, model, spec, metrics, x_test)
        A.write_json(run_dir / A.EXPORTED, {"path": final_uri})
        print(f"export: {final_uri}")
        return final_uri
    base = Path(cfg.export.model_base_path) / cfg.model.name
    base.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(str(base / ".export.lock"), timeout=600)
        lock.acquire()
    except Timeout as e:
        raise PipelineError(f"{base}: another export holds .export.lock for over 10 min") from e
    try:
        # Whatever .tmp-* directory exists while we hold the lock was left by a killed export.
        for stale in base.glob(".tmp-*"):
            log.warning("removing %s left by an interrupted export", stale)
            shutil.rmtree(stale, ignore_errors=True)
        version = next_version(base, cfg.export.version_scheme)
        tmp = base / f".tmp-{version}-{os.getpid()}"
        try:
            build_version(tmp, model, spec, cfg, metrics, x_test, version)
            A.fsync_tree(tmp)
            final = base / str(version)
            os.rename(tmp, final)  # atomic on one filesystem; fails rather than overwrite
            A.fsync_dir(base)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        A.atomic_write_text(base / HIGH_WATER, f"{version}\n")
    finally:
        lock.release()
    A.write_json(run_dir / A.EXPORTED, {"version": version, "path": str(final)})
    A.atomic_write_text(run_dir / A.RUN_REPORT, (final / A.VERSION_REPORT).read_text())
    print(f"export: {final} (version {version}); report: {run_dir / A.RUN_REPORT}")
    return final


def export_remote(
    cfg: Config, model: Any, spec: DataSpec, metrics: dict[str, Any], x_test: dict[str, np.ndarray]
) -> str:
    """Export to an object store (``gs://``, ``s3://``…) through ``tf.io.gfile``.

    Object stores have no atomic directory rename, so the version is built and checked
    locally, then copied with ``saved_model.pb`` last: TF Serving does not treat a version
    directory without it as a model yet. There is no cross-process lock on a bucket: run one
    export per model at a time (CI's concurrency group does).
    """
    import tempfile

    gfile = tf.io.gfile
    base = f"{cfg.export.model_base_path.rstrip('/')}/{cfg.model.name}"
    gfile.makedirs(base)
    existing = [int(n.rstrip("/")) for n in gfile.listdir(base) if n.rstrip("/").isdigit()]
    version = choose_version(existing, cfg.export.version_scheme)
    dest = f"{base}/{version}"
    if gfile.exists(dest):
        raise PipelineError(f"{dest}: exists; versions are never overwritten")
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        local = Path(tmp) / str(version)
        build_version(local, model, spec, cfg, metrics, x_test, version)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == "saved_model.pb")  # the marker goes last
        for path in files:
            target = f"{dest}/{path.relative_to(local).as_posix()}"
            gfile.makedirs(target.rsplit("/", 1)[0])
            gfile.copy(str(path), target, overwrite=False)
    return dest


def next_version(base: Path, scheme: str = "sequence") -> int:
    versions = [int(p.name) for p in base.iterdir() if p.name.isdigit()]
    mark = base / HIGH_WATER
    if mark.exists():
        versions.append(int(mark.read_text().strip() or 0))
    return choose_version(versions, scheme)


def choose_version(existing: list[int], scheme: str) -> int:
    """``sequence``: one more than the highest. ``timestamp``: the export's Unix time (as TFX's
    Pusher does), so runners that never saw each other's versions do not collide; still above
    the highest, since TF Serving serves the largest number as the latest."""
    after = max(existing, default=0) + 1
    return max(after, int(time.time())) if scheme == "timestamp" else after


def build_version(
    out: Path,
    model: Any,
    spec: DataSpec,
    cfg: Config,
    metrics: dict[str, Any],
    x_test: dict[str, np.ndarray],
    version: int,
) -> None:
    """Write a complete, verified SavedModel version into ``out``."""
    threshold = float(metrics.get("threshold", 0.5))
    module = ServingModule(model, spec, threshold)
    signatures = module.signatures()
    tf.saved_model.save(module, str(out), signatures=signatures)
    set_method_names(out, {"classification": CLASSIFY_METHOD, "regression": REGRESS_METHOD})
    if spec.classes:
        (out / "assets").mkdir(exist_ok=True)
        (out / LABELS_FILE).write_text("\n".join(spec.classes) + "\n")
    (out / "assets.extra").mkdir(exist_ok=True)
    n = min(cfg.export.warmup_records, len(next(iter(x_test.values()))))
    write_warmup(out / WARMUP_FILE, cfg.model.name, {k: v[:n] for k, v in x_test.items()})
    check_parity(out, model, x_test, cfg)
    card = model_card(cfg, spec, metrics, version, signatures)
    card["report"] = A.VERSION_REPORT
    A.write_json(out / MODEL_CARD, card)
    # The run's page travels with the version (lineage included): one file to open.
    from pipeline.report import render

    published = f"{cfg.export.model_base_path.rstrip('/')}/{cfg.model.name}/{version}"
    page = render(spec.run_dir, exported={"path": published, "version": version}, card=card)
    (out / A.VERSION_REPORT).write_text(page)
    write_manifest(out)
    if cfg.export.signing_key:
        from pipeline.signing import sign_manifest

        sign_manifest(out, cfg.export.signing_key)


class ServingModule(tf.Module):
    """The Keras model wrapped with signatures that carry our names, not Keras' defaults."""

    def __init__(self, model: Any, spec: DataSpec, threshold: float):
        super().__init__()
        # Track the tf.Variables behind Keras 3's variables, not the Keras model: tracked
        # through the model, each variable is saved twice (one VarHandleOp per copy) and the
        # checkpoint restores the copy the signatures do not read, so TF Serving's loader (a
        # TF1 session) fails with "Could not find variable ..." (keras-team/keras#20096).
        # Keras' own ExportArchive tracks ``variable.value`` the same way. This also keeps the
        # seed-generator states, outside Keras' tracked object graph, reachable from the root.
        object.__setattr__(self, "model", model)  # bypasses tf.Module's tracking
        self.model_variables = [getattr(v, "value", v) for v in model.variables]
        # The lookup tables of StringLookup/IntegerLookup layers, for the same reason.
        self.model_resources = [
            value
            for layer in model._flatten_layers(include_self=False)
            for value in vars(layer).values()
            if isinstance(value, tf.saved_model.experimental.TrackableResource)
        ]
        self.spec = spec
        self.threshold = tf.constant(threshold, tf.float32)
        self.class_names = tf.constant(list(spec.classes) or [""])

    def _outputs(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        raw = self.model(inputs, training=False)
        if self.spec.task == "regression":
            return {"predictions": tf.reshape(raw, [-1])}
        if self.spec.task == "binary":
            p = tf.reshape(raw, [-1, 1])
            probs = tf.concat([1.0 - p, p], axis=1)
            ids = tf.cast(tf.reshape(p, [-1]) >= self.threshold, tf.int64)
        else:
            probs = raw
            ids = tf.argmax(probs, axis=1)
        return {
            "probabilities": probs,
            "class_ids": ids,
            "classes": tf.gather(self.class_names, ids),
        }

    def input_specs(self) -> dict[str, tf.TensorSpec]:
        specs = {}
        for name, entry in self.spec.features.items():
            key = self.spec.input_name(name)
            kind = entry["kind"]
            if kind == "image":
                specs[key] = tf.TensorSpec([None, *entry["shape"]], tf.float32, name=key)
            elif kind == "vector":
                specs[key] = tf.TensorSpec([None, entry["length"]], tf.float32, name=key)
            elif kind == "string":
                specs[key] = tf.TensorSpec([None], tf.string, name=key)
            else:
                specs[key] = tf.TensorSpec([None], tf.float32, name=key)
        return specs

    def signatures(self) -> dict[str, Any]:
        predict = tf.function(self._outputs)
        sigs: dict[str, Any] = {
            "serving_default": predict.get_concrete_function(self.input_specs())
        }
        if self.spec.is_image:
            h, w, c = self.spec.image_shape
            image_key = next(
                self.spec.input_name(n)
                for n, e in self.spec.features.items()
                if e["kind"] == "image"
            )

            def from_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
                def decode(data: tf.Tensor) -> tf.Tensor:
                    img = tf.io.decode_image(data, channels=c, expand_animations=False)
                    img = tf.image.resize(tf.cast(img, tf.float32), [h, w], antialias=True)
                    return tf.ensure_shape(img, [h, w, c])

                images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.float32)
                return self._outputs({image_key: images})

            sigs["serving_bytes"] = tf.function(from_bytes).get_concrete_function(
                tf.TensorSpec([None], tf.string, name="image_bytes")
            )

        def from_examples(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            parsed = parse_serving_examples(self.spec, inputs)
            out = self._outputs(decode_features(self.spec, parsed))
            if self.spec.task == "regression":
                return {"outputs": out["predictions"]}
            batch = tf.shape(inputs)[0]
            classes = tf.tile(self.class_names[tf.newaxis, :], [batch, 1])
            return {"classes": classes, "scores": out["probabilities"]}

        name = "regression" if self.spec.task == "regression" else "classification"
        sigs[name] = tf.function(from_examples).get_concrete_function(
            tf.TensorSpec([None], tf.string, name="inputs")
        )
        return sigs


def set_method_names(export_dir: Path, methods: dict[str, str]) -> None:
    """Give the Classify/Regress signatures the method names TF Serving checks.

    ``tf.saved_model.save`` marks every signature ``tensorflow/serving/predict``; TF Serving's
    Classify and Regress APIs refuse a signature whose method_name is not classify/regress.
    The fingerprint covers saved_model.pb, so it is computed again afterwards.
    """
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    pb = export_dir / "saved_model.pb"
    sm = saved_model_pb2.SavedModel.FromString(pb.read_bytes())
    for meta_graph in sm.meta_graphs:
        for name, method in methods.items():
            if name in meta_graph.signature_def:
                meta_graph.signature_def[name].method_name = method
    pb.write_bytes(sm.SerializeToString())
    (export_dir / "fingerprint.pb").write_bytes(
        fingerprinting.CreateFingerprintDef(str(export_dir))
    )


def write_warmup(path: Path, model_name: str, x: dict[str, np.ndarray]) -> int:
    """TF Serving warmup: one PredictionLog per real test example (batch of 1), ≤ 1000."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    n = len(next(iter(x.values()))) if x else 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(min(n, 1000)):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default")
            )
            for key, values in x.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(values[i : i + 1]))
            log_entry = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log_entry.SerializeToString())
    return min(n, 1000)


def check_parity(out: Path, model: Any, x: dict[str, np.ndarray], cfg: Config) -> dict[str, float]:
    """Reload the SavedModel and compare it with the in-memory model on the test batch.

    Raises:
        PipelineError: an output differs beyond ``export.parity_atol + parity_rtol * |expected|``.
    """
    reloaded = tf.saved_model.load(str(out))
    fn = reloaded.signatures["serving_default"]
    batch = {k: v[:256] for k, v in x.items()}
    expected = np.asarray(model({k: tf.constant(v) for k, v in batch.items()}, training=False))
    got = fn(**{k: tf.constant(v) for k, v in batch.items()})
    key = "predictions" if "predictions" in got else "probabilities"
    actual = got[key].numpy()
    if key == "probabilities" and actual.shape[1] == 2 and expected.shape[-1] == 1:
        actual = actual[:, 1:]
    actual = actual.reshape(expected.shape)
    diff = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    if not np.allclose(actual, expected, atol=cfg.export.parity_atol, rtol=cfg.export.parity_rtol):
        raise PipelineError(
            f"export check failed: reloaded SavedModel differs from the trained model by up to "
            f"{diff:.3g} (export.parity_atol={cfg.export.parity_atol}, "
            f"parity_rtol={cfg.export.parity_rtol}); nothing was published"
        )
    log.info(
        "export parity: max |reloaded - in-memory| = %.3g over %d examples", diff, len(expected)
    )
    return {"max_abs_diff": diff}


def model_card(
    cfg: Config, spec: DataSpec, metrics: dict[str, Any], version: int, signatures: dict[str, Any]
) -> dict[str, Any]:
    import keras
    import keras_tuner

    run_dir = spec.run_dir
    hparams = A.read_json(run_dir / "train.json") if (run_dir / "train.json").exists() else {}
    stats = A.read_json(run_dir / A.STATS)
    return {
        "name": cfg.model.name,
        "version": version,
        "task": spec.task,
        "classes": list(spec.classes),
        "metrics": {k: v for k, v in metrics.items() if k not in ("pr_curve",)},
        "hyperparameters": hparams.get("hyperparameters", {}),
        "hyperparameters_origin": hparams.get("origin"),
        "data": {
            "run_id": run_dir.name,
            "fingerprint": _data_fingerprint(run_dir / A.SHARDS),
            "examples": spec.examples,
            "schema": A.read_json(run_dir / A.SCHEMA),
            "label_distribution": stats["all"]["label"],
        },
        "signatures": {
            name: {
                "inputs": {k: _spec_json(v) for k, v in fn.structured_input_signature[1].items()},
                "outputs": {k: _spec_json(v) for k, v in fn.structured_outputs.items()},
            }
            for name, fn in signatures.items()
        },
        "git_commit": A.git_commit(),
        "libraries": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "keras_tuner": keras_tuner.__version__,
            "numpy": np.__version__,
        },
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _spec_json(s: Any) -> dict[str, Any]:
    return {"dtype": s.dtype.name, "shape": [d if d is not None else -1 for d in s.shape.as_list()]}


def _data_fingerprint(shards: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(shards.iterdir()):
        h.update(path.name.encode() + b"\0" + _sha256(path).encode())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(version_dir: Path) -> None:
    """``sha256sum``-format manifest of every other file (verify with ``sha256sum -c``)."""
    lines = []
    for path in sorted(p for p in version_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(version_dir).as_posix()
        if rel != MANIFEST:
            lines.append(f"{_sha256(path)}  {rel}")
    (version_dir / MANIFEST).write_text("\n".join(lines) + "\n")


def verify_manifest(version_dir: Path) -> list[str]:
    """Problems found: files changed, missing or not listed. Empty means intact."""
    manifest = version_dir / MANIFEST
    if not manifest.exists():
        return [f"{manifest}: missing"]
    listed: dict[str, str] = {}
    problems = []
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep:
            problems.append(f"{manifest}:{n}: malformed line")
            continue
        listed[rel] = digest
    for rel, digest in listed.items():
        path = version_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: listed but missing")
        elif _sha256(path) != digest:
            problems.append(f"{rel}: checksum mismatch")
    for path in version_dir.rglob("*"):
        rel = path.relative_to(version_dir).as_posix()
        if path.is_file() and rel not in (MANIFEST, SIGNATURE) and rel not in listed:
            problems.append(f"{rel}: not in the manifest")
    return problems
