"""numpy ⇄ ``tensorflow.TensorProto`` without TensorFlow.

Works on any TensorProto class (the official ``tensorflow.core.framework.tensor_pb2`` or our own
from ``serving.protos``): only field names are used. Numbers travel in ``tensor_content`` (raw
little-endian bytes: one memcpy instead of one Python call per element), strings in
``string_val``. Decoding accepts both ``tensor_content`` and the typed ``*_val`` fields, with
TensorFlow's rule that a typed list shorter than the shape is padded with its last value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

try:  # bfloat16 has no numpy dtype of its own; ml_dtypes (a TensorFlow dependency) has one.
    from ml_dtypes import bfloat16 as _bfloat16
except ImportError:  # pragma: no cover - client-only installs without ml_dtypes
    _bfloat16 = None


class CodecError(ValueError):
    """A tensor cannot be converted; the message says why."""


# tensorflow.DataType enum values (tensorflow/core/framework/types.proto).
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = 1, 2, 3, 4, 5, 6, 7
DT_COMPLEX64, DT_INT64, DT_BOOL, DT_BFLOAT16, DT_UINT16, DT_COMPLEX128 = 8, 9, 10, 14, 17, 18
DT_HALF, DT_UINT32, DT_UINT64 = 19, 22, 23

_NUMPY: dict[int, Any] = {
    DT_FLOAT: np.float32,
    DT_DOUBLE: np.float64,
    DT_INT32: np.int32,
    DT_UINT8: np.uint8,
    DT_INT16: np.int16,
    DT_INT8: np.int8,
    DT_COMPLEX64: np.complex64,
    DT_INT64: np.int64,
    DT_BOOL: np.bool_,
    DT_UINT16: np.uint16,
    DT_COMPLEX128: np.complex128,
    DT_HALF: np.float16,
    DT_UINT32: np.uint32,
    DT_UINT64: np.uint64,
}
if _bfloat16 is not None:
    _NUMPY[DT_BFLOAT16] = _bfloat16
_DTYPE_OF = {np.dtype(t): code for code, t in _NUMPY.items()}
_DTYPES = {code: np.dtype(t) for code, t in _NUMPY.items()}
_LITTLE_ENDIAN = {code: dtype.newbyteorder("<") for code, dtype in _DTYPES.items()}
NUMERIC_DTYPES = frozenset(_DTYPE_OF)

# The typed field TensorFlow uses for each dtype (tensor.proto).
_FIELD = {
    DT_FLOAT: "float_val",
    DT_DOUBLE: "double_val",
    DT_INT32: "int_val",
    DT_UINT8: "int_val",
    DT_INT16: "int_val",
    DT_INT8: "int_val",
    DT_UINT16: "int_val",
    DT_INT64: "int64_val",
    DT_BOOL: "bool_val",
    DT_HALF: "half_val",
    DT_BFLOAT16: "half_val",
    DT_UINT32: "uint32_val",
    DT_UINT64: "uint64_val",
    DT_COMPLEX64: "scomplex_val",
    DT_COMPLEX128: "dcomplex_val",
    DT_STRING: "string_val",
}

NAMES = {
    DT_FLOAT: "DT_FLOAT",
    DT_DOUBLE: "DT_DOUBLE",
    DT_INT32: "DT_INT32",
    DT_UINT8: "DT_UINT8",
    DT_INT16: "DT_INT16",
    DT_INT8: "DT_INT8",
    DT_STRING: "DT_STRING",
    DT_COMPLEX64: "DT_COMPLEX64",
    DT_INT64: "DT_INT64",
    DT_BOOL: "DT_BOOL",
    DT_BFLOAT16: "DT_BFLOAT16",
    DT_UINT16: "DT_UINT16",
    DT_COMPLEX128: "DT_COMPLEX128",
    DT_HALF: "DT_HALF",
    DT_UINT32: "DT_UINT32",
    DT_UINT64: "DT_UINT64",
}


def type_name(code: int) -> str:
    """TensorFlow's DataTypeString: "float", "int64", "string"..."""
    return NAMES.get(code, str(code)).removeprefix("DT_").lower()


def dtype_code(dtype: Any) -> int:
    """The TensorFlow DataType code of a numpy dtype (strings/bytes/objects → DT_STRING)."""
    dt = np.dtype(dtype)
    if dt.kind in "SUO":
        return DT_STRING
    try:
        return _DTYPE_OF[dt]
    except KeyError:
        raise CodecError(f"numpy dtype {dt} has no TensorFlow equivalent") from None


def numpy_dtype(code: int) -> Any:
    """The numpy dtype for a DataType code (``object`` for DT_STRING)."""
    if code == DT_STRING:
        return np.object_
    try:
        return _DTYPES[code]
    except KeyError:
        raise CodecError(f"unsupported tensor dtype {NAMES.get(code, code)}") from None


