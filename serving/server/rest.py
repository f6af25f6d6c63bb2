"""TF Serving's REST API (``/v1/models/...``) and the Prometheus endpoint, on aiohttp.

JSON tensors follow TF Serving's json_tensor rules: row format (``instances``) or columnar
(``inputs``), binary strings as ``{"b64": ...}``, outputs whose name ends in ``_bytes`` returned
base64-encoded; errors are ``{"error": "..."}`` with TF Serving's HTTP status for the code.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import json
import logging
import math
import re
import socket
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import numpy as np
import tensorflow as tf
from aiohttp import web
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2

from serving import codec
from serving.server.errors import ServingError, failed_precondition, invalid, not_found
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
T = TypeVar("T")
_QUIET = logging.getLogger(__name__ + ".protocol")
_QUIET.setLevel(logging.CRITICAL)
_QUIET.propagate = False

# Bodies above this are parsed and answered on the REST pool, not on the event loop.
INLINE_BYTES = 64 << 10
INLINE_ELEMENTS = 16 << 10
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, GET",
    "Access-Control-Allow-Headers": "Content-Type",
}
# http_server.cc registers its handler for these paths only (kHTTPRestApiHandlerPathRegex).
V1_PATH = re.compile(r"/v1/.*", re.I | re.S)
_libc_name = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_libc_name) if _libc_name else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # pragma: no cover - not glibc
    _LIBC = None

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
        if int(version) >= 2**63:  # http_rest_api_util.cc: SimpleAtoi into an int64
            raise invalid(f"Failed to convert version: {version} to numeric.")
        spec.version.value = int(version)
    if label:
        spec.version_label = urllib.parse.unquote(label)
    return spec


# AddValueToTensor: which JSON values each dtype takes (rapidjson's IsNumber, IsInt, ...), and
# the integer range of those that take integers only.
_INT_RANGES = {
    codec.DT_INT32: (-(2**31), 2**31 - 1),
    codec.DT_INT16: (-(2**31), 2**31 - 1),
    codec.DT_INT8: (-(2**31), 2**31 - 1),
    codec.DT_UINT8: (-(2**31), 2**31 - 1),
    codec.DT_INT64: (-(2**63), 2**63 - 1),
    codec.DT_UINT32: (0, 2**32 - 1),
    codec.DT_UINT64: (0, 2**64 - 1),
}


def _json_type(value: Any) -> str:
    """json_tensor.cc's JsonTypeString."""
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    return "String" if isinstance(value, str) else "Number"


def _type_error(value: Any, dtype: int) -> ServingError:
    return invalid(
        f"JSON Value: {_debug(value)} Type: {_json_type(value)} is not of expected type: "
        f"{codec.type_name(dtype)}"
    )


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _b64_decode(value: Any) -> bytes:
    if not _is_b64(value):
        raise invalid(f"JSON Value: {_debug(value)} not formatted correctly for base64 data")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except ValueError:
        raise invalid("Unable to base64 decode") from None


def _scalar(value: Any, dtype: int) -> Any:
    """One JSON value as a value of ``dtype`` (AddValueToTensor), or the error TF Serving's."""
    if dtype == codec.DT_STRING:
        if isinstance(value, dict):
            return _b64_decode(value)
        if isinstance(value, str):
            return value.encode()
        raise _type_error(value, dtype)
    if isinstance(value, dict):
        raise _type_error(value, dtype)
    if dtype in (codec.DT_FLOAT, codec.DT_DOUBLE):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        raise _type_error(value, dtype)
    if dtype == codec.DT_BOOL:
        if isinstance(value, bool):
            return value
        raise _type_error(value, dtype)
    bounds = _INT_RANGES.get(dtype)
    if bounds is None:
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED,
            f"Conversion of JSON Value: {_debug(value)} to type: {codec.type_name(dtype)}",
        )
    if isinstance(value, int) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]:
        return value
    raise _type_error(value, dtype)


