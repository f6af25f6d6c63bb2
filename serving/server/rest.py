"""TF Serving's REST API (``/v1/models/...``) and the Prometheus endpoint, over http.server.

JSON tensors follow TF Serving's json_tensor rules: row format (``instances``) or columnar
(``inputs``), binary strings as ``{"b64": ...}``, outputs whose name ends in ``_bytes`` returned
base64-encoded; errors are ``{"error": "..."}`` with TF Serving's HTTP status for the code.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2

from serving import codec
from serving.server.errors import ServingError, invalid
from serving.server.service import (
    CLASSIFY_METHOD,
    REGRESS_METHOD,
    Core,
    classifications,
    model_metadata,
    model_status,
    regressions,
)

log = logging.getLogger(__name__)

# The two path patterns of TF Serving's http_rest_api_util.cc (case-insensitive).
PREDICTION_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.I,
)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.I,
)


def model_spec(name: str, version: str | None, label: str | None) -> Any:
    spec = model_pb2.ModelSpec(name=urllib.parse.unquote(name))
    if version:
        spec.version.value = int(version)
    if label:
        spec.version_label = urllib.parse.unquote(label)
    return spec


def _decode_value(value: Any, dtype: int, where: str) -> Any:
    if isinstance(value, list):
        return [_decode_value(v, dtype, where) for v in value]
    if dtype == codec.DT_STRING:
        if isinstance(value, dict):
            if set(value) != {"b64"} or not isinstance(value["b64"], str):
                raise invalid(f'{where}: a binary value must be {{"b64": "..."}}')
            try:
                return base64.b64decode(value["b64"], validate=True)
            except ValueError as e:
                raise invalid(f"{where}: invalid base64: {e}") from e
        if isinstance(value, str):
            return value.encode()
        raise invalid(f"{where}: expected a string, got {json.dumps(value)[:50]}")
    if isinstance(value, bool) and dtype != codec.DT_BOOL:
        raise invalid(f"{where}: expected a number, got {value}")
    if isinstance(value, int | float):
        return value
    raise invalid(f"{where}: expected a number, got {json.dumps(value)[:50]}")


def _to_array(value: Any, dtype: int, where: str) -> np.ndarray:
    decoded = _decode_value(value, dtype, where)
    try:
        if dtype == codec.DT_STRING:
            arr = np.array(decoded, dtype=object)
            if arr.dtype != object or (arr.ndim and any(isinstance(x, list) for x in arr.flat)):
                raise ValueError("ragged")
            return arr
        return np.array(decoded, dtype=codec.numpy_dtype(dtype))
    except (ValueError, OverflowError) as e:
        raise invalid(
            f"{where}: values do not form a tensor of {codec.NAMES.get(dtype, dtype)}: {e}"
        ) from e


def parse_predict(
    body: dict[str, Any], sig_inputs: dict[str, int]
) -> tuple[dict[str, np.ndarray], str]:
    """JSON body → input arrays (typed by the signature) and the format ("row"/"columnar")."""
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows == has_cols:
        raise invalid(
            "Missing 'inputs' or 'instances' key"
            if not has_rows
            else "Not allowed to have both 'inputs' and 'instances' keys in the request"
        )
    if has_rows:
        rows = body["instances"]
        if not isinstance(rows, list):
            raise invalid(f"JSON Value: {_debug(body)} Expecting 'instances' to be an list/array")
        if not rows:
            raise invalid(f"JSON Value: {_debug(body)} No values in 'instances' array")
        if len(sig_inputs) == 1 and not all(
            isinstance(r, dict) and set(r) == set(sig_inputs) for r in rows
        ):
            ((name, dtype),) = sig_inputs.items()
            return {name: _to_array(rows, dtype, f"instances ({name})")}, "row"
        out = {}
        for name, dtype in sig_inputs.items():
            values = []
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise invalid(
                        f"instances[{i}]: expected an object with keys {sorted(sig_inputs)}"
                    )
                if name not in row:
                    raise invalid(f"instances[{i}]: missing named input '{name}'")
                values.append(row[name])
            extra = set().union(*(set(r) for r in rows)) - set(sig_inputs)
            if extra:
                raise invalid(
                    f"instances: unknown inputs {sorted(extra)}; expected {sorted(sig_inputs)}"
                )
            out[name] = _to_array(values, dtype, f"instances ({name})")
        return out, "row"
    cols = body["inputs"]
    if len(sig_inputs) == 1 and not (isinstance(cols, dict) and set(cols) == set(sig_inputs)):
        ((name, dtype),) = sig_inputs.items()
        return {name: _to_array(cols, dtype, f"inputs ({name})")}, "columnar"
    if not isinstance(cols, dict):
        raise invalid(f"'inputs' must be an object with keys {sorted(sig_inputs)}")
    extra = set(cols) - set(sig_inputs)
    if extra:
        raise invalid(f"inputs: unknown inputs {sorted(extra)}; expected {sorted(sig_inputs)}")
    return {k: _to_array(v, sig_inputs[k], f"inputs ({k})") for k, v in cols.items()}, "columnar"


def _debug(value: Any) -> str:
    """The JSON in an error message, as json_tensor.cc's JsonValueToDebugString (cut short)."""
    text = json.dumps(value, indent=4)
    return text if len(text) <= 1000 else text[:1000] + "..."


