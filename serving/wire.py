"""Predict requests and responses straight to and from protobuf wire bytes.

The client encodes requests and decodes responses here; the server encodes its Predict
responses here too (:func:`encode_predict_response`, the bytes protobuf would write).

Large tensors are what make TF Serving clients slow: ``tf.make_tensor_proto`` copies an array
into a proto, serialization copies it again, and on the way back parsing, field access and
``make_ndarray`` each copy once more. Here an input array is written into the request bytes with
one copy (``bytes.join`` over a memoryview), and an output's ``tensor_content`` — or its packed
``float_val`` / ``double_val``, which is how TF Serving sends floats — is read with
``np.frombuffer`` over the response bytes, without a copy. Decoded arrays are therefore
read-only views of the response (``np.array(x)`` makes a writable copy). Anything else (strings,
integer lists, half floats…) goes through the regular protobuf classes and ``serving.codec``.

Wire-format facts used (protobuf encoding): a message is a sequence of (tag, value); tag =
field number << 3 | wire type; length-delimited values (type 2) carry a varint length; a map
field is a repeated message of {key = 1, value = 2}; appending fields to a serialized message
is the same as setting them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from serving import codec, protos

_T = protos.TensorProto.DESCRIPTOR.fields_by_name
DTYPE = _T["dtype"].number
SHAPE = _T["tensor_shape"].number
CONTENT = _T["tensor_content"].number
FLOAT_VAL = _T["float_val"].number
DOUBLE_VAL = _T["double_val"].number
_S = protos.TensorProto.DESCRIPTOR.fields_by_name["tensor_shape"].message_type.fields_by_name
DIM = _S["dim"].number
INPUTS = protos.PredictRequest.DESCRIPTOR.fields_by_name["inputs"].number
OUTPUTS = protos.PredictResponse.DESCRIPTOR.fields_by_name["outputs"].number
RESPONSE_SPEC = protos.PredictResponse.DESCRIPTOR.fields_by_name["model_spec"].number
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
_ONE_BYTE = [bytes([n]) for n in range(0x80)]
STRING_VAL = _T["string_val"].number


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


_DTYPE_TAG, _STRING_TAG = _tag(DTYPE, VARINT), _tag(STRING_VAL, LEN)
_OUTPUTS_TAG, _SPEC_TAG = _tag(OUTPUTS, LEN), _tag(RESPONSE_SPEC, LEN)
_KEY_TAG, _VALUE_TAG = _tag(1, LEN), _tag(2, LEN)  # a map entry's key and value


def tensor_parts(array: np.ndarray) -> tuple[list[Any], int]:
    """Wire parts of a TensorProto for ``array`` and their total length (no copy of the data)."""
    if array.dtype.kind in "SUO" or array.dtype not in _LITTLE:
        # Strings (and exotic dtypes) are small or rare: let protobuf serialize them.
        data = codec.to_tensor_proto(array, protos.TensorProto).SerializeToString()
        return [data], len(data)
    contiguous = np.ascontiguousarray(array)
    content = memoryview(contiguous).cast("B") if contiguous.size else b""  # type: ignore[arg-type]
    header = _tensor_head(CONTENT, codec.dtype_code(array.dtype), array.shape, len(content))
    return [header, content], len(header) + len(content)


# Plain numeric dtypes go on the wire as raw bytes (bfloat16's numpy type has no buffer format).
_LITTLE = {dt for dt in codec.NUMERIC_DTYPES if dt.kind != "V"} if np.little_endian else set()


@functools.lru_cache(maxsize=1024)
def _shape_bytes(shape: tuple[int, ...]) -> bytes:
    """A TensorShapeProto field as protobuf writes it (size 0 is proto3's default: omitted)."""
    body = bytearray()
    for d in shape:
        dim = _tag(1, VARINT) + _varint(d) if d else b""
        body += _tag(DIM, LEN) + _varint(len(dim)) + dim
    return _tag(SHAPE, LEN) + _varint(len(body)) + body if shape else b""


# Typed-field responses: float32/float64 are packed fixed-width values, i.e. their raw
# little-endian bytes (TF Serving's responses carry floats this way).
_PACKED = {
    np.dtype(np.float32): (FLOAT_VAL, codec.DT_FLOAT),
    np.dtype(np.float64): (DOUBLE_VAL, codec.DT_DOUBLE),
}


def _fixed_layout(dtype: np.dtype, as_fields: bool) -> tuple[int, int] | None:
    """(field, DataType code) of a tensor written straight from its bytes: packed floats and
    doubles in the typed fields, any plain numeric dtype in ``tensor_content``; else None."""
    if as_fields:
        return _PACKED.get(dtype) if np.little_endian else None
    return (CONTENT, codec.dtype_code(dtype)) if dtype in _LITTLE else None


def _variable_tensor(array: np.ndarray, as_fields: bool) -> bytes:
    """An output TensorProto that is not a fixed layout, byte for byte what
    ``codec.to_tensor_proto`` serializes: strings written here, other types by protobuf."""
    if array.dtype.kind not in "SUO":
        proto = codec.to_tensor_proto(array, protos.TensorProto, as_fields=as_fields)
        return proto.SerializeToString()  # type: ignore[no-any-return]
    values = [v.encode() if isinstance(v, str) else bytes(v) for v in array.ravel().tolist()]
    body = b"".join([_STRING_TAG + _varint(len(v)) + v for v in values])
    return _DTYPE_TAG + _varint(codec.DT_STRING) + _shape_bytes(array.shape) + body


def _tensor_head(field: int, code: int, shape: tuple[int, ...], nbytes: int) -> bytes:
    """A fixed-layout TensorProto up to its data (an empty data field is left out)."""
    head = _DTYPE_TAG + _varint(code) + _shape_bytes(shape)
    return head + _tag(field, LEN) + _varint(nbytes) if nbytes else head


def _entry_head(name: str, tensor_len: int) -> bytes:
    """An ``outputs`` map entry up to its TensorProto's bytes."""
    key = name.encode()
    entry = _KEY_TAG + _varint(len(key)) + key + _VALUE_TAG + _varint(tensor_len)
    return _OUTPUTS_TAG + _varint(len(entry) + tensor_len) + entry


@functools.lru_cache(maxsize=4096)
def _fixed_output_head(
    name: str, field: int, code: int, shape: tuple[int, ...], nbytes: int
) -> bytes:
    """Everything of a fixed-layout output's map entry but its data: the same for every
    response of one model with outputs of one shape, so it is built once."""
    tensor = _tensor_head(field, code, shape, nbytes)
    return _entry_head(name, len(tensor) + nbytes) + tensor


def encode_predict_response(
    spec: bytes, outputs: Mapping[str, np.ndarray], as_fields: bool
) -> bytes:
    """A serialized PredictResponse: ``outputs`` by name (sorted, as protobuf's deterministic
    serialization orders a map) and ``spec``, a serialized ModelSpec; the bytes protobuf
    writes for that message. ``as_fields`` writes the typed ``*_val`` fields, as TF Serving's
    responses do unless ``--enable_serialization_as_tensor_content``."""
    parts = []
    for name in sorted(outputs):
        array = outputs[name]
        layout = _fixed_layout(array.dtype, as_fields)
        if layout is not None:
            data = array.tobytes()
            parts += [_fixed_output_head(name, *layout, array.shape, len(data)), data]
        else:
            tensor = _variable_tensor(array, as_fields)
            parts += [_entry_head(name, len(tensor)), tensor]
    parts += [_SPEC_TAG, _varint(len(spec)), spec]
    return b"".join(parts)


def encode_tensor(array: np.ndarray) -> bytes:
    parts, _ = tensor_parts(array)
    return b"".join(parts)


def encode_predict_request(request: Any, inputs: Mapping[str, np.ndarray]) -> bytes:
    """A serialized PredictRequest: ``request`` (model spec, output filter…) plus ``inputs``."""
    parts: list[Any] = [request.SerializeToString()]
    for name, array in inputs.items():
        key = name.encode()
        tparts, tlen = tensor_parts(array)
        entry_head = _tag(1, LEN) + _varint(len(key)) + key + _tag(2, LEN) + _varint(tlen)
        parts += [_tag(INPUTS, LEN), _varint(len(entry_head) + tlen), entry_head, *tparts]
    return b"".join(parts)


def _skip(buf: memoryview, pos: int, wire_type: int) -> int:
    if wire_type == VARINT:
        return _read_varint(buf, pos)[1]
    if wire_type == FIXED64:
        return pos + 8
    if wire_type == LEN:
        n, pos = _read_varint(buf, pos)
        return pos + n
    if wire_type == FIXED32:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire_type}")