def _dense_shape(value: Any) -> list[int]:
    """GetDenseTensorShape: the sizes along the first element of each level."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value: Any, level: int, dtype: int, shape: list[int], out: list[Any]) -> None:
    """FillTensorProto: every leaf at the shape's depth, every list of its level's size."""
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise invalid(
                f"JSON Value: {_debug(value)} found at incorrect level: {level + 1} in the "
                f"JSON DOM. Expected at level: {rank}"
            )
        out.append(_scalar(value, dtype))
        return
    if level >= rank:
        raise invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise invalid(
            f"Encountered list at unexpected size: {len(value)} at level: {level} "
            f"expected size: {shape[level]}"
        )
    for item in value:
        _fill(item, level + 1, dtype, shape, out)


def _array(name: str, values: list[Any], shape: list[int], dtype: int) -> np.ndarray:
    """The values of input ``name`` as its tensor; one TensorFlow could not build (too many
    dimensions, an integer beyond any float) fails as ``Tensor::FromProto`` does."""
    try:
        if dtype == codec.DT_STRING:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            return arr.reshape(shape)
        return np.array(values, dtype=codec.numpy_dtype(dtype)).reshape(shape)
    except (OverflowError, ValueError) as e:
        raise invalid(f"tensor parsing error: {name} ({e})") from e


def _tensor(value: Any, dtype: int) -> tuple[list[Any], list[int]]:
    shape = _dense_shape(value)
    values: list[Any] = []
    _fill(value, 0, dtype, shape, values)
    return values, shape


def _shape_text(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def parse_predict(
    body: dict[str, Any], sig_inputs: dict[str, int]
) -> tuple[dict[str, np.ndarray], str]:
    """JSON body → input arrays (typed by the signature) and the format ("row"/"columnar"),
    with json_tensor.cc's rules and messages (FillPredictRequestFromJson)."""
    if not sig_inputs:
        raise invalid(
            f"Failed to get input map for signature: {body.get('signature_name') or 'DEFAULT'}"
        )
    try:
        return _parse_predict(body, sig_inputs)
    except RecursionError:  # lists nested about as deep as the JSON parser allows
        raise invalid("JSON Parse error: the document is nested too deeply") from None


def _parse_predict(
    body: dict[str, Any], sig_inputs: dict[str, int]
) -> tuple[dict[str, np.ndarray], str]:
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows and has_cols:
        raise invalid(
            f"JSON Value: {_debug(body)} Not formatted correctly expecting only one of "
            "'inputs' or 'instances' keys to exist "
        )
    if has_rows:
        rows = body["instances"]
        if not isinstance(rows, list):
            raise invalid(f"JSON Value: {_debug(body)} Expecting 'instances' to be an list/array")
        if not rows:
            raise invalid(f"JSON Value: {_debug(body)} No values in 'instances' array")
        return _instances(rows, sig_inputs), "row"
    if has_cols:
        return _inputs(body["inputs"], sig_inputs), "columnar"
    raise invalid("Missing 'inputs' or 'instances' key")


def _instances(rows: list[Any], sig_inputs: dict[str, int]) -> dict[str, np.ndarray]:
    """FillTensorMapFromInstancesList: every row one example, objects (named inputs) or not."""
    if not isinstance(rows[0], dict) and len(sig_inputs) > 1:
        raise invalid(
            "instances is a plain list, but expecting list of objects as multiple input tensors "
            "required as per tensorinfo_map"
        )
    objects = isinstance(rows[0], dict) and not _is_b64(rows[0])
    names = sorted(sig_inputs)
    values: dict[str, list[Any]] = {}
    shapes: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}

    def add(item: Any, name: str) -> None:  # AddInstanceItem
        if name not in sig_inputs:
            raise invalid(f"JSON object: does not have named input: {name}")
        row, shape = _tensor(item, sig_inputs[name])
        if name not in sizes:
            sizes[name], shapes[name] = len(row), shape
        elif sizes[name] != len(row):
            raise invalid(f"Expecting tensor size: {sizes[name]} but got: {len(row)}")
        elif shapes[name] != shape:
            raise invalid(
                f"Expecting shape {_shape_text(shapes[name])} but got: {_shape_text(shape)}"
            )
        values.setdefault(name, []).extend(row)

    for i, row in enumerate(rows):
        element = isinstance(row, dict) and not _is_b64(row)
        if objects:
            if not element:
                raise invalid(f"Expecting object but got list at item {i} of input list")
            for name, item in row.items():
                try:
                    add(item, name)
                except ServingError as e:
                    raise invalid(
                        f"Failed to process element: {i} key: {name} of 'instances' list. "
                        f"Error: {e.code.name}: {e.message}"
                    ) from None
            if set(row) != set(names):
                raise invalid(
                    f"Failed to process element: {i} of 'instances' list. JSON object: "
                    f"{_debug(row)} keys must be equal to: {','.join(names)}"
                )
        else:
            if element:
                raise invalid(f"Expecting value/list but got object at item {i} of input list")
            try:
                add(row, names[0])
            except ServingError as e:
                raise invalid(
                    f"Failed to process element: {i} of 'instances' list. Error: "
                    f"{e.code.name}: {e.message}"
                ) from None
    return {
        name: _array(name, values[name], [len(rows), *shapes[name]], sig_inputs[name])
        for name in values
    }


