"""One loaded model version, run the way TF Serving runs it.

TF Serving loads every SavedModel (TF1 graph exports and TF2 ``tf.saved_model.save`` alike) into a
TF1 session bundle and runs a signature by feeding the SignatureDef's tensor names and fetching
its output tensor names (``predict_util.cc``, ``classifier.cc``, ``regressor.cc``). We do the
same through ``tf.compat.v1``: no shape check of our own (TensorFlow decides, so a half_plus_two
model answers ``[2.0]`` on a ``[-1, 1]`` signature as the real server does), dtype errors come
from the TF runtime with its own text, and a TF1 export whose SignatureDef is narrower than its
graph loads.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2
from tensorflow_serving.apis import model_pb2

from serving import codec
from serving.server.errors import ServingError, failed_precondition, invalid

log = logging.getLogger(__name__)

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
SIGNATURE_METHODS = (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD)
DEFAULT_SIGNATURE = "serving_default"
INIT_OP_SIGNATURE = "__saved_model_init_op"
MAX_CACHED_CALLABLES = 64
# Model calls that usually take less than this run on the server's event loop (Core.run, Batcher).
INLINE_RUN_SECONDS = 0.002
# TensorFlow's error codes are the canonical gRPC status codes.
_GRPC_CODE = {sc.value[0]: sc for sc in grpc.StatusCode}


def _join(keys: Any) -> str:
    return ",".join(sorted(keys))


def status_text(message: str) -> str:
    """TensorFlow's error as the C++ runtime (and so TF Serving) reports it: the whole text,
    without what Python's function call adds (the "Graph execution error:" heading, the
    "Detected at node ... defined at" traceback and the trailing "[Op:__inference_...]")."""
    lines = message.split("\n")
    if lines[0] == "Graph execution error:":
        lines = lines[1:]
        while lines and not lines[0].strip():
            lines.pop(0)
        if lines and lines[0].startswith("Detected at node"):
            lines.pop(0)
            while lines and (
                not lines[0].strip()
                or lines[0].startswith("  ")
                or lines[0] == "<stack traces unavailable>"
            ):
                lines.pop(0)
    text = re.sub(r"\s*\[Op:[^\]]*\]\s*$", "", "\n".join(lines)).strip()
    return text or message


class Servable:
    """A SavedModel version in its own graph and session.

    Requests hold a reference to the Servable they run on, so unloading a version (dropping it
    from the manager's map) lets the requests already running on it finish; the session is
    closed when the last reference goes.

    Args:
        name: the model's name.
        version: the version number.
        path: the version directory.
        tags: the MetaGraph tag set to load (``--saved_model_tags``, default ``serve``).
        method_name_check: ``--enable_signature_method_name_check``.
        session_config: a ``tf.compat.v1.ConfigProto`` (thread pools), or None.
    """

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        *,
        tags: Sequence[str] = ("serve",),
        method_name_check: bool = False,
        session_config: Any = None,
    ):
        self.name = name
        self.version = version
        self.path = path
        self.method_name_check = method_name_check
        self.meta_graph: meta_graph_pb2.MetaGraphDef = _read_meta_graph(path, tags)
        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph, config=session_config)
        try:
            _restore_and_init(self._session, self.meta_graph, path)
        except BaseException:
            self._session.close()
            raise
        self.signature_defs = {
            k: v for k, v in self.meta_graph.signature_def.items() if k != INIT_OP_SIGNATURE
        }
        self._callables: dict[tuple[str, tuple[str, ...], bool], Callable[..., Any]] = {}
        self._callables_lock = threading.Lock()
        # Moving average (weight 0.1) of one model call's wall time: the server runs the calls
        # of a fast model on its event loop, where a hand-off to a thread would cost more than
        # the call. It starts high, so a model is first measured on the pool (~60 calls).
        self.run_seconds = 1.0
        self._specs: dict[str, bytes] = {}
        self._plain: dict[str, dict[str, Any] | None] = {}

    def spec_bytes(self, signature: str) -> bytes:
        """The serialized ModelSpec (name, version, signature) a response carries."""
        data = self._specs.get(signature)
        if data is None:
            spec = model_pb2.ModelSpec(name=self.name, signature_name=signature)
            spec.version.value = self.version
            data = self._specs[signature] = spec.SerializeToString()
        return data

    @property
    def runs_inline(self) -> bool:
        """Whether the server calls this model on its event loop (see ``run_seconds``)."""
        return self.run_seconds < INLINE_RUN_SECONDS

    def __del__(self) -> None:
        session = getattr(self, "_session", None)
        if session is not None:
            session.close()

    # ---------------------------------------------------------------------------------------
    def signature(self, name: str) -> Any:
        name = name or DEFAULT_SIGNATURE
        sig = self.signature_defs.get(name)
        if sig is None:
            raise failed_precondition(f'Serving signature key "{name}" not found.')
        return sig

    def predict(
        self,
        signature_name: str,
        inputs: dict[str, Any],
        output_filter: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Predict as ``predict_util.cc`` does: check the names, feed, fetch.

        Raises:
            ServingError: with TF Serving's code and message.
        """
        feeds = self.check_predict(signature_name, inputs, output_filter)
        return self.run_checked(signature_name, feeds, output_filter)

    def check_predict(
        self, signature_name: str, inputs: dict[str, Any], output_filter: Sequence[str]
    ) -> dict[str, Any]:
        """The request's checks (names, defaults, output filter); returns the feeds by alias.

        Raises:
            ServingError: with TF Serving's code and message.
        """
        plain = self._plain_feeds(signature_name or DEFAULT_SIGNATURE)
        if (
            plain is not None
            and not output_filter
            and inputs.keys() == plain.keys()
            and all(inputs[alias].dtype == dtype for alias, dtype in plain.items())
        ):
            return inputs  # what the checks below would return for it
        sig = self.signature(signature_name)
        if self.method_name_check and sig.method_name not in SIGNATURE_METHODS:
            raise ServingError(
                grpc.StatusCode.INTERNAL,
                "Expected prediction signature method_name to be one of "
                f"{{{PREDICT_METHOD}, {CLASSIFY_METHOD}, {REGRESS_METHOD}}}. "
                f"Was: {sig.method_name}",
            )
        defaults = dict(getattr(sig, "defaults", {}))
        if len(inputs) > len(sig.inputs) or (len(inputs) < len(sig.inputs) and not defaults):
            raise invalid(
                f"input size does not match signature: {len(inputs)}!={len(sig.inputs)} "
                f"len({{{_join(inputs)}}}) != len({{{_join(sig.inputs)}}}). "
                f"Sent extra: {{{_join(set(inputs) - set(sig.inputs))}}}. "
                f"Missing but required: {{{_join(set(sig.inputs) - set(inputs))}}}."
            )
        feeds: dict[str, Any] = {}
        for alias, info in sig.inputs.items():
            if alias in inputs:
                feeds[alias] = inputs[alias]
            elif alias in defaults:
                feeds[alias] = codec.to_numpy(defaults[alias])
            else:
                raise invalid(
                    f"Signature input alias: {alias}(feed name: {info.name}) not found in "
                    "request and no default value provided. Inputs expected to be in the "
                    f"request {{{_join(inputs)}}}, or default input alias set: "
                    f"{_join(defaults)}"
                )
        unknown = set(inputs) - set(sig.inputs)
        if inputs and unknown:
            raise invalid(
                "Inputs contains invalid name. Used request inputs: "
                f"{_join(set(inputs) & set(sig.inputs))}, request input: {_join(inputs)}"
            )
        seen: set[str] = set()
        for alias in output_filter:
            if alias not in sig.outputs:
                raise invalid(
                    f"output tensor alias not found in signature: {alias} Outputs expected "
                    f"to be in the set {{{_join(sig.outputs)}}}."
                )
            if alias in seen:
                raise invalid(f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        for i, alias in enumerate(sorted(sig.inputs)):
            want = sig.inputs[alias].dtype
            value = feeds[alias]
            have = codec.DT_STRING if value.dtype == object else codec.dtype_code(value.dtype)
            if want != have:
                # The TF runtime's text for a feed of the wrong type (Session::Run).
                raise invalid(
                    f"Expects arg[{i}] to be {codec.type_name(want)} but {codec.type_name(have)} "
                    "is provided"
                )
        return feeds

    def _plain_feeds(self, name: str) -> dict[str, Any] | None:
        """The numpy dtype of each input of signature ``name``, for requests that pass the
        checks as they are (every input, of its dtype, no output filter); None when every
        request needs the checks (no such signature, a method name refused, an input of a
        type numpy does not have)."""
        if name in self._plain:
            return self._plain[name]
        sig = self.signature_defs.get(name)
        if sig is None:
            return None
        plain = None
        if not self.method_name_check or sig.method_name in SIGNATURE_METHODS:
            with contextlib.suppress(codec.CodecError):
                plain = {alias: codec.numpy_dtype(i.dtype) for alias, i in sig.inputs.items()}
        self._plain[name] = plain
        return plain

    def run_checked(
        self, signature_name: str, feeds: dict[str, Any], output_filter: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """Run feeds that :meth:`check_predict` returned."""
        name = signature_name or DEFAULT_SIGNATURE
        return self._run(name, self.signature_defs[name], feeds, list(output_filter) or None)

    def _run(
        self, key: str, sig: Any, feeds: dict[str, Any], aliases: list[str] | None
    ) -> dict[str, np.ndarray]:
        """Feed ``feeds`` (by alias) and fetch ``aliases`` (all outputs when None)."""
        names = tuple(sorted(sig.outputs)) if aliases is None else tuple(aliases)
        fn = self._callable(key, sig, names)
        start = time.perf_counter()
        try:
            values = fn(*(feeds[alias] for alias in sorted(sig.inputs)))
        except tf.errors.OpError as e:
            code = _GRPC_CODE.get(e.error_code, grpc.StatusCode.INTERNAL)
            raise ServingError(code, status_text(e.message)) from e
        except (ValueError, TypeError) as e:
            # A value numpy/TensorFlow cannot turn into a tensor (ragged lists, objects).
            raise invalid(str(e)) from e
        finally:
            self.run_seconds += 0.1 * (time.perf_counter() - start - self.run_seconds)
        return dict(zip(names, values))

    def _callable(self, key: str, sig: Any, outputs: tuple[str, ...]) -> Callable[..., Any]:
        """A session callable per (signature, fetched outputs): no per-call graph lookups.

        A model that answers in under ``INLINE_RUN_SECONDS`` runs its ops on the calling
        thread (``RunOptions.inter_op_thread_pool = -1``, which TensorFlow recommends for
        graphs where a context switch costs as much as the run: a tiny model's call takes a
        third of the time and a quarter of the CPU); others use the session's inter-op pool.
        """
        inline = self.runs_inline
        cache_key = (key, outputs, inline)
        fn = self._callables.get(cache_key)
        if fn is None:
            with self._callables_lock:
                fn = self._callables.get(cache_key)
                if fn is None:
                    # C++ Session::MakeCallable, as TF Serving's Session::Run: the feeds go
                    # to TensorFlow unchanged (the public make_callable with a feed list
                    # goes through Session.run, which checks shapes and casts dtypes).
                    options = config_pb2.CallableOptions(
                        feed=[sig.inputs[a].name for a in sorted(sig.inputs)],
                        fetch=[sig.outputs[a].name for a in outputs],
                    )
                    if inline:
                        options.run_options.inter_op_thread_pool = -1
                    fn = self._session._make_callable_from_options(options)
                    if len(self._callables) >= MAX_CACHED_CALLABLES:
                        self._callables.pop(next(iter(self._callables)))
                    self._callables[cache_key] = fn
        return fn

    def run_examples(
        self, signature_name: str, method: str, examples: list[bytes]
    ) -> dict[str, np.ndarray]:
        """Classify/Regress: serialized tf.Examples through the signature's ``inputs``.

        The signature is checked as ``classifier.cc``/``regressor.cc`` check it; its
        ``method_name`` only under ``--enable_signature_method_name_check`` (TF2's
        ``tf.saved_model.save`` always writes the predict method name).

        Returns:
            ``classes``/``scores`` (classify) or ``outputs`` (regress), validated.
        """
        name = signature_name or DEFAULT_SIGNATURE
        sig = self.signature_defs.get(name)
        if sig is None:
            raise invalid(f"No signature was found with the name: {name}")
        classify = method == CLASSIFY_METHOD
        kind = "classification" if classify else "regression"
        if self.method_name_check and sig.method_name != method:
            raise invalid(
                f"Expected {kind} signature method_name to be {method}. Was: {sig.method_name}"
            )
        if len(sig.inputs) != 1:
            raise invalid("Expected one input Tensor.")
        if classify and len(sig.outputs) not in (1, 2):
            raise invalid(f"Expected one or two output Tensors, found {len(sig.outputs)}")
        if not classify and len(sig.outputs) != 1:
            raise invalid("Expected one output Tensor.")
        if "inputs" not in sig.inputs:
            raise invalid(f"No {kind} inputs found in SignatureDef: {sig}")
        keys = ("classes", "scores") if classify else ("outputs",)
        wanted = [k for k in keys if k in sig.outputs]
        if not wanted:
            raise invalid(
                'Expected classification signature outputs to contain at least one of "classes" '
                f'or "scores". Signature was: {sig}'
                if classify
                else f"No regression outputs found in SignatureDef: {sig}"
            )
        if not examples:
            raise invalid("Input is empty.")
        arr = np.empty(len(examples), dtype=object)
        arr[:] = examples
        out = self._run(name, sig, {"inputs": arr}, wanted)
        n = len(examples)
        if classify:
            _check_classification(out, n)
        else:
            values = out["outputs"]
            if not (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)):
                raise invalid(
                    "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] "
                    f"but got {_shape(values)}"
                )
            if values.shape[0] != n:
                raise invalid(
                    f"Input batch size did not match output batch size: {n} vs. {values.shape[0]}"
                )
        return out

    # ---------------------------------------------------------------------------------------
    def warmup(self, iterations: int = 1) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests``; any failure fails the load."""
        from tensorflow_serving.apis import prediction_log_pb2

        path = self.path / WARMUP_FILE
        if not path.exists():
            return 0
        start = time.perf_counter()
        count = 0
        for raw in tf.data.TFRecordDataset(str(path)):
            if count >= MAX_WARMUP_RECORDS:
                raise ValueError(
                    f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}"
                )
            entry = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
            kind = entry.WhichOneof("log_type")
            for _ in range(max(1, iterations)):
                if kind == "predict_log":
                    req = entry.predict_log.request
                    inputs = {k: codec.to_numpy(v) for k, v in req.inputs.items()}
                    self.predict(req.model_spec.signature_name, inputs, list(req.output_filter))
                elif kind in ("classify_log", "regress_log"):
                    req = getattr(entry, kind).request
                    method = CLASSIFY_METHOD if kind == "classify_log" else REGRESS_METHOD
                    self.run_examples(req.model_spec.signature_name, method, examples_of(req.input))
                else:
                    raise ValueError(f"Unsupported log_type for warmup: {kind}")
            count += 1
        log.info(
            "%s/%d: %d warmup requests in %.2fs",
            self.name,
            self.version,
            count,
            time.perf_counter() - start,
        )
        return count


def _restore_and_init(session: Any, meta_graph: Any, path: Path) -> None:
    """What TensorFlow's C++ ``LoadSavedModel`` (TF Serving's loader) does with a MetaGraph:
    import the graph, run the saver's restore op on ``variables/variables`` and then the init
    op (``__saved_model_init_op``, or the TF1 main/legacy init op), feeding each asset tensor
    its file under ``assets/``.

    ``tf.compat.v1.saved_model.load`` is not used: it restores through a Python Saver that
    leaves the variables of Keras 3 exports uninitialized, which the C++ loader does not.
    """
    with session.graph.as_default():
        tf.compat.v1.import_graph_def(meta_graph.graph_def, name="")
    assets = {}
    asset_defs = list(meta_graph.asset_file_def)
    if not asset_defs and "saved_model_assets" in meta_graph.collection_def:
        for packed in meta_graph.collection_def["saved_model_assets"].any_list.value:
            asset = meta_graph_pb2.AssetFileDef()
            packed.Unpack(asset)
            asset_defs.append(asset)
    for asset in asset_defs:
        assets[asset.tensor_info.name] = str(path / "assets" / asset.filename)
    saver = meta_graph.saver_def
    if saver.restore_op_name and (path / "variables" / "variables.index").exists():
        session.run(
            saver.restore_op_name,
            {saver.filename_tensor_name: str(path / "variables" / "variables"), **assets},
        )
    init = meta_graph.signature_def.get(INIT_OP_SIGNATURE)
    if init is not None:
        init_op = init.outputs[INIT_OP_SIGNATURE].name
    else:
        init_op = ""
        collections = meta_graph.collection_def
        for key in ("saved_model_main_op", "legacy_init_op"):
            ops = collections[key].node_list.value if key in collections else []
            if ops:
                init_op = ops[0]
                break
    if init_op:
        session.run(session.graph.as_graph_element(init_op), assets)


def _read_meta_graph(path: Path, tags: Sequence[str]) -> Any:
    """The MetaGraph tagged exactly ``tags``, with TensorFlow C++'s codes and messages
    (reader.cc, loader.cc) rather than the Python loader's OSError/RuntimeError."""
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    binary, text = path / "saved_model.pb", path / "saved_model.pbtxt"
    sm = saved_model_pb2.SavedModel()
    try:
        if binary.is_file():
            try:
                sm.ParseFromString(binary.read_bytes())
            except message.DecodeError:
                raise ServingError(
                    grpc.StatusCode.DATA_LOSS, f"Can't parse {binary} as binary proto"
                ) from None
        elif text.is_file():
            try:
                text_format.Parse(text.read_text(), sm)
            except (text_format.ParseError, UnicodeDecodeError):
                raise ServingError(
                    grpc.StatusCode.DATA_LOSS, f"Can't parse {text} as text proto"
                ) from None
        else:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                "Could not find SavedModel .pb or .pbtxt at supplied export directory path: "
                f"{path}. Check that the directory exists and that you have the right "
                "permissions for accessing it.",
            )
    except PermissionError as e:
        raise ServingError(grpc.StatusCode.PERMISSION_DENIED, f"{e.filename}: {e.strerror}") from e
    wanted = set(tags)
    for graph in sm.meta_graphs:
        if set(graph.meta_info_def.tags) == wanted:
            return graph
    raise ServingError(
        grpc.StatusCode.NOT_FOUND,
        f"Could not find meta graph def matching supplied tags: {{ {' '.join(sorted(wanted))} "
        "}. To inspect available tag-sets in the SavedModel, please use the SavedModel CLI: "
        "`saved_model_cli`",
    )


def _shape(a: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in a.shape) + "]"


def _check_classification(out: dict[str, np.ndarray], n: int) -> None:
    """``PostProcessClassificationResult``'s checks."""
    for key, want in (("classes", "DT_STRING"), ("scores", "DT_FLOAT")):
        value = out.get(key)
        if value is None:
            continue
        if value.ndim != 2:
            raise invalid(
                f"Expected Tensor shape: [batch_size num_classes] but got {_shape(value)}"
            )
        have = (
            "DT_STRING"
            if value.dtype == object
            else codec.NAMES.get(codec.dtype_code(value.dtype), str(value.dtype))
        )
        if have != want:
            raise invalid(f"Expected {key} Tensor of {want}. Got: {have}")
        if value.shape[0] != n:
            raise invalid(f"Expected {key} output batch size of {n}. Got: {value.shape[0]}")
    if "classes" in out and "scores" in out and out["classes"].shape[1] != out["scores"].shape[1]:
        raise invalid(
            "Tensors class and score should match in dim_size(1). Got "
            f"{out['classes'].shape[1]} vs. {out['scores'].shape[1]}"
        )


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