def decode_tensor(buf: memoryview) -> np.ndarray:
    """A TensorProto's bytes → array; zero-copy for tensor_content and packed float/double."""
    pos, end = 0, len(buf)
    code = 0
    shape: list[int] = []
    data: memoryview | None = None
    data_dtype: Any = None
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if field == DTYPE and wire_type == VARINT:
            code, pos = _read_varint(buf, pos)
        elif field == SHAPE and wire_type == LEN:
            n, pos = _read_varint(buf, pos)
            shape_proto = protos.TensorProto.FromString(
                _tag(SHAPE, LEN) + _varint(n) + bytes(buf[pos : pos + n])
            ).tensor_shape
            shape = [d.size for d in shape_proto.dim]
            pos += n
        elif field in (CONTENT, FLOAT_VAL, DOUBLE_VAL) and wire_type == LEN and data is None:
            n, pos = _read_varint(buf, pos)
            data = buf[pos : pos + n]
            data_dtype = {FLOAT_VAL: np.float32, DOUBLE_VAL: np.float64}.get(field)
            pos += n
        else:
            # Anything else (strings, varint lists, an unpacked list…): let protobuf do it.
            return codec.to_numpy(protos.TensorProto.FromString(bytes(buf)))
    dtype = np.dtype(codec.numpy_dtype(code))
    if data_dtype is not None and np.dtype(data_dtype) != dtype:
        return codec.to_numpy(protos.TensorProto.FromString(bytes(buf)))
    count = int(np.prod(shape, dtype=np.int64))
    if data is None or len(data) == 0:
        return codec.to_numpy(protos.TensorProto.FromString(bytes(buf)))
    values = np.frombuffer(data, dtype=dtype.newbyteorder("<"))
    if values.size == count:
        return values.reshape(shape)
    return codec.to_numpy(protos.TensorProto.FromString(bytes(buf)))


def decode_predict_response(data: bytes) -> tuple[Any, dict[str, np.ndarray]]:
    """(model_spec, outputs) of a serialized PredictResponse."""
    buf = memoryview(data)
    pos, end = 0, len(buf)
    spec = protos.ModelSpec()
    outputs: dict[str, np.ndarray] = {}
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type != LEN or field not in (OUTPUTS, RESPONSE_SPEC):
            pos = _skip(buf, pos, wire_type)
            continue
        n, pos = _read_varint(buf, pos)
        body = buf[pos : pos + n]
        pos += n
        if field == RESPONSE_SPEC:
            spec.MergeFromString(bytes(body))
            continue
        name, tensor = "", memoryview(b"")
        p = 0
        while p < len(body):
            k, p = _read_varint(body, p)
            if k >> 3 in (1, 2) and k & 7 == LEN:
                m, p = _read_varint(body, p)
                if k >> 3 == 1:
                    name = bytes(body[p : p + m]).decode()
                else:
                    tensor = body[p : p + m]
                p += m
            else:
                p = _skip(body, p, k & 7)
        outputs[name] = decode_tensor(tensor)
    return spec, outputs
