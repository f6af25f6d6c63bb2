"""A light, polite gRPC client for TF Serving (and our embedded server).

Light: it needs grpcio, protobuf and numpy, never TensorFlow (messages come from
``serving.protos``, tensors from ``serving.codec``). Polite: a default deadline every call can
override, ``wait_for_ready`` while a server starts, retries of idempotent calls only on
UNAVAILABLE with exponential backoff and a retry budget (gRPC service config), keepalive, large
message limits, round_robin over every address of a ``dns:///`` target (a headless Kubernetes
Service), TLS and mutual TLS.

    with ServingClient("localhost:8500", model="digits") as client:
        outputs = client.predict({"image": batch})      # dict of numpy arrays
        outputs.version                                  # the version that answered

``python -m serving.client {predict,status,metadata}`` is the command-line front end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving import codec, protos, wire
from serving.errors import (
    DeadlineExceededError,
    InvalidInputError,
    ModelNotFoundError,
    ServingClientError,
    UnavailableError,
    from_rpc_error,
)

DEFAULT_TIMEOUT = 10.0
MAX_MESSAGE_BYTES = 256 << 20
STATES = {0: "UNKNOWN", 10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}


# --- plain results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, "object" for strings
    shape: tuple[int, ...] | None  # -1 for any size; None when the rank is unknown


@dataclass(frozen=True)
class Signature:
    name: str
    method: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]


@dataclass(frozen=True)
class ModelMetadata:
    model: str
    version: int
    signatures: dict[str, Signature]


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: str
    error_code: int = 0
    error_message: str = ""


class Outputs(dict[str, np.ndarray]):
    """A Predict result: output name → array, plus the model version that answered."""

    def __init__(self, outputs: Mapping[str, np.ndarray], model: str, version: int, signature: str):
        super().__init__(outputs)
        self.model = model
        self.version = version
        self.signature = signature


# Calls that change nothing on the server: safe to send again. HandleReloadConfigRequest is
# not among them (a retried reload can undo a newer one that landed in between).
IDEMPOTENT_METHODS = (
    ("tensorflow.serving.PredictionService", "Predict"),
    ("tensorflow.serving.PredictionService", "Classify"),
    ("tensorflow.serving.PredictionService", "Regress"),
    ("tensorflow.serving.PredictionService", "MultiInference"),
    ("tensorflow.serving.PredictionService", "GetModelMetadata"),
    ("tensorflow.serving.ModelService", "GetModelStatus"),
)


@dataclass
class RetryPolicy:
    """Retries of idempotent calls that failed with UNAVAILABLE, in the channel's service
    config, under gRPC's retry throttling: each failure costs a token, each success gives back
    ``token_ratio``, and retries stop while fewer than half of ``max_tokens`` are left, so a
    server that is down is not hit with ``max_attempts`` times the traffic."""

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    max_tokens: int = 10
    token_ratio: float = 0.1

    def service_config(self, load_balancing: str) -> str:
        config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
        if self.max_attempts > 1:
            config["methodConfig"] = [
                {
                    "name": [
                        {"service": service, "method": method}
                        for service, method in IDEMPOTENT_METHODS
                    ],
                    "retryPolicy": {
                        "maxAttempts": min(self.max_attempts, 5),  # gRPC caps attempts at 5
                        "initialBackoff": f"{self.initial_backoff}s",
                        "maxBackoff": f"{self.max_backoff}s",
                        "backoffMultiplier": self.multiplier,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
            config["retryThrottling"] = {
                "maxTokens": self.max_tokens,
                "tokenRatio": self.token_ratio,
            }
        return json.dumps(config)


@dataclass
class ChannelOptions:
    """How the channel connects; the defaults suit a client in front of TF Serving."""

    timeout: float = DEFAULT_TIMEOUT
    wait_for_ready: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    load_balancing: str = "round_robin"
    max_message_bytes: int = MAX_MESSAGE_BYTES
    keepalive_seconds: float = 30.0
    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = None
    tls: bool = False
    server_name_override: str = ""

    def grpc_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 1 if self.retry.max_attempts > 1 else 0),
            ("grpc.service_config", self.retry.service_config(self.load_balancing)),
        ]
        if self.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.server_name_override))
        return options

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_certificates or self.client_certificate):
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_key,
            certificate_chain=self.client_certificate,
        )


# --- requests and responses (shared by the sync and async clients) ------------------------------


def _model_spec(
    spec: Any, model: str, version: int | None, label: str | None, signature: str | None
) -> None:
    if version is not None and label:
        raise ValueError("give a version or a label, not both")
    spec.name = model
    if version is not None:
        spec.version.value = int(version)
    elif label:
        spec.version_label = label
    if signature is not None:
        spec.signature_name = signature


def _as_inputs(inputs: Mapping[str, Any] | np.ndarray, default_name: str) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        return {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in inputs.items()}
    return {default_name: np.asarray(inputs)}


def build_predict(
    model: str,
    inputs: dict[str, np.ndarray],
    version: int | None,
    label: str | None,
    signature: str,
    output_filter: Sequence[str],
) -> bytes:
    """A serialized PredictRequest; array data is copied once, straight into the wire bytes."""
    request = protos.PredictRequest()
    _model_spec(request.model_spec, model, version, label, signature)
    request.output_filter.extend(output_filter)
    try:
        return wire.encode_predict_request(request, inputs)
    except codec.CodecError as e:
        raise InvalidInputError(str(e)) from e


def parse_predict(response: tuple[Any, dict[str, np.ndarray]]) -> Outputs:
    spec, outputs = response
    return Outputs(outputs, spec.name, spec.version.value, spec.signature_name)


def to_example(example: Mapping[str, Any] | bytes) -> Any:
    """A ``tensorflow.Example`` from a dict of feature values (ints, floats, strings, bytes)."""
    if isinstance(example, bytes):
        return protos.Example.FromString(example)
    proto = protos.Example()
    for name, value in example.items():
        values = list(value) if isinstance(value, list | tuple | np.ndarray) else [value]
        feature = proto.features.feature[name]
        if all(isinstance(v, bytes | str) for v in values):
            feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
        elif all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
            feature.int64_list.value.extend(int(v) for v in values)
        elif all(isinstance(v, int | float | np.number) for v in values):
            feature.float_list.value.extend(float(v) for v in values)
        else:
            raise InvalidInputError(f"feature '{name}': values must be all numbers or all strings")
    return proto


def build_examples_request(
    cls: Any,
    model: str,
    examples: Iterable[Mapping[str, Any] | bytes],
    version: int | None,
    label: str | None,
    signature: str,
) -> Any:
    request = cls()
    _model_spec(request.model_spec, model, version, label, signature)
    request.input.example_list.examples.extend(to_example(e) for e in examples)
    return request


def parse_classify(response: Any) -> list[list[tuple[str, float]]]:
    return [[(c.label, c.score) for c in item.classes] for item in response.result.classifications]


def parse_regress(response: Any) -> np.ndarray:
    return np.array([r.value for r in response.result.regressions], dtype=np.float32)


def _spec(info: Any, name: str) -> TensorSpec:
    dtype = (
        np.dtype(codec.numpy_dtype(info.dtype)).name
        if info.dtype in codec.NAMES
        else str(info.dtype)
    )
    shape = (
        None
        if info.tensor_shape.unknown_rank
        else tuple(int(d.size) for d in info.tensor_shape.dim)
    )
    return TensorSpec(name, dtype, shape)


def parse_metadata(response: Any) -> ModelMetadata:
    sigs = protos.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sigs)
    signatures = {
        name: Signature(
            name,
            sig.method_name,
            {k: _spec(v, k) for k, v in sig.inputs.items()},
            {k: _spec(v, k) for k, v in sig.outputs.items()},
        )
        for name, sig in sigs.signature_def.items()
        if not name.startswith("__")
    }
    return ModelMetadata(response.model_spec.name, response.model_spec.version.value, signatures)


def parse_status(response: Any) -> list[VersionStatus]:
    return [
        VersionStatus(
            s.version,
            STATES.get(s.state, str(s.state)),
            s.status.error_code,
            s.status.error_message,
        )
        for s in response.model_version_status
    ]


def check_inputs(signature: Signature, inputs: dict[str, np.ndarray]) -> None:
    """Compare inputs with a signature; raise InvalidInputError saying what was expected."""
    expected, got = set(signature.inputs), set(inputs)
    if expected != got:
        raise InvalidInputError(
            f"signature '{signature.name}' takes inputs {sorted(expected)}; got {sorted(got)}"
            + (f" (missing {sorted(expected - got)})" if expected - got else "")
            + (f" (unexpected {sorted(got - expected)})" if got - expected else "")
        )
    for name, spec in signature.inputs.items():
        value = inputs[name]
        have = "object" if value.dtype.kind in "SUO" else value.dtype.name
        if have != spec.dtype:
            raise InvalidInputError(f"input '{name}': expected dtype {spec.dtype}, got {have}")
        if spec.shape is not None and (
            value.ndim != len(spec.shape)
            or any(d >= 0 and d != s for d, s in zip(spec.shape, value.shape))
        ):
            raise InvalidInputError(
                f"input '{name}': expected shape {list(spec.shape)} (-1 = any), "
                f"got {list(value.shape)}"
            )


def _request(method: str, request_cls: Any, response_cls: Any) -> tuple[str, Any, Any]:
    return method, request_cls.SerializeToString, response_cls.FromString


_METHODS = {
    # Predict skips the message classes both ways: see serving/wire.py.
    "predict": (protos.PREDICT, None, wire.decode_predict_response),
    "classify": _request(
        protos.CLASSIFY, protos.ClassificationRequest, protos.ClassificationResponse
    ),
    "regress": _request(protos.REGRESS, protos.RegressionRequest, protos.RegressionResponse),
    "metadata": _request(
        protos.GET_MODEL_METADATA, protos.GetModelMetadataRequest, protos.GetModelMetadataResponse
    ),
    "status": _request(
        protos.GET_MODEL_STATUS, protos.GetModelStatusRequest, protos.GetModelStatusResponse
    ),
    "reload": _request(
        protos.RELOAD_CONFIG, protos.ReloadConfigRequest, protos.ReloadConfigResponse
    ),
}


def _config_message(config: Any) -> Any:
    """A ModelServerConfig of ours from one of ours, an official one, or its text format."""
    from google.protobuf import text_format

    if isinstance(config, str):
        return text_format.Parse(config, protos.ModelServerConfig())
    return protos.ModelServerConfig.FromString(config.SerializeToString())


class _Base:
    def __init__(
        self,
        target: str,
        *,
        model: str,
        version: int | None = None,
        label: str | None = None,
        signature: str = "serving_default",
        timeout: float = DEFAULT_TIMEOUT,
        wait_for_ready: bool = False,
        retries: int = 3,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        client_certificate: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
        server_name_override: str = "",
        validate_inputs: bool = False,
        options: ChannelOptions | None = None,
    ):
        if version is not None and label:
            raise ValueError("give a version or a label, not both")
        self.target = target
        self.model = model
        self.version = version
        self.label = label
        self.signature = signature
        self.validate_inputs = validate_inputs
        self.options = options or ChannelOptions(
            timeout=timeout,
            wait_for_ready=wait_for_ready,
            retry=RetryPolicy(max_attempts=retries + 1),
            tls=tls,
            root_certificates=_pem(root_certificates),
            client_certificate=_pem(client_certificate),
            client_key=_pem(client_key),
            server_name_override=server_name_override,
        )
        self._metadata: dict[tuple[int | None, str | None], ModelMetadata] = {}

    def _needs_metadata(self, inputs: Mapping[str, Any] | np.ndarray) -> bool:
        """A bare array needs the input's name; validation needs the whole signature."""
        return not isinstance(inputs, Mapping) or self.validate_inputs

    def _predict_request(
        self,
        inputs: Mapping[str, Any] | np.ndarray,
        meta: ModelMetadata | None,
        version: int | None,
        label: str | None,
        signature: str,
        output_filter: Sequence[str],
    ) -> bytes:
        default = "inputs"
        sig = None
        if meta is not None:
            sig = meta.signatures.get(signature)
            if sig is None:
                raise InvalidInputError(f"model {self.model} has no signature '{signature}'")
            if len(sig.inputs) == 1:
                default = next(iter(sig.inputs))
        arrays = _as_inputs(inputs, default)
        if sig is not None and self.validate_inputs:
            check_inputs(sig, arrays)
        return build_predict(self.model, arrays, version, label, signature, output_filter)

    def _request(self, cls: Any, version: int | None, label: str | None) -> Any:
        """A metadata or status request for this model (metadata asks for signature_def)."""
        request = cls()
        if cls is protos.GetModelMetadataRequest:
            request.metadata_field.append("signature_def")
        _model_spec(request.model_spec, self.model, version, label, None)
        return request

    def _choice(self, version: int | None, label: str | None) -> tuple[int | None, str | None]:
        if version is not None or label:
            return version, label
        return self.version, self.label


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class ServingClient(_Base):
    """Blocking client for one model. Thread-safe; reuse one instance (one channel)."""

    def __init__(self, target: str, **kwargs: Any):
        super().__init__(target, **kwargs)
        creds = self.options.credentials()
        grpc_options = self.options.grpc_options()
        self.channel = (
            grpc.secure_channel(target, creds, grpc_options)
            if creds
            else grpc.insecure_channel(target, grpc_options)
        )
        self._calls = {
            name: self.channel.unary_unary(path, request_serializer=ser, response_deserializer=de)
            for name, (path, ser, de) in _METHODS.items()
        }

    def _call(self, name: str, request: Any, timeout: float | None) -> Any:
        try:
            return self._calls[name](
                request,
                timeout=timeout if timeout is not None else self.options.timeout,
                wait_for_ready=self.options.wait_for_ready,
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.target) from e

    def predict(
        self,
        inputs: Mapping[str, Any] | np.ndarray,
        *,
        version: int | None = None,
        label: str | None = None,
        signature: str | None = None,
        output_filter: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Outputs:
        """Run a Predict. A bare array is sent as the signature's only input.

        Returned arrays are read-only views of the response bytes (no copy); ``np.array(x)``
        gives a writable copy.
        """
        version, label = self._choice(version, label)
        signature = signature or self.signature
        meta = self.metadata(version=version, label=label) if self._needs_metadata(inputs) else None
        request = self._predict_request(inputs, meta, version, label, signature, output_filter)
        return parse_predict(self._call("predict", request, timeout))

    def classify(
        self,
        examples: Iterable[Mapping[str, Any] | bytes],
        *,
        version: int | None = None,
        label: str | None = None,
        signature: str = "classification",
        timeout: float | None = None,
    ) -> list[list[tuple[str, float]]]:
        """(label, score) pairs per example, through a classify signature."""
        version, label = self._choice(version, label)
        request = build_examples_request(
            protos.ClassificationRequest, self.model, examples, version, label, signature
        )
        return parse_classify(self._call("classify", request, timeout))

    def regress(
        self,
        examples: Iterable[Mapping[str, Any] | bytes],
        *,
        version: int | None = None,
        label: str | None = None,
        signature: str = "regression",
        timeout: float | None = None,
    ) -> np.ndarray:
        """One value per example, through a regress signature."""
        version, label = self._choice(version, label)
        request = build_examples_request(
            protos.RegressionRequest, self.model, examples, version, label, signature
        )
        return parse_regress(self._call("regress", request, timeout))

    def metadata(
        self,
        *,
        version: int | None = None,
        label: str | None = None,
        timeout: float | None = None,
        refresh: bool = False,
    ) -> ModelMetadata:
        """The model's signatures as plain objects (cached per version/label)."""
        version, label = self._choice(version, label)
        key = (version, label)
        if refresh or key not in self._metadata:
            request = self._request(protos.GetModelMetadataRequest, version, label)
            self._metadata[key] = parse_metadata(self._call("metadata", request, timeout))
        return self._metadata[key]

    def status(
        self, version: int | None = None, *, label: str | None = None, timeout: float | None = None
    ) -> list[VersionStatus]:
        """GetModelStatus: every version the server knows of (or one)."""
        request = self._request(protos.GetModelStatusRequest, version, label)
        return parse_status(self._call("status", request, timeout))

    def wait_until_available(
        self, version: int | None = None, deadline: float = 60.0, poll: float = 0.2
    ) -> VersionStatus:
        """Poll until ``version`` (or any version) is AVAILABLE.

        Raises:
            DeadlineExceededError: not AVAILABLE in time (the last status is in the message).
            ServingClientError: the version failed to load (state END with an error).
        """
        end = time.monotonic() + deadline
        last: Any = None
        while True:
            try:
                states = self.status(version, timeout=max(0.1, min(5.0, end - time.monotonic())))
            except (ModelNotFoundError, UnavailableError, DeadlineExceededError) as e:
                last = e  # not loaded yet, or the server is still starting
            else:
                last = states
                ready = [s for s in states if s.state == "AVAILABLE"]
                if ready:
                    return ready[0]
                failed = [s for s in states if s.state == "END" and s.error_message]
                if version is not None and failed:
                    raise ServingClientError(
                        f"{self.target}: {self.model} version {version} failed to load: "
                        f"{failed[0].error_message}"
                    )
            if time.monotonic() >= end:
                what = f"version {version}" if version is not None else "no version"
                raise DeadlineExceededError(
                    f"{self.target}: {self.model} {what} AVAILABLE after {deadline:g}s "
                    f"(last: {last})"
                )
            time.sleep(poll)

    def reload_config(self, config: Any, timeout: float | None = None) -> None:
        """HandleReloadConfigRequest: replace the server's whole model config."""
        request = protos.ReloadConfigRequest()
        request.config.CopyFrom(_config_message(config))
        response = self._call("reload", request, timeout)
        if response.status.error_code:
            raise ServingClientError(
                f"{self.target}: reload refused: {response.status.error_message}"
            )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncServingClient(_Base):
    """The same client on grpc.aio, for callers with many requests in flight."""

    def __init__(self, target: str, **kwargs: Any):
        super().__init__(target, **kwargs)
        creds = self.options.credentials()
        grpc_options = self.options.grpc_options()
        self.channel = (
            grpc.aio.secure_channel(target, creds, grpc_options)
            if creds
            else grpc.aio.insecure_channel(target, grpc_options)
        )
        self._calls = {
            name: self.channel.unary_unary(path, request_serializer=ser, response_deserializer=de)
            for name, (path, ser, de) in _METHODS.items()
        }

    async def _call(self, name: str, request: Any, timeout: float | None) -> Any:
        try:
            return await self._calls[name](
                request,
                timeout=timeout if timeout is not None else self.options.timeout,
                wait_for_ready=self.options.wait_for_ready,
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.target) from e

    async def predict(
        self,
        inputs: Mapping[str, Any] | np.ndarray,
        *,
        version: int | None = None,
        label: str | None = None,
        signature: str | None = None,
        output_filter: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Outputs:
        version, label = self._choice(version, label)
        signature = signature or self.signature
        meta = None
        if self._needs_metadata(inputs):
            meta = await self.metadata(version=version, label=label)
        request = self._predict_request(inputs, meta, version, label, signature, output_filter)
        return parse_predict(await self._call("predict", request, timeout))

    async def classify(
        self,
        examples: Iterable[Mapping[str, Any] | bytes],
        *,
        version: int | None = None,
        label: str | None = None,
        signature: str = "classification",
        timeout: float | None = None,
    ) -> list[list[tuple[str, float]]]:
        version, label = self._choice(version, label)
        request = build_examples_request(
            protos.ClassificationRequest, self.model, examples, version, label, signature
        )
        return parse_classify(await self._call("classify", request, timeout))

    async def regress(
        self,
        examples: Iterable[Mapping[str, Any] | bytes],
        *,
        version: int | None = None,
        label: str | None = None,
        signature: str = "regression",
        timeout: float | None = None,
    ) -> np.ndarray:
        version, label = self._choice(version, label)
        request = build_examples_request(
            protos.RegressionRequest, self.model, examples, version, label, signature
        )
        return parse_regress(await self._call("regress", request, timeout))

    async def metadata(
        self, *, version: int | None = None, label: str | None = None, timeout: float | None = None
    ) -> ModelMetadata:
        version, label = self._choice(version, label)
        key = (version, label)
        if key not in self._metadata:
            request = self._request(protos.GetModelMetadataRequest, version, label)
            self._metadata[key] = parse_metadata(await self._call("metadata", request, timeout))
        return self._metadata[key]

    async def status(
        self, version: int | None = None, *, label: str | None = None, timeout: float | None = None
    ) -> list[VersionStatus]:
        request = self._request(protos.GetModelStatusRequest, version, label)
        return parse_status(await self._call("status", request, timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncServingClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# --- command line -------------------------------------------------------------------------------


def load_input(path: Path, signature: Signature) -> dict[str, np.ndarray]:
    """An image, .npy or .json file → the signature's inputs (batch of one where needed)."""
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    names = list(signature.inputs)
    if suffix in (".png", ".jpg", ".jpeg", ".bmp", ".gif"):
        image_inputs = [
            n for n, s in signature.inputs.items() if s.shape is not None and len(s.shape) == 4
        ]
        if len(image_inputs) != 1:
            raise InvalidInputError(
                f"signature '{signature.name}' has no single image input [batch, h, w, c]; "
                f"its inputs are {names}"
            )
        name = image_inputs[0]
        spec = signature.inputs[name]
        assert spec.shape is not None
        _, h, w, c = spec.shape
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError as e:  # pragma: no cover - pillow is a client dependency
            raise InvalidInputError("reading images needs pillow: pip install pillow") from e
        try:
            with Image.open(path) as img:
                converted = img.convert("L" if c == 1 else "RGB")
                if h > 0 and w > 0:
                    converted = converted.resize((w, h), Image.Resampling.BILINEAR)
                pixels = np.asarray(converted, dtype=spec.dtype)
        except (UnidentifiedImageError, OSError) as e:
            raise InvalidInputError(f"{path}: cannot decode image: {e}") from e
        return {name: pixels.reshape(1, *pixels.shape[:2], c)}
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise InvalidInputError(f"{path}: not a .npy array: {e}") from e
        if len(names) != 1:
            raise InvalidInputError(f"a .npy file feeds one input; the signature takes {names}")
        return {names[0]: _fit(array, signature.inputs[names[0]])}
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e
        if isinstance(data, dict) and ("instances" in data or "inputs" in data):
            data = data.get("inputs", data.get("instances"))
            if isinstance(data, list) and data and isinstance(data[0], dict):
                data = {k: [row[k] for row in data] for k in data[0]}
        if not isinstance(data, dict):
            if len(names) != 1:
                raise InvalidInputError(f"{path}: give an object keyed by input name {names}")
            data = {names[0]: data}
        unknown = set(data) - set(names)
        if unknown:
            raise InvalidInputError(f"{path}: unknown inputs {sorted(unknown)}; expected {names}")
        return {k: _fit(np.asarray(v), signature.inputs[k]) for k, v in data.items()}
    raise InvalidInputError(f"{path}: expected an image, .npy or .json file")


def _fit(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Cast to the signature's dtype and add the batch dimension when it is missing."""
    if spec.dtype == "object":
        array = np.asarray(
            [v.encode() if isinstance(v, str) else v for v in array.ravel().tolist()], dtype=object
        ).reshape(array.shape)
    else:
        array = array.astype(spec.dtype)
    if spec.shape is not None and array.ndim == len(spec.shape) - 1:
        array = array[None, ...]
    return array


def top_classes(outputs: Outputs, labels: list[str] | None, top: int) -> list[list[dict[str, Any]]]:
    """Per example, the ``top`` classes by probability: id, label (from ``labels``, else the
    model's ``classes`` output for its top class, else None) and score."""
    probs = outputs.get("probabilities")
    if probs is None or probs.ndim != 2:
        return []
    names = outputs.get("classes")
    rows = []
    for i, row in enumerate(probs):
        entries = []
        for rank, j in enumerate(np.argsort(row)[::-1][:top]):
            label = labels[j] if labels and j < len(labels) else None
            if label is None and rank == 0 and names is not None:
                value = names[i]
                label = value.decode() if isinstance(value, bytes) else str(value)
            entries.append({"id": int(j), "label": label, "score": float(row[j])})
        rows.append(entries)
    return rows


def _format_outputs(outputs: Outputs, labels: list[str] | None, top: int) -> str:
    lines = [f"model {outputs.model} version {outputs.version} (signature {outputs.signature})"]
    rows = top_classes(outputs, labels, top)
    if rows:
        unnamed = False
        for i, entries in enumerate(rows):
            parts = []
            for e in entries:
                if e["label"] is None:
                    unnamed = True
                    parts.append(f"id {e['id']}: {e['score']:.4f}")
                elif labels:
                    parts.append(f"{e['label']}: {e['score']:.4f}")
                else:
                    parts.append(f"{e['label']} (id {e['id']}): {e['score']:.4f}")
            lines.append(f"[{i}] " + ", ".join(parts))
        if unnamed:
            lines.append("(the model names only its top class; --labels FILE names them all)")
        return "\n".join(lines)
    if "predictions" in outputs:
        for i, v in enumerate(np.atleast_1d(outputs["predictions"])):
            lines.append(f"[{i}] {np.asarray(v).tolist()}")
        return "\n".join(lines)
    for name, value in outputs.items():
        shown = value.tolist() if value.size <= 20 else f"array of shape {list(value.shape)}"
        lines.append(f"{name} ({value.dtype}, {list(value.shape)}): {shown}")
    return "\n".join(lines)


def _json_outputs(outputs: Outputs, labels: list[str] | None, top: int) -> str:
    """The reply for scripts: every output as a list (strings decoded), plus ``top``."""

    def plain(value: np.ndarray) -> Any:
        if value.dtype == object:
            return np.vectorize(
                lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else v,
                otypes=[object],
            )(value).tolist()
        return value.tolist()

    return json.dumps(
        {
            "model": outputs.model,
            "version": outputs.version,
            "signature": outputs.signature,
            "outputs": {k: plain(v) for k, v in outputs.items()},
            "top": top_classes(outputs, labels, top),
        }
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.client", description="Talk to a TF Serving model over gRPC."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default="localhost:8500",
        help="host:port or dns:///name:port (default localhost:8500)",
    )
    common.add_argument("--model", required=True, help="model name")
    which = common.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="a specific version")
    which.add_argument("--label", help="a version label, e.g. stable or canary")
    common.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="deadline per call in seconds (default 10)",
    )
    common.add_argument(
        "--wait",
        type=float,
        default=0,
        help="first wait up to this many seconds for the model to be AVAILABLE",
    )
    common.add_argument("--tls", action="store_true", help="use TLS (system roots by default)")
    common.add_argument("--ca", help="PEM file of the CA that signed the server certificate")
    common.add_argument("--cert", help="client certificate PEM (mutual TLS)")
    common.add_argument("--key", help="client private key PEM (mutual TLS)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pr = sub.add_parser("predict", parents=[common], help="predict on an image, .npy or .json")
    pr.add_argument("--input", required=True, type=Path, help="image, .npy or .json file")
    pr.add_argument("--signature", default="serving_default")
    pr.add_argument("--labels", type=Path, help="class names, one per line (e.g. labels.txt)")
    pr.add_argument("--top", type=int, default=3, help="classes to show (default 3)")
    pr.add_argument("--json", action="store_true", help="print the reply as one JSON object")
    sub.add_parser("status", parents=[common], help="versions and their states")
    sub.add_parser("metadata", parents=[common], help="signatures: inputs and outputs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        client = ServingClient(
            args.target,
            model=args.model,
            version=args.version,
            label=args.label,
            timeout=args.timeout,
            tls=args.tls or bool(args.ca),
            root_certificates=args.ca,
            client_certificate=args.cert,
            client_key=args.key,
        )
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        with client:
            if args.wait:
                client.wait_until_available(args.version, deadline=args.wait)
            if args.command == "status":
                for s in client.status(args.version, label=args.label):
                    error = f" error: {s.error_message}" if s.error_message else ""
                    print(f"{args.model} version {s.version}: {s.state}{error}")
            elif args.command == "metadata":
                meta = client.metadata()
                print(f"model {meta.model} version {meta.version}")
                for sig in meta.signatures.values():
                    print(f"signature {sig.name} ({sig.method})")
                    for kind, specs in (("input", sig.inputs), ("output", sig.outputs)):
                        for spec in specs.values():
                            shape = list(spec.shape) if spec.shape is not None else "?"
                            print(f"  {kind} {spec.name}: {spec.dtype} {shape}")
            else:
                found = client.metadata().signatures.get(args.signature)
                if found is None:
                    raise InvalidInputError(
                        f"model {args.model} has no signature '{args.signature}'"
                    )
                inputs = load_input(args.input, found)
                outputs = client.predict(inputs, signature=args.signature)
                labels = args.labels.read_text().splitlines() if args.labels else None
                show = _json_outputs if args.json else _format_outputs
                print(show(outputs, labels, args.top))
    except InvalidInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UnavailableError as e:
        print(f"error: cannot reach {args.target}: {e.details or e}", file=sys.stderr)
        return 1
    except ServingClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