def _inputs(cols: Any, sig_inputs: dict[str, int]) -> dict[str, np.ndarray]:
    """FillTensorMapFromInputsMap: one value for a single input, else an object by name (other
    keys are ignored, as there)."""
    if not isinstance(cols, dict) or _is_b64(cols):
        if len(sig_inputs) > 1:
            raise invalid(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map"
            )
        ((name, dtype),) = sig_inputs.items()
        return {name: _array(name, *_tensor(cols, dtype), dtype)}
    out = {}
    for name in sorted(sig_inputs):
        if name not in cols:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        out[name] = _array(name, *_tensor(cols[name], sig_inputs[name]), sig_inputs[name])
    return out


DEBUG_STRING_BYTES = 256  # json_tensor.cc's kMaxJsonDebugStringBytes


def _debug(value: Any) -> str:
    """The JSON in an error message as json_tensor.cc's JsonValueToDebugString writes it:
    rapidjson's PrettyWriter (objects over lines, 4-space indent, arrays on one line), which
    stops at the first token once 256 bytes are written."""
    out: list[str] = []
    size = 0

    def put(text: str) -> bool:
        nonlocal size
        if size >= DEBUG_STRING_BYTES:
            return False
        out.append(text)
        size += len(text.encode())
        return True

    def write(v: Any, indent: str, prefix: str = "") -> bool:
        if isinstance(v, dict):
            if not put(prefix + "{"):
                return False
            inner = indent + "    "
            for i, (key, item) in enumerate(v.items()):
                if not put(f"{',' if i else ''}\n{inner}{_json_text(key)}"):
                    return False
                if not write(item, inner, ": "):
                    return False
            return put(f"\n{indent}}}" if v else "}")
        if isinstance(v, list):
            if not put(prefix + "["):
                return False
            for i, item in enumerate(v):  # an array is a level of indentation too
                if not write(item, indent + "    ", ", " if i else ""):
                    return False
            return put("]")
        return put(prefix + _json_text(v))

    write(value, "")
    return "".join(out)


def _json_text(v: Any) -> str:
    """One JSON scalar as rapidjson writes it (shortest floats, exponents without + or 0s)."""
    if isinstance(v, float) and math.isfinite(v):
        text = repr(v)
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    return json.dumps(v, ensure_ascii=False)


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
        try:
            raw = [_scalar(v, codec.DT_STRING) for v in values]
        except ServingError as e:
            raise invalid(f"{where}: {e.message}") from None
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=raw))
    raise invalid(f"{where}: a feature's values must all be numbers or all strings")


