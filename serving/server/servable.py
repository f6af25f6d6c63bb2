"""One loaded model version: its SignatureDefs, input checks and calls into TensorFlow."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from serving import codec
from serving.server.errors import ServingError, failed_precondition, invalid

log = logging.getLogger(__name__)

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
INTERNAL_SIGNATURES = ("__saved_model_init_op",)


class Servable:
    """A SavedModel version loaded with ``tf.saved_model.load``.

    Requests hold a reference to the Servable they run on, so unloading a version (dropping it
    from the manager's map) lets the requests already running on it finish.
    """

    def __init__(self, name: str, version: int, path: Path):
        self.name = name
        self.version = version
        self.path = path
        sm = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
        graphs = [g for g in sm.meta_graphs if "serve" in g.meta_info_def.tags]
        if not graphs:
            raise ValueError(f"{path}: no MetaGraph tagged 'serve'")
        self.meta_graph: meta_graph_pb2.MetaGraphDef = graphs[0]
        self.signature_defs = {
            k: v for k, v in self.meta_graph.signature_def.items() if k not in INTERNAL_SIGNATURES
        }
        self._loaded = tf.saved_model.load(str(path), tags=["serve"])
        self._functions = dict(self._loaded.signatures)

    # ---------------------------------------------------------------------------------------
    def signature(self, name: str) -> Any:
        name = name or "serving_default"
        sig = self.signature_defs.get(name)
        if sig is None:
            raise failed_precondition(f'Serving signature key "{name}" not found.')
        return sig

    def check_inputs(self, signature_name: str, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Check names, dtypes and shapes against the SignatureDef before calling TF.

        Raises:
            ServingError: INVALID_ARGUMENT naming the input and what was expected.
        """
        sig = self.signature(signature_name)
        expected = set(sig.inputs)
        got = set(inputs)
        if expected != got:
            raise invalid(
                f"input size does not match signature: {len(got)}!={len(expected)} "
                f"len({{{','.join(sorted(got))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(got - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - got))}}}."
            )
        tensors = {}
        batch = None
        for key, info in sig.inputs.items():
            value = inputs[key]
            want = info.dtype
            have = codec.dtype_code(value.dtype) if value.dtype != object else codec.DT_STRING
            if want != have:
                raise invalid(
                    f"Expects arg[{key}] to be {_dtype_name(want)} but "
                    f"{_dtype_name(have)} is provided"
                )
            if not info.tensor_shape.unknown_rank:
                dims = [d.size for d in info.tensor_shape.dim]
                if value.ndim != len(dims) or any(
                    d >= 0 and d != s for d, s in zip(dims, value.shape)
                ):
                    raise invalid(
                        f"input '{key}': shape {list(value.shape)} does not match the "
                        f"signature's {[d if d >= 0 else -1 for d in dims]} (-1 = any size)"
                    )
            if value.ndim and value.shape[0] == 0:
                raise invalid(f"input '{key}': the batch is empty")
            if value.ndim:
                if batch is not None and value.shape[0] != batch:
                    raise invalid(
                        f"input '{key}': batch size {value.shape[0]} differs from the other "
                        f"inputs' {batch}"
                    )
                batch = value.shape[0]
            tensors[key] = value
        return tensors

    def run(
        self,
        signature_name: str,
        inputs: dict[str, Any],
        output_filter: list[str] | tuple[str, ...] = (),
    ) -> dict[str, np.ndarray]:
        """Call a signature with checked inputs; return the (filtered) outputs as numpy."""
        sig = self.signature(signature_name)
        if output_filter:
            seen = set()
            for alias in output_filter:
                if alias not in sig.outputs:
                    raise invalid(
                        f"output tensor alias not found in signature: {alias} Outputs expected "
                        f"to be in the set {{{','.join(sorted(sig.outputs))}}}."
                    )
                if alias in seen:
                    raise invalid(f"duplicate output tensor alias: {alias}")
                seen.add(alias)
        fn = self._functions[signature_name or "serving_default"]
        try:
            out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            message = getattr(e, "message", None) or str(e)
            raise invalid(message.strip().splitlines()[0]) from e
        except tf.errors.OpError as e:
            raise ServingError(_grpc_code(e), e.message) from e
        keys = list(output_filter) or list(out)
        return {k: out[k].numpy() for k in keys}

    def run_examples(
        self, signature_name: str, method: str, examples: list[bytes]
    ) -> dict[str, np.ndarray]:
        """Classify/Regress: serialized tf.Examples through a classify/regress signature."""
        name = signature_name or "serving_default"
        sig = self.signature(name)
        if sig.method_name != method:
            kind = "classification" if method == CLASSIFY_METHOD else "regression"
            raise invalid(
                f"Expected {kind} signature method_name to be {method}. Was: {sig.method_name}"
            )
        if not examples:
            raise invalid("Input is empty.")
        key = next(iter(sig.inputs))
        arr = np.empty(len(examples), dtype=object)
        arr[:] = examples
        return self.run(name, {key: arr})

    # ---------------------------------------------------------------------------------------
    def warmup(self) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests``; any failure fails the load."""
        from tensorflow_serving.apis import prediction_log_pb2

        path = self.path / WARMUP_FILE
        if not path.exists():
            return 0
        start = time.perf_counter()
        count = 0
        for raw in tf.data.TFRecordDataset(str(path)):
            if count >= MAX_WARMUP_RECORDS:
                break
            entry = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
            kind = entry.WhichOneof("log_type")
            if kind == "predict_log":
                req = entry.predict_log.request
                inputs = {k: codec.to_numpy(v) for k, v in req.inputs.items()}
                sig = req.model_spec.signature_name
                self.run(sig, self.check_inputs(sig, inputs), list(req.output_filter))
            elif kind in ("classify_log", "regress_log"):
                req = getattr(entry, kind).request
                method = CLASSIFY_METHOD if kind == "classify_log" else REGRESS_METHOD
                self.run_examples(req.model_spec.signature_name, method, examples_of(req.input))
            else:
                raise ValueError(f"warmup record {count}: unsupported log type {kind}")
            count += 1
        log.info(
            "%s/%d: %d warmup requests in %.2fs",
            self.name,
            self.version,
            count,
            time.perf_counter() - start,
        )
        return count


def examples_of(input_proto: Any) -> list[bytes]:
    """Serialized tf.Examples of an ``tensorflow.serving.Input`` (context merged in)."""
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        return [e.SerializeToString() for e in input_proto.example_list.examples]
    if kind == "example_list_with_context":
        ctx = input_proto.example_list_with_context.context
        out = []
        for ex in input_proto.example_list_with_context.examples:
            merged = type(ex)()
            merged.CopyFrom(ctx)
            merged.MergeFrom(ex)
            out.append(merged.SerializeToString())
        return out
    return []


def _dtype_name(code: int) -> str:
    return codec.NAMES.get(code, str(code)).removeprefix("DT_").lower()


def _grpc_code(e: tf.errors.OpError) -> Any:
    import grpc

    # TensorFlow's error codes are the canonical gRPC status codes.
    by_number = {sc.value[0]: sc for sc in grpc.StatusCode}
    return by_number.get(e.error_code, grpc.StatusCode.INTERNAL)