def _json_value(name: str, arr: np.ndarray) -> Any:
    if arr.dtype == object:
        flat = [
            {"b64": base64.b64encode(v).decode()}
            if name.endswith("_bytes")
            else v.decode("utf-8", errors="replace")
            if isinstance(v, bytes)
            else v
            for v in arr.ravel().tolist()
        ]
        return np.array(flat, dtype=object).reshape(arr.shape).tolist()
    if np.iscomplexobj(arr):
        return np.stack([arr.real, arr.imag], axis=-1).tolist()
    return arr.tolist()


def format_predict(outputs: dict[str, np.ndarray], fmt: str) -> dict[str, Any]:
    if fmt == "columnar":
        if len(outputs) == 1:
            ((name, value),) = outputs.items()
            return {"outputs": _json_value(name, value)}
        return {"outputs": {k: _json_value(k, v) for k, v in outputs.items()}}
    if len(outputs) == 1:
        ((name, value),) = outputs.items()
        return {"predictions": _json_value(name, value)}
    sizes = {v.shape[0] if v.ndim else -1 for v in outputs.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise invalid(
            "Output tensors have different batch sizes (or are scalars); use the "
            "columnar format ('inputs') for this signature"
        )
    n = sizes.pop()
    columns = {k: _json_value(k, v) for k, v in outputs.items()}
    return {"predictions": [{k: columns[k][i] for k in columns} for i in range(n)]}


def examples_from_json(body: dict[str, Any]) -> list[bytes]:
    """Classify/Regress JSON (``examples`` + optional ``context``) → serialized tf.Examples."""
    examples = body.get("examples")
    if not isinstance(examples, list) or not examples:
        raise invalid("'examples' must be a non-empty list")
    context = body.get("context") or {}
    if not isinstance(context, dict):
        raise invalid("'context' must be an object")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise invalid(f"examples[{i}]: expected an object of features")
        both = set(ex) & set(context)
        if both:
            raise invalid(f"examples[{i}]: features {sorted(both)} also appear in 'context'")
        features = {}
        for name, value in {**context, **ex}.items():
            features[name] = _feature(value, f"examples[{i}].{name}")
        out.append(
            tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()
        )
    return out


def _feature(value: Any, where: str) -> Any:
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, bool) for v in values) or not values:
        raise invalid(f"{where}: expected numbers or strings")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))
    if all(isinstance(v, str | dict) for v in values):
        raw = [_decode_value(v, codec.DT_STRING, where) for v in values]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=raw))
    raise invalid(f"{where}: a feature's values must all be numbers or all strings")


class _PooledHTTPServer(HTTPServer):
    """Connections served by a fixed pool (``--rest_api_num_threads``), not a thread each."""

    def __init__(self, address: tuple[str, int], handler: Any, num_threads: int):
        super().__init__(address, handler)
        self.pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="rest")

    def process_request(self, request: Any, client_address: Any) -> None:
        self.pool.submit(self._serve, request, client_address)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - one broken connection never stops the server
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


