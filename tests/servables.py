"""Tiny SavedModel versions for server and client tests (built once per session, then copied).

Version N answers ``y = x * 2 + N`` so every response says which version produced it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from pipeline.export import CLASSIFY_METHOD, REGRESS_METHOD, set_method_names


class _Tiny(tf.Module):
    def __init__(self, version: int):
        super().__init__()
        self.bias = tf.Variable(float(version))

    def predict(self, x):
        y = x * 2.0 + self.bias
        label = tf.where(tf.reduce_sum(y, axis=1) > 0, "pos", "neg")
        return {"y": y, "label": label, "version": tf.fill(tf.shape(x)[:1], self.bias)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def echo(self, text):
        return {"text_bytes": text, "length": tf.strings.length(text)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32, name="n")])
    def spin(self, n):
        """Busy for n[0] small matrix products: a slow request for deadline tests."""
        m = tf.eye(64)
        i, m = tf.while_loop(
            lambda i, m: i < n[0], lambda i, m: (i + 1, tf.matmul(m, m)), [tf.constant(0), m]
        )
        return {"iterations": tf.fill(tf.shape(n), i)}

    def _parse(self, inputs):
        parsed = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([2], tf.float32)})
        return tf.reduce_sum(parsed["x"], axis=1) + self.bias

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(self, inputs):
        s = tf.sigmoid(self._parse(inputs))
        scores = tf.stack([1 - s, s], axis=1)
        classes = tf.tile(tf.constant([["neg", "pos"]]), [tf.shape(inputs)[0], 1])
        return {"classes": classes, "scores": scores}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress(self, inputs):
        return {"outputs": self._parse(inputs)}


def build(
    path: Path, version: int, warmup: str = "ok", input_name: str = "x", method_names: bool = True
) -> Path:
    """Write version ``version`` into ``path`` (warmup: "ok", "none" or "broken").

    ``method_names=False`` keeps what TF2's ``tf.saved_model.save`` writes: every signature
    with the predict method name.
    """
    module = _Tiny(version)
    predict = tf.function(module.predict).get_concrete_function(
        tf.TensorSpec([None, 2], tf.float32, name=input_name)
    )
    tf.saved_model.save(
        module,
        str(path),
        signatures={
            "serving_default": predict,
            "echo": module.echo,
            "spin": module.spin,
            "classification": module.classify,
            "regression": module.regress,
        },
    )
    if method_names:
        set_method_names(path, {"classification": CLASSIFY_METHOD, "regression": REGRESS_METHOD})
    if warmup != "none":
        (path / "assets.extra").mkdir(exist_ok=True)
        with tf.io.TFRecordWriter(str(path / "assets.extra/tf_serving_warmup_requests")) as w:
            req = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="tiny"))
            name = "x" if warmup == "ok" else "no_such_input"
            req.inputs[name].CopyFrom(tf.make_tensor_proto(np.ones((1, 2), np.float32)))
            w.write(
                prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=req)
                ).SerializeToString()
            )
    return path


class Library:
    """Versions built once; :meth:`copy` places one under a model base path."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[tuple[int, str], Path] = {}

    def copy(self, base: Path, version: int, warmup: str = "ok") -> Path:
        key = (version, warmup)
        if key not in self._built:
            self._built[key] = build(self.root / f"{version}-{warmup}", version, warmup)
        dest = base / str(version)
        tmp = base / f".tmp-{version}"
        shutil.copytree(self._built[key], tmp)
        tmp.rename(dest)  # like the exporter: the server never sees a half-copied version
        return dest


def build_tf1_half_plus_two(path: Path, vocab_dir: Path) -> Path:
    """A TF 1.x-style graph export as TF Serving's half_plus_two test models are made.

    ``y = 0.5 * x + 2``; ``x`` is fed by name and is declared ``[-1, 1]`` in the SignatureDef
    while the graph's placeholder has no shape at all (a SignatureDef narrower than its graph,
    which ``tf.saved_model.load`` cannot wrap). ``classify`` and ``regress`` take serialized
    tf.Examples; the class label comes from an asset file through a lookup table.
    """
    v1 = tf.compat.v1
    vocab = vocab_dir / "labels.txt"
    vocab.write_text("half_plus_two\n")
    graph = tf.Graph()
    with graph.as_default():
        a, b = v1.Variable(0.5, name="a"), v1.Variable(2.0, name="b")
        x = v1.placeholder(tf.float32, shape=None, name="x")
        y = tf.add(tf.multiply(a, x), b, name="y")
        examples = v1.placeholder(tf.string, shape=[None], name="tf_example")
        parsed = v1.io.parse_example(examples, {"x": v1.io.FixedLenFeature([1], tf.float32)})
        y_examples = tf.add(tf.multiply(a, parsed["x"]), b, name="y_examples")
        asset = tf.constant(str(vocab), name="vocab_path")
        v1.add_to_collection(v1.GraphKeys.ASSET_FILEPATHS, asset)
        table = tf.lookup.StaticHashTable(
            tf.lookup.TextFileInitializer(
                asset,
                tf.int64,
                tf.lookup.TextFileIndex.LINE_NUMBER,
                tf.string,
                tf.lookup.TextFileIndex.WHOLE_LINE,
            ),
            default_value="?",
        )
        classes = table.lookup(tf.zeros_like(y_examples, dtype=tf.int64))

        def info(tensor, shape=None):
            out = v1.saved_model.utils.build_tensor_info(tensor)
            if shape is not None:
                out.tensor_shape.Clear()
                for d in shape:
                    out.tensor_shape.dim.add(size=d)
            return out

        build_sig = v1.saved_model.signature_def_utils.build_signature_def
        signatures = {
            "serving_default": build_sig(
                {"x": info(x, [-1, 1])}, {"y": info(y, [-1, 1])}, PREDICT_METHOD
            ),
            "classify_x_to_y": build_sig(
                {"inputs": info(examples)},
                {"classes": info(classes), "scores": info(y_examples)},
                CLASSIFY_METHOD,
            ),
            "regress_x_to_y": build_sig(
                {"inputs": info(examples)}, {"outputs": info(y_examples)}, REGRESS_METHOD
            ),
        }
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(str(path))
            builder.add_meta_graph_and_variables(
                session,
                ["serve"],
                signature_def_map=signatures,
                assets_collection=v1.get_collection(v1.GraphKeys.ASSET_FILEPATHS),
                main_op=v1.tables_initializer(),
                strip_default_attrs=True,
            )
            builder.save()
    vocab.unlink()  # the export must carry its own copy under assets/
    return path


PREDICT_METHOD = "tensorflow/serving/predict"
