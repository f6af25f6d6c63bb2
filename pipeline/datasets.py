"""tf.data readers over a run's shards, and the data spec every later stage shares.

Records are parsed in batches (``tf.io.parse_example`` on a batch is much cheaper than one call
per record), cached in memory when the split fits, shuffled with a fixed seed and prefetched.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from pipeline import artifacts as A
from pipeline.artifacts import PipelineError

CACHE_LIMIT_BYTES = 2 << 30  # cache a split in memory when its parsed tensors fit in 2 GiB
_PARSE_BATCH = 512


@dataclass(frozen=True)
class DataSpec:
    """What the model sees: task, classes, features (schema entries) and train-split stats."""

    run_dir: Path
    task: str
    label: str
    classes: tuple[str, ...]
    features: dict[str, dict[str, Any]]
    train_stats: dict[str, Any]
    examples: dict[str, int]
    compression: str
    label_stats: dict[str, Any] = dataclasses.field(default_factory=dict)  # train split

    @property
    def is_image(self) -> bool:
        return any(e["kind"] == "image" for e in self.features.values())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        for entry in self.features.values():
            if entry["kind"] == "image":
                h, w, c = entry["shape"]
                return int(h), int(w), int(c)
        raise PipelineError("this dataset has no image feature")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def input_name(self, feature: str) -> str:
        return input_name(feature)


def input_name(feature: str) -> str:
    """A signature-safe input name for a feature (letters, digits and underscores)."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", feature).strip("_") or "feature"
    return name if name[0].isalpha() else f"f_{name}"


def load_spec(run_dir: Path) -> DataSpec:
    """Read the spec of an ingested run (schema, labels, statistics)."""
    schema = A.read_json(A.require(run_dir / A.SCHEMA, "ingest"))
    stats = A.read_json(A.require(run_dir / A.STATS, "ingest"))
    ingest = A.read_json(A.require(run_dir / "ingest.json", "ingest"))
    classes: tuple[str, ...] = ()
    if schema["task"] != "regression":
        classes = tuple(A.require(run_dir / A.LABELS, "ingest").read_text().split("\n")[:-1])
    features = {
        name: entry
        for name, entry in schema["features"].items()
        if name in stats["train"]["features"]
    }
    names = [input_name(n) for n in features]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise PipelineError(f"features map to the same input name {clashes}; rename the columns")
    return DataSpec(
        run_dir=run_dir,
        task=schema["task"],
        label=schema["label"]["name"],
        classes=classes,
        features=features,
        train_stats=stats["train"]["features"],
        label_stats=stats["train"]["label"],
        examples=ingest["examples"],
        compression=ingest["config"]["data"]["compression"],
    )


def feature_spec(spec: DataSpec, with_label: bool = True) -> dict[str, Any]:
    """``tf.io.parse_example`` spec; missing numbers take the train-split mean."""
    out: dict[str, Any] = {}
    for name, entry in spec.features.items():
        kind = entry["kind"]
        if kind == "float":
            mean = spec.train_stats[name]["mean"]
            out[name] = tf.io.FixedLenFeature([], tf.float32, default_value=float(mean or 0.0))
        elif kind == "vector":
            out[name] = tf.io.FixedLenFeature([entry["length"]], tf.float32)
        elif kind == "string":
            out[name] = tf.io.FixedLenFeature([], tf.string, default_value="")
        else:
            out[name] = tf.io.FixedLenFeature([], tf.string)
    if with_label:
        dtype = tf.float32 if spec.task == "regression" else tf.string
        out[spec.label] = tf.io.FixedLenFeature([], dtype)
    return out


def _decode(data: tf.Tensor, message: str, fields: list[str], types: list[Any]) -> Any:
    """``tf.io.decode_proto`` of a 1-D batch; every field padded to at least one value."""
    sizes, values = tf.io.decode_proto(data, message, fields, types, descriptor_source="local://")
    rows = tf.shape(data)[0]
    padded = [
        tf.concat(
            [v, tf.zeros([rows, 1], v.dtype) if v.dtype != tf.string else tf.fill([rows, 1], "")], 1
        )
        for v in values
    ]
    return sizes, padded