class RestServer:
    """The REST API on its own port.

    ``timeout_seconds`` (``--rest_api_timeout_in_ms``) bounds every socket read, so an idle or
    slow connection gives its pool thread back.
    """

    def __init__(
        self,
        core: Core,
        host: str,
        port: int,
        *,
        metrics_path: str,
        max_request_bytes: int,
        num_threads: int = 8,
        timeout_seconds: float = 30.0,
        cors: bool = False,
    ):
        self.core = core
        self.metrics_path = metrics_path
        self.max_request_bytes = max_request_bytes
        self.timeout_seconds = timeout_seconds if timeout_seconds > 0 else None
        self.cors = cors
        handler = self._handler_class()
        self.httpd = _PooledHTTPServer((host, port), handler, num_threads)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.pool.shutdown(wait=False, cancel_futures=True)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections
            timeout = server.timeout_seconds

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), format % args)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if server.metrics_path and path == server.metrics_path:
                    self._send(200, server.core.metrics.render(), "text/plain; version=0.0.4")
                    return
                self._dispatch("GET", path, b"")

            def do_POST(self) -> None:
                try:
                    body = self._body()
                except ServingError as e:
                    self._error(e, close=True)
                    return
                self._dispatch("POST", self.path.split("?", 1)[0], body)

            def do_OPTIONS(self) -> None:
                # A CORS preflight (http_server.cc): OK when the Origin is an http(s) URL.
                if re.search(r"https?://", self.headers.get("Origin") or ""):
                    self._send(200, b"", "application/json")
                else:
                    self._error(
                        ServingError(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            "Origin header is missing in CORS preflight",
                        )
                    )

            def _body(self) -> bytes:
                """The request body, chunked or not, never more than the size cap."""
                limit = server.max_request_bytes
                too_large = ServingError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"Request body is larger than the maximum of {limit} bytes",
                )
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks: list[bytes] = []
                    total = 0
                    while True:
                        line = self.rfile.readline(1024).split(b";", 1)[0].strip()
                        try:
                            size = int(line, 16)
                        except ValueError:
                            raise invalid("Malformed chunked request body") from None
                        if size == 0:
                            while self.rfile.readline(1024).strip():
                                pass  # trailers
                            return b"".join(chunks)
                        total += size
                        if total > limit:
                            raise too_large
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline(1024)
                raw = self.headers.get("Content-Length")
                if raw is None:
                    return b""
                if not raw.strip().isdigit():
                    raise invalid(f"Invalid Content-Length: {raw!r}")
                length = int(raw)
                if length > limit:
                    raise too_large
                return self.rfile.read(length)

            def _dispatch(self, method: str, path: str, body: bytes) -> None:
                try:
                    result = server.handle(method, path, body)
                except ServingError as e:
                    self._error(e)
                    return
                except Exception as e:
                    log.exception("REST %s %s failed", method, path)
                    self._error(ServingError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
                    return
                self._send(200, json.dumps(result, indent=1).encode(), "application/json")

            def _error(self, e: ServingError, close: bool = False) -> None:
                if close:
                    self.close_connection = True
                self._send(
                    e.http_status, json.dumps({"error": e.message}).encode(), "application/json"
                )

            def _send(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if server.cors:
                    self.send_header("Access-Control-Allow-Origin", "*")
                    self.send_header("Access-Control-Allow-Methods", "POST, GET")
                    self.send_header("Access-Control-Allow-Headers", "Content-Type")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def handle(self, method: str, path: str, body: bytes) -> dict[str, Any]:
        if method == "POST":
            m = PREDICTION_PATH.fullmatch(path)
            if not m:
                raise invalid(f"Malformed request: POST {path}")
            name, version, label, verb = m.groups()
            if version and label:  # pragma: no cover - the regex allows only one
                raise invalid("Both model version and model version label cannot be supplied.")
            spec = model_spec(name, version, label)
            try:
                data = json.loads(body or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise invalid(f"JSON Parse error: {e}") from e
            if not isinstance(data, dict):
                raise invalid("The request body must be a JSON object")
            signature = data.get("signature_name") or ""
            if not isinstance(signature, str):
                raise invalid("'signature_name' must be a string")
            spec.signature_name = signature
            with self.core.measured(spec.name, verb, "REST"):
                return self._infer(verb.lower(), spec, data)
        m = STATUS_PATH.fullmatch(path)
        if not m:
            raise invalid(f"Malformed request: GET {path}")
        name, version, label, sub = m.groups()
        if not name:
            raise invalid("Missing model name in request.")
        spec = model_spec(name, version, label)
        if sub:
            request = get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=spec, metadata_field=["signature_def"]
            )
            response = model_metadata(self.core.manager, request)
            sigs = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(sigs)
            return {
                "model_spec": _to_dict(response.model_spec),
                "metadata": {"signature_def": _to_dict(sigs)},
            }
        status = model_status(
            self.core.manager, get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
        )
        return _to_dict(status)

    def _infer(self, verb: str, spec: Any, data: dict[str, Any]) -> dict[str, Any]:
        if verb == "predict":
            servable = self.core.manager.resolve(spec)
            sig = servable.signature(spec.signature_name or "serving_default")
            inputs, fmt = parse_predict(data, {k: v.dtype for k, v in sig.inputs.items()})
            _, _, outputs = self.core.predict(spec, inputs, ())
            return format_predict(outputs, fmt)
        method = CLASSIFY_METHOD if verb == "classify" else REGRESS_METHOD
        _, _, outputs = self.core.infer_examples(spec, method, examples_from_json(data))
        if verb == "classify":
            result = classifications(outputs)
            # json_tensor.cc: kClassifyRegressResponseKey is "results".
            return {
                "results": [
                    [[c.label, c.score] for c in item.classes] for item in result.classifications
                ]
            }
        return {"results": [r.value for r in regressions(outputs).regressions]}


def _to_dict(message: Any) -> Any:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
