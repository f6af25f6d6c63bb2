"""The request path shared by gRPC and REST, and the gRPC servicers.

gRPC uses the official generated code from tensorflow-serving-api
(``tensorflow.serving.PredictionService`` and ``tensorflow.serving.ModelService``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import any_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving import codec, wire
from serving.server.batching import Batcher
from serving.server.errors import ServingError, invalid
from serving.server.manager import ModelManager
from serving.server.metrics import Metrics
from serving.server.servable import CLASSIFY_METHOD, REGRESS_METHOD, Servable, examples_of

log = logging.getLogger(__name__)

STATE_ENUM = get_model_status_pb2.ModelVersionStatus.State
T = TypeVar("T")


class _Measured:
    """A request's count and latency, recorded when the block exits (by status code)."""

    __slots__ = ("labels", "metrics", "start")

    def __init__(self, metrics: Metrics, model: str, api: str, entrypoint: str):
        self.metrics = metrics
        self.labels = (model, api, entrypoint)

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        status = "OK"
        if isinstance(error, ServingError):
            status = error.code.name
        elif isinstance(error, Exception):
            status = "INTERNAL"
        self.metrics.request(*self.labels, status, time.perf_counter() - self.start)


class Core:
    """Resolve the servable, check inputs, run (batched or not) and count.

    Runs on the server's event loop; the model itself runs on ``pool`` (or the batcher's
    threads), never on the loop.
    """

    def __init__(
        self,
        manager: ModelManager,
        metrics: Metrics,
        pool: Executor,
        batcher: Batcher | None = None,
        tensor_content: bool = False,
        max_elements: int | None = None,
    ):
        self.manager = manager
        self.metrics = metrics
        self.pool = pool
        self.batcher = batcher
        self.max_elements = max_elements
        # TF Serving answers with the typed *_val fields unless
        # --enable_serialization_as_tensor_content.
        self.as_fields = not tensor_content

    def measured(self, model: str, api: str, entrypoint: str) -> _Measured:
        """``with core.measured(...)``: count the request and its latency, by outcome."""
        return _Measured(self.metrics, model, api, entrypoint)

    async def run(self, servable: Servable, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, a call of ``servable``'s model: on the model pool, or right here on
        the event loop when the model answers faster than a thread hand-off (two context
        switches and a wake-up of the loop) would cost; a model that slows down moves to the
        pool on its next call, so the loop is never held for long."""
        if servable.runs_inline:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def decode_inputs(self, inputs: Any) -> dict[str, np.ndarray]:
        """Request TensorProtos → arrays; a tensor TensorFlow could not build (or one over
        ``--max_request_elements``) is INVALID_ARGUMENT, as ``Tensor::FromProto`` failing is."""
        out = {}
        for alias, proto in inputs.items():
            try:
                out[alias] = codec.to_numpy(proto, self.max_elements)
            except codec.CodecError as e:
                raise invalid(f"tensor parsing error: {alias} ({e})") from e
        return out

    async def predict(
        self, model_spec: Any, inputs: dict[str, np.ndarray], output_filter: tuple[str, ...]
    ) -> tuple[Servable, str, dict[str, np.ndarray]]:
        servable = self.manager.resolve(model_spec)
        signature = model_spec.signature_name or "serving_default"
        feeds = servable.check_predict(signature, inputs, output_filter)
        if self.batcher is not None:
            outputs = await self.batcher.submit(servable, signature, feeds, output_filter)
        else:
            outputs = await self.run(
                servable, servable.run_checked, signature, feeds, output_filter
            )
        return servable, signature, outputs

    async def infer_examples(
        self, model_spec: Any, method: str, examples: list[bytes]
    ) -> tuple[Servable, str, dict[str, np.ndarray]]:
        servable = self.manager.resolve(model_spec)
        signature = model_spec.signature_name or "serving_default"
        outputs = await self.run(servable, servable.run_examples, signature, method, examples)
        return servable, signature, outputs


def classifications(outputs: dict[str, np.ndarray]) -> Any:
    """ClassificationResult from a classify signature's ``classes`` and/or ``scores``."""
    result = classification_pb2.ClassificationResult()
    classes = outputs.get("classes")
    scores = outputs.get("scores")
    rows = classes if classes is not None else scores
    if rows is None:
        raise invalid("classification signature has neither 'classes' nor 'scores' outputs")
    for i in range(rows.shape[0]):
        c = result.classifications.add()
        width = rows.shape[1] if rows.ndim > 1 else 1
        for j in range(width):
            cls = c.classes.add()
            if classes is not None:
                value = classes[i][j] if classes.ndim > 1 else classes[i]
                cls.label = value.decode() if isinstance(value, bytes) else str(value)
            if scores is not None:
                cls.score = float(scores[i][j] if scores.ndim > 1 else scores[i])
    return result


def regressions(outputs: dict[str, np.ndarray]) -> Any:
    values = outputs.get("outputs")
    if values is None:
        raise invalid("regression signature has no 'outputs' output")
    result = regression_pb2.RegressionResult()
    for v in values.reshape(values.shape[0], -1)[:, 0]:
        result.regressions.add().value = float(v)
    return result


def _spec(response_spec: Any, servable: Servable, signature: str) -> None:
    response_spec.name = servable.name
    response_spec.version.value = servable.version
    response_spec.signature_name = signature


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Returns the serialized response (``wire.encode_predict_response``, the bytes
        protobuf would write, without building the message)."""

        async def handle() -> bytes:
            core = self.core
            inputs = core.decode_inputs(request.inputs)
            servable, sig, outputs = await core.predict(
                request.model_spec, inputs, tuple(request.output_filter)
            )
            return wire.encode_predict_response(servable.spec_bytes(sig), outputs, core.as_fields)

        return await _serve(self.core, request.model_spec.name, "predict", context, handle)

    async def Classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._examples(
            request,
            context,
            CLASSIFY_METHOD,
            "classify",
            classification_pb2.ClassificationResponse,
            classifications,
        )

    async def Regress(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._examples(
            request,
            context,
            REGRESS_METHOD,
            "regress",
            regression_pb2.RegressionResponse,
            regressions,
        )

    async def _examples(
        self,
        request: Any,
        context: grpc.aio.ServicerContext,
        method: str,
        api: str,
        response_cls: Any,
        to_result: Callable[[dict[str, np.ndarray]], Any],
    ) -> Any:
        """Classify/Regress: serialized tf.Examples through a classify/regress signature."""

        async def handle() -> Any:
            servable, sig, outputs = await self.core.infer_examples(
                request.model_spec, method, examples_of(request.input)
            )
            response = response_cls()
            _spec(response.model_spec, servable, sig)
            response.result.CopyFrom(to_result(outputs))
            return response

        return await _serve(self.core, request.model_spec.name, api, context, handle)

    async def MultiInference(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def handle() -> Any:
            # multi_inference_helper.cc: the servable comes from the first task's ModelSpec
            # (an empty one without tasks: NOT_FOUND), every task must name that model.
            first = request.tasks[0].model_spec if request.tasks else model_pb2.ModelSpec()
            servable = self.core.manager.resolve(first)
            signatures = set()
            for task in request.tasks:
                if not task.model_spec.name:
                    raise invalid("Found ModelSpec with an empty model name.")
                if task.model_spec.name != first.name:
                    raise invalid(
                        "All ModelSpecs in a MultiInferenceRequest must access the same model name."
                    )
                signature = task.model_spec.signature_name or "serving_default"
                if signature in signatures:
                    raise invalid("Duplicate evaluation of signature: " + signature)
                signatures.add(signature)
                if signature not in servable.signature_defs:
                    raise invalid(f"Requested signature not found in model graph: {signature}")
                if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
                    raise ServingError(
                        grpc.StatusCode.UNIMPLEMENTED,
                        f"Unsupported signature method_name: {task.method_name}",
                    )
            examples = examples_of(request.input)
            response = inference_pb2.MultiInferenceResponse()
            for task in request.tasks:
                servable, sig, outputs = await self.core.infer_examples(
                    task.model_spec, task.method_name, examples
                )
                result = response.results.add()
                _spec(result.model_spec, servable, sig)
                if task.method_name == CLASSIFY_METHOD:
                    result.classification_result.CopyFrom(classifications(outputs))
                else:
                    result.regression_result.CopyFrom(regressions(outputs))
            return response

        name = request.tasks[0].model_spec.name if request.tasks else ""
        return await _serve(self.core, name, "multi_inference", context, handle)

    async def GetModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def handle() -> Any:
            return model_metadata(self.core.manager, request)

        return await _serve(self.core, request.model_spec.name, "metadata", context, handle)


def model_metadata(manager: ModelManager, request: Any) -> Any:
    if not request.metadata_field:
        raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
    for field_name in request.metadata_field:
        if field_name != "signature_def":
            raise invalid(f"Metadata field {field_name} is not supported")
    servable = manager.resolve(request.model_spec)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    sigs = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in servable.meta_graph.signature_def.items():
        sigs.signature_def[key].CopyFrom(sig)
    packed = any_pb2.Any()
    packed.Pack(sigs)
    response.metadata["signature_def"].CopyFrom(packed)
    return response


def model_status(manager: ModelManager, request: Any) -> Any:
    response = get_model_status_pb2.GetModelStatusResponse()
    for version, state in manager.status(request.model_spec):
        status = response.model_version_status.add()
        status.version = version
        status.state = STATE_ENUM.Value(state.state)
        status.status.error_code = _error_code(state.error_code)
        status.status.error_message = state.error_message
    return response


def _error_code(name: str) -> int:
    """tensorflow.error.Code numbers are the canonical gRPC status numbers."""
    return {c.name: c.value[0] for c in grpc.StatusCode}.get(name, 2)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: Core, on_reload: Callable[[Any], Awaitable[None]]):
        self.core = core
        self.on_reload = on_reload

    async def GetModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def handle() -> Any:
            return model_status(self.core.manager, request)

        return await _serve(
            self.core, request.model_spec.name, "status", context, handle, count=False
        )

    async def HandleReloadConfigRequest(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        async def handle() -> Any:
            await self.on_reload(request.config)
            return model_management_pb2.ReloadConfigResponse()

        return await _serve(self.core, "", "reload", context, handle, count=False)


async def _serve(
    core: Core,
    model: str,
    api: str,
    context: grpc.aio.ServicerContext,
    handle: Callable[[], Awaitable[Any]],
    count: bool = True,
) -> Any:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    try:
        if not count:
            return await handle()
        with core.measured(model, api, "GRPC"):
            return await handle()
    except ServingError as e:
        await context.abort(e.code, e.message)
    except Exception as e:
        log.exception("%s failed", api)
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