def parse_serving_examples(spec: DataSpec, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Serialized ``tf.Example`` s from a client → the parsed features, numbers of either type.

    ``tf.io.parse_example`` takes a float feature only as a float_list; a client (or TF
    Serving's REST API, which turns a JSON integer into an int64_list) that sends
    ``{"year": 2008}`` would get "Data types don't match". Numeric features are read here from
    the example's wire format instead (``decode_proto``, a core op TF Serving runs), from a
    float_list or an int64_list, missing → the train mean as in training; everything else goes
    through ``parse_example`` as in training.
    """
    fspec = feature_spec(spec, with_label=False)
    numeric = {n: f for n, f in fspec.items() if f.dtype == tf.float32}
    others = {n: f for n, f in fspec.items() if n not in numeric}
    out = tf.io.parse_example(serialized, others) if others else {}
    if not numeric:
        return out
    flat = tf.reshape(serialized, [-1])
    rows = tf.shape(flat)[0]
    _, (features,) = _decode(flat, "tensorflow.Example", ["features"], [tf.string])
    _, (entries,) = _decode(features[:, 0], "tensorflow.Features", ["feature"], [tf.string])
    width = tf.shape(entries)[1]
    _, (keys, values) = _decode(
        tf.reshape(entries, [-1]),
        "tensorflow.Features.FeatureEntry",
        ["key", "value"],
        [tf.string, tf.string],
    )
    kinds, (floats, ints, _) = _decode(
        values[:, 0],
        "tensorflow.Feature",
        ["float_list", "int64_list", "bytes_list"],
        [tf.string, tf.string, tf.string],
    )
    nf, (fv,) = _decode(floats[:, 0], "tensorflow.FloatList", ["value"], [tf.float32])
    ni, (iv,) = _decode(ints[:, 0], "tensorflow.Int64List", ["value"], [tf.int64])
    longest = tf.maximum(tf.shape(fv)[1], tf.shape(iv)[1])
    fv = tf.pad(fv, [[0, 0], [0, longest - tf.shape(fv)[1]]])
    iv = tf.pad(tf.cast(iv, tf.float32), [[0, 0], [0, longest - tf.shape(iv)[1]]])
    count = tf.reshape(nf[:, 0] + ni[:, 0], [rows, width])
    has_bytes = tf.reshape(kinds[:, 2] > 0, [rows, width])
    numbers = tf.reshape(tf.where(nf > 0, fv, iv), [rows, width, longest])
    keys = tf.reshape(keys[:, 0], [rows, width])
    for name, feature in numeric.items():
        length = int(feature.shape[0]) if feature.shape else 1
        hit = tf.equal(keys, name)
        # The last entry of a key wins, as protobuf's map parsing does.
        at = width - 1 - tf.argmax(tf.cast(hit[:, ::-1], tf.int32), axis=1, output_type=tf.int32)
        present = tf.reduce_any(hit, axis=1)
        n = tf.where(present, tf.gather(count, at, axis=1, batch_dims=1), 0)
        text = tf.reduce_any(tf.logical_and(hit, has_bytes))
        required = feature.default_value is None
        checks = [
            tf.debugging.Assert(
                tf.logical_not(text),
                [f"Key: {name}.  Data types do not match: expected a float_list or int64_list"],
            ),
            tf.debugging.Assert(
                tf.logical_or(not required, tf.reduce_all(n > 0)),
                [f"Feature: {name} (data type: float) is required but could not be found."],
            ),
            tf.debugging.Assert(
                tf.reduce_all(tf.logical_or(tf.equal(n, 0), tf.equal(n, length))),
                [f"Key: {name}.  Number of float values != expected.  Expected: {length}"],
            ),
        ]
        with tf.control_dependencies(checks):
            row = tf.gather(numbers, at, axis=1, batch_dims=1)[:, :length]
            row = tf.pad(row, [[0, 0], [0, length - tf.shape(row)[1]]])
        if feature.default_value is not None:
            row = tf.where((n > 0)[:, None], row, tf.cast(feature.default_value, tf.float32))
        else:
            tf.debugging.assert_equal(
                tf.reduce_all(n > 0),
                True,
                message=f"Key: {name}. Feature is required but could not be found.",
            )
        out[name] = tf.reshape(row, [-1, *feature.shape])
    return out


def decode_features(spec: DataSpec, parsed: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Parsed features → the model's inputs (keyed by input name)."""
    out = {}
    for name, entry in spec.features.items():
        value = parsed[name]
        if entry["kind"] == "image":
            h, w, c = entry["shape"]
            value = tf.reshape(tf.io.decode_raw(value, tf.uint8), [-1, h, w, c])
            value = tf.cast(value, tf.float32)
        out[input_name(name)] = value
    return out


def label_ids(spec: DataSpec, labels: tf.Tensor) -> tf.Tensor:
    if spec.task == "regression":
        return labels
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(spec.classes), tf.range(len(spec.classes), dtype=tf.int64)
        ),
        default_value=-1,
    )
    ids = table.lookup(labels)
    if spec.task == "binary":
        return tf.cast(ids, tf.float32)
    return ids