def to_tensor_proto(
    value: Any, proto_cls: Any, *, dtype: int | None = None, as_fields: bool = False
) -> Any:
    """Encode ``value`` (array-like) as a TensorProto of class ``proto_cls``.

    Args:
        value: anything ``np.asarray`` accepts; ``str`` is encoded as UTF-8.
        proto_cls: the TensorProto class to build.
        dtype: a DataType code to cast to (default: from the array's dtype).
        as_fields: write the typed ``*_val`` fields instead of ``tensor_content`` (what
            TF Serving does in its responses).
    """
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    code = dtype if dtype is not None else dtype_code(arr.dtype)
    proto = proto_cls(dtype=code)
    shape = proto.tensor_shape
    for d in arr.shape:
        shape.dim.add().size = d
    if code == DT_STRING:
        flat = arr.ravel()
        proto.string_val.extend(
            v.encode() if isinstance(v, str) else bytes(v) for v in flat.tolist()
        )
        return proto
    target = numpy_dtype(code)
    if arr.dtype != target:
        if arr.dtype.kind in "SUO":
            raise CodecError(f"cannot encode strings as {NAMES.get(code, code)}")
        arr = arr.astype(target)
    if not as_fields:
        proto.tensor_content = (
            np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        )
        return proto
    field = getattr(proto, _FIELD[code])
    flat = arr.ravel()
    if code in (DT_HALF, DT_BFLOAT16):
        field.extend(flat.view(np.uint16).astype(np.int32).tolist())
    elif code in (DT_COMPLEX64, DT_COMPLEX128):
        field.extend(np.stack([flat.real, flat.imag], axis=-1).ravel().tolist())
    else:
        field.extend(flat.tolist())
    return proto


def to_numpy(proto: Any, max_elements: int | None = None) -> np.ndarray:
    """Decode a TensorProto into a numpy array (strings as an ``object`` array of bytes).

    ``max_elements`` refuses, before anything is allocated, a shape that declares more
    elements (a few bytes of proto can declare gigabytes: one value fills the whole shape).
    """
    code = proto.dtype
    shape = tuple([d.size for d in proto.tensor_shape.dim])
    if shape and min(shape) < 0:
        raise CodecError(f"tensor shape {list(shape)} has an unknown dimension")
    count = math.prod(shape)  # exact: np.prod would wrap around past 2^63
    if max_elements is not None and count > max_elements:
        raise CodecError(
            f"tensor shape {list(shape)} declares {count} elements, more than the "
            f"{max_elements} a request may (--max_request_elements)"
        )
    if code == DT_STRING:
        values = list(proto.string_val)
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return _fill(out, count, shape)
    dtype = numpy_dtype(code)
    content = proto.tensor_content  # read once: each read of a bytes field makes a new copy
    if content:
        expected = count * dtype.itemsize
        if len(content) != expected:
            raise CodecError(
                f"tensor_content has {len(content)} bytes, shape {list(shape)} of "
                f"{NAMES[code]} needs {expected}"
            )
        return (
            np.frombuffer(content, dtype=_LITTLE_ENDIAN[code])
            .astype(dtype, copy=False)
            .reshape(shape)
        )
    field = getattr(proto, _FIELD[code])
    if code in (DT_HALF, DT_BFLOAT16):
        arr = np.asarray(field, dtype=np.int32).astype(np.uint16).view(dtype)
    elif code in (DT_COMPLEX64, DT_COMPLEX128):
        pairs = np.asarray(field, dtype=np.float64).reshape(-1, 2)
        # Assign the parts: ``re + 1j * im`` turns an infinite imaginary part into NaN + inf j.
        arr = np.empty(len(pairs), dtype=dtype)
        arr.real, arr.imag = pairs[:, 0], pairs[:, 1]
    else:
        arr = np.asarray(field, dtype=dtype)
    return _fill(arr, count, shape)


def _fill(values: np.ndarray, count: int, shape: tuple[int, ...]) -> np.ndarray:
    if values.size == count:
        return values.reshape(shape)
    if values.size == 0:
        fill: Any = b"" if values.dtype == object else 0
        out = np.empty(count, dtype=values.dtype)
        out[:] = fill
        return out.reshape(shape)
    if values.size > count:
        raise CodecError(f"tensor has {values.size} values but shape {list(shape)} holds {count}")
    # TensorFlow pads a short typed list with its last value (e.g. one value fills a tensor).
    out = np.empty(count, dtype=values.dtype)
    out[: values.size] = values
    out[values.size :] = values[-1]
    return out.reshape(shape)