class RestServer:
    """The REST API on its own port, on the server's event loop (aiohttp).

    Limits, whatever the request's headers say: bodies (chunked or not) are cut at
    ``max_request_bytes``; ``timeout_seconds`` (``--rest_api_timeout_in_ms``) bounds each
    request from its first body byte to its reply (DEADLINE_EXCEEDED, HTTP 504) and closes
    connections idle that long; ``pool`` (``--rest_api_num_threads`` threads) does the JSON work
    of large requests, so the loop keeps serving while a 100 MB body is parsed.
    """

    def __init__(
        self,
        core: Core,
        sock: socket.socket,
        *,
        pool: Executor,
        metrics_path: str,
        max_request_bytes: int,
        timeout_seconds: float = 30.0,
        cors: bool = False,
    ):
        self.core = core
        self.sock = sock
        self.pool = pool
        self.port = sock.getsockname()[1]
        self.metrics_path = metrics_path
        self.max_request_bytes = max_request_bytes
        self.timeout_seconds = timeout_seconds if timeout_seconds > 0 else None
        self.cors = cors
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=self.max_request_bytes)
        app.router.add_route("*", "/{path:.*}", self._request)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            keepalive_timeout=self.timeout_seconds or 75.0,
            # After an early reply (body too large or too slow), read what the client is still
            # sending for at most this long, then close.
            lingering_time=1.0,
            # Protocol errors (bad framing) are answered 400 by aiohttp; not worth a traceback.
            logger=_QUIET,
        )
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock).start()

    async def stop(self, grace: float) -> None:
        """Stop listening, let requests in flight finish (up to ``grace`` seconds), close."""
        runner = self._runner
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        if runner.server is not None:
            await asyncio.sleep(0)  # requests accepted before the close start being handled
            runner.server.pre_shutdown()
            await runner.server.shutdown(grace)
        await runner.cleanup()

    async def _cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """JSON work of a large request, on the REST pool (``--rest_api_num_threads``)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _request(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        method = request.method
        if self.metrics_path and method == "GET" and path == self.metrics_path:
            return web.Response(
                body=self.core.metrics.render(),
                headers={"Content-Type": "text/plain; version=0.0.4"},
            )
        big = False
        try:
            async with asyncio.timeout(self.timeout_seconds):
                if method == "OPTIONS":
                    # A CORS preflight (http_server.cc): OK when the Origin is an http(s) URL.
                    if not re.search(r"https?://", request.headers.get("Origin") or ""):
                        raise failed_precondition("Origin header is missing in CORS preflight")
                    return self._reply(200, b"")
                if not V1_PATH.fullmatch(path):
                    # net_http dispatches only /v1/...; anything else is its plain 404.
                    raise not_found(f"Not found: {path}")
                body = await self._body(request)
                big = len(body) > INLINE_BYTES
                result = await self.handle(method, path, body)
                payload = await self._cpu(_dumps, result) if big else _dumps(result)
            return self._reply(200, payload)
        except TimeoutError:
            return self._error(ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
        except ServingError as e:
            return self._error(e)
        except Exception as e:
            log.exception("REST %s %s failed", method, path)
            return self._error(ServingError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
        finally:
            if big:
                _release_memory()

    async def _body(self, request: web.Request) -> bytes:
        """The request body, chunked or not, never more than the size cap."""
        if request.method != "POST":
            return b""
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Request body is larger than the maximum of {self.max_request_bytes} bytes",
            ) from None

    def _reply(self, status: int, payload: bytes) -> web.Response:
        headers = {"Content-Type": "application/json"}
        if self.cors:
            headers.update(CORS_HEADERS)
        return web.Response(status=status, body=payload, headers=headers)

    def _error(self, e: ServingError) -> web.Response:
        return self._reply(e.http_status, json.dumps({"error": e.message}).encode())

    async def handle(self, method: str, path: str, body: bytes) -> dict[str, Any]:
        """One /v1/ request → the JSON reply (as a dict), TF Serving's HttpRestApiHandler."""
        if method == "POST":
            m = PREDICTION_PATH.fullmatch(path)
            if not m:
                raise invalid(f"Malformed request: POST {path}")
            name, version, label, verb = m.groups()
            spec = model_spec(name, version, label)
            data = await self._cpu(_loads, body) if len(body) > INLINE_BYTES else _loads(body)
            signature = data.get("signature_name") or ""
            if not isinstance(signature, str):
                raise invalid("'signature_name' must be a string")
            spec.signature_name = signature
            with self.core.measured(spec.name, verb, "REST"):
                return await self._infer(verb.lower(), spec, data, len(body) > INLINE_BYTES)
        m = STATUS_PATH.fullmatch(path) if method == "GET" else None
        if not m:
            raise invalid(f"Malformed request: {method} {path}")
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

    async def _infer(self, verb: str, spec: Any, data: dict[str, Any], big: bool) -> dict[str, Any]:
        if verb == "predict":
            servable = self.core.manager.resolve(spec)
            sig = servable.signature(spec.signature_name or "serving_default")
            dtypes = {k: v.dtype for k, v in sig.inputs.items()}
            inputs, fmt = (
                await self._cpu(parse_predict, data, dtypes) if big else parse_predict(data, dtypes)
            )
            _, _, outputs = await self.core.predict(spec, inputs, ())
            if big or sum(v.size for v in outputs.values()) > INLINE_ELEMENTS:
                return await self._cpu(format_predict, outputs, fmt)
            return format_predict(outputs, fmt)
        method = CLASSIFY_METHOD if verb == "classify" else REGRESS_METHOD
        examples = await self._cpu(examples_from_json, data) if big else examples_from_json(data)
        _, _, outputs = await self.core.infer_examples(spec, method, examples)
        if verb == "classify":
            result = classifications(outputs)
            # json_tensor.cc: kClassifyRegressResponseKey is "results".
            return {
                "results": [
                    [[c.label, c.score] for c in item.classes] for item in result.classifications
                ]
            }
        return {"results": [r.value for r in regressions(outputs).regressions]}


def _loads(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; anything else is INVALID_ARGUMENT (HTTP 400)."""
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"JSON Parse error: {e}") from e
    except RecursionError:
        raise invalid("JSON Parse error: the document is nested too deeply") from None
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object")
    return data


def _dumps(result: Any) -> bytes:
    return json.dumps(result, indent=1).encode()


def _release_memory() -> None:
    """Give the freed pages of a large request back to the OS (glibc keeps them otherwise)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _to_dict(message: Any) -> Any:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