def shard_files(spec: DataSpec, split: str) -> list[str]:
    files = sorted(str(p) for p in (spec.run_dir / A.SHARDS).glob(f"{split}-*"))
    if not files:
        raise PipelineError(f"{spec.run_dir / A.SHARDS}: no {split} shards")
    return files


def _example_bytes(spec: DataSpec) -> int:
    total = 0
    for entry in spec.features.values():
        if entry["kind"] == "image":
            total += int(np.prod(entry["shape"])) * 4
        elif entry["kind"] == "vector":
            total += entry["length"] * 4
        else:
            total += 16
    return total + 8


def make_dataset(
    spec: DataSpec,
    split: str,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool = True,
    shuffle_buffer: int = 10000,
    fold: tuple[int, int, bool] | None = None,
) -> tf.data.Dataset:
    """Batches of ``(inputs, label)`` from one split (or several, joined by ``+``).

    Args:
        fold: ``(k, i, keep)``: keep (True) or drop (False) every example whose position
            modulo ``k`` is ``i`` (k-fold cross-validation).
    """
    files = [f for s in split.split("+") for f in shard_files(spec, s)]
    compression = "" if spec.compression == "NONE" else "GZIP"
    ds = tf.data.TFRecordDataset(files, compression_type=compression)
    if fold is not None:
        k, i, keep = fold
        ds = ds.enumerate().filter(lambda n, _: tf.equal(n % k, i) == keep).map(lambda _, r: r)
    fspec = feature_spec(spec)

    def parse(records: tf.Tensor) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        parsed = tf.io.parse_example(records, fspec)
        return decode_features(spec, parsed), label_ids(spec, parsed[spec.label])

    ds = ds.batch(_PARSE_BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    count = sum(spec.examples.get(s, 0) for s in split.split("+"))
    if cache and count * _example_bytes(spec) < CACHE_LIMIT_BYTES:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(
            min(shuffle_buffer, max(count, 1)), seed=seed, reshuffle_each_iteration=True
        )
    options = tf.data.Options()
    # Under MultiWorkerMirroredStrategy every worker reads the split and keeps its share of the
    # batches (DATA). FILE sharding fails outright with fewer shard files than workers, and
    # shard files of unequal length would give workers unequal step counts.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(options)


def as_text(values: np.ndarray) -> np.ndarray:
    """A string feature (bytes, as TensorFlow gives them) as numpy text, decoded as UTF-8:
    numpy's ``astype(str)`` reads bytes as ASCII and fails on "Zürich"."""
    flat = [
        v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values.ravel()
    ]
    return np.array(flat, dtype=str).reshape(values.shape)


def to_numpy(ds: tf.data.Dataset) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Materialize a (small) dataset: for evaluation and export checks."""
    xs: dict[str, list[np.ndarray]] = {}
    ys: list[np.ndarray] = []
    for x, y in ds.as_numpy_iterator():
        for k, v in x.items():
            xs.setdefault(k, []).append(v)
        ys.append(y)
    if not ys:
        raise PipelineError("the split is empty")
    return {k: np.concatenate(v) for k, v in xs.items()}, np.concatenate(ys)
