"""The client: every method against the embedded server over real sockets, typed errors, retries,
TLS, round_robin, the codec (property-based) and wire compatibility with the official classes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2

from serving import codec, protos
from serving.client import AsyncServingClient, ServingClient, main
from serving.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidInputError,
    ModelNotFoundError,
    UnavailableError,
)
from tests.conftest import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def tiny(serve, tmp_path, library):
    base = tmp_path / "tiny"
    library.copy(base, 1)
    library.copy(base, 2)
    config = tmp_path / "models.config"
    config.write_text(
        f'model_config_list {{ config {{ name: "tiny" base_path: "{base}" '
        'model_platform: "tensorflow" model_version_policy { all {} } '
        'version_labels { key: "stable" value: 1 } } }'
    )
    server = serve(
        "--model_config_file", str(config), "--allow_version_labels_for_unavailable_models"
    )
    return server, base


def test_predict_by_latest_version_and_label(tiny):
    server, _ = tiny
    with ServingClient(f"127.0.0.1:{server.port}", model="tiny") as client:
        out = client.predict({"x": np.array([[1, 2]], np.float32)})
        assert out.version == 2 and out.signature == "serving_default"
        np.testing.assert_allclose(out["y"], [[4, 6]])
        assert client.predict(np.zeros((1, 2), np.float32), version=1).version == 1
        assert client.predict(np.zeros((1, 2), np.float32), label="stable").version == 1
        out = client.predict(np.zeros((2, 2), np.float32), output_filter=["label"])
        assert list(out) == ["label"] and out["label"].tolist() == [b"pos", b"pos"]
        echo = client.predict(
            {"text": np.array(["héllo", b"\x00"], dtype=object)}, signature="echo"
        )
        assert echo["text_bytes"].tolist() == ["héllo".encode(), b"\x00"]
    pinned = ServingClient(f"127.0.0.1:{server.port}", model="tiny", label="stable")
    assert pinned.predict(np.zeros((1, 2), np.float32)).version == 1
    pinned.close()


def test_classify_regress_metadata_status(tiny):
    server, _ = tiny
    with ServingClient(f"127.0.0.1:{server.port}", model="tiny") as client:
        result = client.classify([{"x": [1.0, 1.0]}, {"x": [-9.0, -9.0]}])
        assert [label for label, _ in result[0]] == ["neg", "pos"]
        assert result[0][1][1] > 0.9 and result[1][0][1] > 0.9
        values = client.regress([{"x": [1.0, 1.0]}], version=1)
        assert values.tolist() == [pytest.approx(3.0)]
        meta = client.metadata()
        assert meta.model == "tiny" and meta.version == 2
        sig = meta.signatures["serving_default"]
        assert sig.inputs["x"].dtype == "float32" and sig.inputs["x"].shape == (-1, 2)
        assert sig.outputs["label"].dtype == "object"
        assert meta.signatures["classification"].method == "tensorflow/serving/classify"
        states = client.status()
        assert {(s.version, s.state) for s in states} == {(1, "AVAILABLE"), (2, "AVAILABLE")}
        assert client.status(2)[0].state == "AVAILABLE"
        assert client.wait_until_available(2, deadline=5).version == 2


def test_errors_are_typed_and_keep_the_message(tiny):
    server, _ = tiny
    target = f"127.0.0.1:{server.port}"
    with ServingClient(target, model="tiny") as client:
        with pytest.raises(ModelNotFoundError, match=r"Specific\(tiny, 9\)") as e:
            client.predict(np.zeros((1, 2), np.float32), version=9)
        assert isinstance(e.value.__cause__, grpc.RpcError)
        with pytest.raises(InvalidInputError, match="Expects arg"):
            client.predict({"x": np.zeros((1, 2), np.float64)})
        with pytest.raises(InvalidInputError, match="Unrecognized servable version label"):
            client.predict(np.zeros((1, 2), np.float32), label="nope")
        with pytest.raises(FailedPreconditionError, match="Serving signature key"):
            client.predict({"x": np.zeros((1, 2), np.float32)}, signature="nope")
        with pytest.raises(DeadlineExceededError):
            client.predict({"n": np.array([400000], np.int32)}, signature="spin", timeout=0.2)
    with ServingClient(target, model="missing") as client:
        with pytest.raises(ModelNotFoundError, match=r"Latest\(missing\)"):
            client.predict({"x": np.zeros((1, 2), np.float32)})


def test_local_validation_says_what_was_expected(tiny):
    server, _ = tiny
    with ServingClient(f"127.0.0.1:{server.port}", model="tiny", validate_inputs=True) as c:
        with pytest.raises(InvalidInputError, match=r"expected dtype float32, got float64"):
            c.predict({"x": np.zeros((1, 2))})
        with pytest.raises(InvalidInputError, match=r"expected shape \[-1, 2\]"):
            c.predict({"x": np.zeros((1, 3), np.float32)})
        with pytest.raises(InvalidInputError, match=r"missing \['x'\]"):
            c.predict({"z": np.zeros((1, 2), np.float32)})


def test_unreachable_server_is_unavailable():
    start = time.monotonic()
    with ServingClient(f"127.0.0.1:{free_port()}", model="m", timeout=5, retries=2) as client:
        with pytest.raises(UnavailableError) as e:
            client.status()
    assert e.value.retryable and time.monotonic() - start < 5


def test_wait_for_ready_rides_out_a_late_server(serve, tmp_path, library):
    base = tmp_path / "tiny"
    library.copy(base, 1)
    port, rest = free_port(), free_port()
    started = []

    def late_start():
        time.sleep(1.5)
        started.append(
            serve(
                "--model_name",
                "tiny",
                "--model_base_path",
                str(base),
                "--port",
                str(port),
                "--rest_api_port",
                str(rest),
            )
        )

    thread = threading.Thread(target=late_start)
    thread.start()
    try:
        with ServingClient(
            f"127.0.0.1:{port}", model="tiny", wait_for_ready=True, timeout=30
        ) as client:
            out = client.predict({"x": np.ones((1, 2), np.float32)})
            assert out.version == 1
    finally:
        thread.join()


def test_round_robin_over_two_servers(serve, tmp_path, library):
    a, b = tmp_path / "a", tmp_path / "b"
    library.copy(a, 1)
    library.copy(b, 2)
    s1 = serve("--model_name", "tiny", "--model_base_path", str(a))
    s2 = serve("--model_name", "tiny", "--model_base_path", str(b))
    # Two addresses behind one target, as a headless Service's DNS name resolves.
    target = f"ipv4:127.0.0.1:{s1.port},127.0.0.1:{s2.port}"
    with ServingClient(target, model="tiny", wait_for_ready=True) as client:
        versions = [client.predict({"x": np.zeros((1, 2), np.float32)}).version for _ in range(20)]
    assert set(versions) == {1, 2}
    assert abs(versions.count(1) - versions.count(2)) <= 2


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_and_mtls(serve, tmp_path, library, mutual):
    import json

    from tests.test_server import _certs

    base = tmp_path / "tiny"
    library.copy(base, 1)
    ca, cert, key, client_cert, client_key = _certs(tmp_path)
    ssl = tmp_path / "ssl.config"
    ssl.write_text(
        f"server_key: {json.dumps(key.decode())}\n"
        f"server_cert: {json.dumps(cert.decode())}\n"
        f"custom_ca: {json.dumps(ca.decode())}\nclient_verify: {str(mutual).lower()}\n"
    )
    server = serve(
        "--model_name", "tiny", "--model_base_path", str(base), "--ssl_config_file", str(ssl)
    )
    kwargs = dict(root_certificates=ca)
    if mutual:
        kwargs.update(client_certificate=client_cert, client_key=client_key)
    with ServingClient(f"localhost:{server.port}", model="tiny", **kwargs) as client:
        assert client.predict({"x": np.zeros((1, 2), np.float32)}).version == 1
    with ServingClient(f"localhost:{server.port}", model="tiny", retries=0, timeout=3) as plain:
        with pytest.raises(UnavailableError):
            plain.status()


def test_reload_config(tiny, tmp_path):
    server, base = tiny
    with ServingClient(f"127.0.0.1:{server.port}", model="tiny") as client:
        client.reload_config(
            f'model_config_list {{ config {{ name: "tiny" base_path: "{base}" '
            'model_platform: "tensorflow" model_version_policy { specific { versions: 1 } } '
            'version_labels { key: "stable" value: 1 } } }'
        )
        client.wait_until_available(1, deadline=10)
        assert client.predict({"x": np.zeros((1, 2), np.float32)}).version == 1
        with pytest.raises(FailedPreconditionError):  # an existing label never moves to 2
            client.reload_config(
                f'model_config_list {{ config {{ name: "tiny" base_path: "{base}" '
                "model_version_policy { specific { versions: 1 } } "
                'version_labels { key: "stable" value: 2 } } }'
            )


def test_async_client(tiny):
    server, _ = tiny

    async def run():
        async with AsyncServingClient(f"127.0.0.1:{server.port}", model="tiny") as client:
            xs = [np.full((1, 2), i, np.float32) for i in range(20)]
            outs = await asyncio.gather(*(client.predict({"x": x}) for x in xs))
            meta = await client.metadata()
            cls = await client.classify([{"x": [1.0, 1.0]}])
            with pytest.raises(ModelNotFoundError):
                await client.predict({"x": xs[0]}, version=7)
            return outs, meta, cls

    outs, meta, cls = asyncio.run(run())
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out["y"], [[2 * i + 2] * 2])
    assert "serving_default" in meta.signatures and cls[0][1][0] == "pos"


# --- the client stays light --------------------------------------------------------------------


def test_importing_the_client_does_not_import_tensorflow():
    code = (
        "import sys, time; t = time.perf_counter(); import serving.client; "
        "print(time.perf_counter() - t); "
        "assert not any(m == 'tensorflow' or m.startswith('tensorflow.') for m in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 2.0


# --- codec and wire compatibility --------------------------------------------------------------

DTYPES = [
    np.float16,
    np.float32,
    np.float64,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
    np.complex128,
]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), as_fields=st.booleans())
def test_codec_round_trips_every_dtype(data, dtype, as_fields):
    value = data.draw(hnp.arrays(dtype, SHAPES))
    proto = codec.to_tensor_proto(value, protos.TensorProto, as_fields=as_fields)
    back = codec.to_numpy(proto)
    assert back.dtype == value.dtype and back.shape == value.shape
    np.testing.assert_array_equal(back, value)
    # TensorFlow reads what we write, and we read what TensorFlow writes.
    official = tensor_pb2.TensorProto.FromString(proto.SerializeToString())
    np.testing.assert_array_equal(tf.make_ndarray(official), value)
    theirs = tf.make_tensor_proto(value)
    np.testing.assert_array_equal(
        codec.to_numpy(protos.TensorProto.FromString(theirs.SerializeToString())), value
    )


@settings(max_examples=30, deadline=None)
@given(values=hnp.arrays(object, SHAPES, elements=st.binary(max_size=8)))
def test_codec_strings(values):
    proto = codec.to_tensor_proto(values, protos.TensorProto)
    back = codec.to_numpy(proto)
    assert back.shape == values.shape and back.tolist() == values.tolist()
    official = tensor_pb2.TensorProto.FromString(proto.SerializeToString())
    assert tf.make_ndarray(official).tolist() == values.tolist()


def test_codec_bfloat16_scalars_and_short_typed_lists():
    import ml_dtypes

    value = np.array([[1.5, -2.0]], dtype=ml_dtypes.bfloat16)
    np.testing.assert_array_equal(
        codec.to_numpy(codec.to_tensor_proto(value, protos.TensorProto)), value
    )
    official = tf.make_tensor_proto(np.float32(3.5))
    assert codec.to_numpy(protos.TensorProto.FromString(official.SerializeToString())) == 3.5
    # One typed value fills the whole shape (TensorFlow's rule).
    short = protos.TensorProto(dtype=codec.DT_FLOAT, float_val=[7.0])
    short.tensor_shape.dim.add().size = 3
    assert codec.to_numpy(short).tolist() == [7.0, 7.0, 7.0]
    bad = protos.TensorProto(dtype=codec.DT_FLOAT, tensor_content=b"\x00" * 5)
    bad.tensor_shape.dim.add().size = 2
    with pytest.raises(codec.CodecError, match="tensor_content has 5 bytes"):
        codec.to_numpy(bad)


def test_wire_compatibility_with_the_official_classes():
    ours = protos.PredictRequest()
    ours.model_spec.name = "m"
    ours.model_spec.version_label = "stable"
    ours.inputs["x"].CopyFrom(
        codec.to_tensor_proto(np.arange(6, dtype=np.float32).reshape(2, 3), protos.TensorProto)
    )
    ours.output_filter.append("y")
    official = predict_pb2.PredictRequest.FromString(ours.SerializeToString())
    assert official.model_spec.version_label == "stable"
    assert tf.make_ndarray(official.inputs["x"]).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert official.SerializeToString(deterministic=True) == ours.SerializeToString(
        deterministic=True
    )
    back = protos.PredictRequest.FromString(official.SerializeToString())
    assert back == ours


# --- command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_like(tmp_path_factory):
    """A small exported image model (8x8 grayscale, classes a/b) via the real pipeline."""
    from pipeline.evaluate import evaluate
    from pipeline.export import export
    from pipeline.ingest import ingest
    from pipeline.train import train
    from tests.conftest import config, make_images

    tmp = tmp_path_factory.mktemp("cli")
    root = make_images(tmp / "imgs", per_class=20)
    cfg = config(tmp, f'data.source="{root}"', "model.name=shapes", "train.epochs=3")
    ingest(cfg)
    train(cfg)
    evaluate(cfg)
    return export(cfg), root


def test_cli_predict_status_metadata(serve, digits_like, tmp_path, capsys):
    version_dir, images = digits_like
    server = serve("--model_name", "shapes", "--model_base_path", str(version_dir.parent))
    target = ["--target", f"127.0.0.1:{server.port}", "--model", "shapes"]
    png = sorted((images / "b").glob("*.png"))[0]
    assert (
        main(
            [
                "predict",
                *target,
                "--input",
                str(png),
                "--labels",
                str(version_dir / "assets/labels.txt"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "version 1" in out and out.splitlines()[1].startswith("[0] b:")
    from PIL import Image

    pixels = np.asarray(Image.open(png), dtype=np.float32)
    np.save(tmp_path / "x.npy", pixels[..., None])
    assert main(["predict", *target, "--input", str(tmp_path / "x.npy")]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Without --labels only the top class has a name (the model's `classes` output); every
    # entry still says its id, in one form, and the CLI says how to name them all.
    assert lines[1].startswith("[0] b (id 1): ") and ", id 0: " in lines[1]
    assert "--labels FILE" in lines[2]
    assert main(["predict", *target, "--input", str(tmp_path / "x.npy"), "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert (reply["model"], reply["version"], reply["outputs"]["classes"]) == ("shapes", 1, ["b"])
    assert [e["id"] for e in reply["top"][0]] == [1, 0] and reply["top"][0][0]["label"] == "b"
    (tmp_path / "x.json").write_text('{"instances": [' + str(pixels[..., None].tolist()) + "]}")
    assert main(["predict", *target, "--input", str(tmp_path / "x.json"), "--top", "1"]) == 0
    assert main(["status", *target]) == 0
    assert "shapes version 1: AVAILABLE" in capsys.readouterr().out
    assert main(["metadata", *target]) == 0
    out = capsys.readouterr().out
    assert "input image: float32 [-1, 8, 8, 1]" in out and "signature serving_bytes" in out


def test_cli_errors(serve, digits_like, tmp_path, capsys):
    version_dir, _ = digits_like
    server = serve("--model_name", "shapes", "--model_base_path", str(version_dir.parent))
    target = ["--target", f"127.0.0.1:{server.port}", "--model", "shapes"]
    assert main(["predict", *target, "--input", str(tmp_path / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["predict", *target, "--input", str(tmp_path / "bad.png")]) == 2
    assert "cannot decode image" in capsys.readouterr().err
    np.save(tmp_path / "wrong.npy", np.zeros((3, 3)))
    assert main(["predict", *target, "--input", str(tmp_path / "wrong.npy")]) == 2
    assert "shape" in capsys.readouterr().err
    dead = ["--target", f"127.0.0.1:{free_port()}", "--model", "shapes", "--timeout", "2"]
    assert main(["status", *dead]) == 1
    assert "cannot reach" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), as_fields=st.booleans())
def test_wire_tensors_match_the_official_encoding(data, dtype, as_fields):
    from serving import wire

    value = data.draw(hnp.arrays(dtype, SHAPES))
    encoded = wire.encode_tensor(value)
    np.testing.assert_array_equal(
        tf.make_ndarray(tensor_pb2.TensorProto.FromString(encoded)), value
    )
    theirs = (
        codec.to_tensor_proto(value, tensor_pb2.TensorProto, as_fields=True)
        if as_fields
        else tf.make_tensor_proto(value)
    )
    decoded = wire.decode_tensor(memoryview(theirs.SerializeToString()))
    assert decoded.dtype == value.dtype and decoded.shape == value.shape
    np.testing.assert_array_equal(decoded, value)


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    dtypes=st.lists(st.sampled_from([*DTYPES, object, str]), min_size=1, max_size=3),
    as_fields=st.booleans(),
)
def test_server_responses_are_the_bytes_protobuf_writes(data, dtypes, as_fields):
    """The server's own Predict response encoder against the message built field by field:
    the same bytes as protobuf's deterministic serialization, every dtype, both modes."""
    from tensorflow_serving.apis import predict_pb2

    from serving import wire

    outputs = {}
    for i, dtype in enumerate(dtypes):
        if dtype is object:
            outputs[f"o{i}"] = data.draw(hnp.arrays(object, SHAPES, elements=st.binary()))
        elif dtype is str:
            outputs[f"o{i}"] = data.draw(hnp.arrays(object, SHAPES, elements=st.text()))
        else:
            outputs[f"o{i}"] = data.draw(hnp.arrays(dtype, SHAPES))
    expected = predict_pb2.PredictResponse()
    expected.model_spec.name = "m"
    expected.model_spec.version.value = 7
    expected.model_spec.signature_name = "serving_default"
    for name, value in outputs.items():
        expected.outputs[name].CopyFrom(
            codec.to_tensor_proto(value, tensor_pb2.TensorProto, as_fields=as_fields)
        )
    spec = expected.model_spec.SerializeToString()
    ours = wire.encode_predict_response(spec, outputs, as_fields)
    assert ours == expected.SerializeToString(deterministic=True)


def test_wire_predict_request_and_response():
    from tensorflow_serving.apis import predict_pb2

    from serving import wire

    request = protos.PredictRequest()
    request.model_spec.name = "m"
    request.output_filter.append("y")
    inputs = {
        "x": np.arange(12, dtype=np.float32).reshape(3, 4),
        "s": np.array([b"a", b"bc"], dtype=object),
    }
    official = predict_pb2.PredictRequest.FromString(wire.encode_predict_request(request, inputs))
    assert official.model_spec.name == "m" and list(official.output_filter) == ["y"]
    assert tf.make_ndarray(official.inputs["x"]).tolist() == inputs["x"].tolist()
    assert tf.make_ndarray(official.inputs["s"]).tolist() == [b"a", b"bc"]
    response = predict_pb2.PredictResponse()
    response.model_spec.name = "m"
    response.model_spec.version.value = 3
    response.outputs["p"].CopyFrom(
        codec.to_tensor_proto(
            np.array([[0.25, 0.75]], np.float32), tensor_pb2.TensorProto, as_fields=True
        )
    )
    response.outputs["ids"].CopyFrom(tf.make_tensor_proto(np.array([1, 2], np.int64)))
    response.outputs["c"].CopyFrom(tf.make_tensor_proto(np.array([b"yes"])))
    spec, outputs = wire.decode_predict_response(response.SerializeToString())
    assert spec.version.value == 3
    assert outputs["p"].tolist() == [[0.25, 0.75]] and not outputs["p"].flags.writeable
    assert outputs["ids"].tolist() == [1, 2] and outputs["c"].tolist() == [b"yes"]


def test_only_idempotent_calls_are_retried_within_a_budget():
    """A server that answers UNAVAILABLE: Predict and GetModelStatus are tried max_attempts
    times, HandleReloadConfigRequest once; once the retry budget is spent, one attempt each."""
    from concurrent import futures

    from serving import protos as p

    attempts: dict[str, int] = {}

    def unavailable(name):
        def handler(request, context):
            attempts[name] = attempts.get(name, 0) + 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "down")

        return grpc.unary_unary_rpc_method_handler(handler)

    server = grpc.server(futures.ThreadPoolExecutor(4))
    for service, methods in (
        ("tensorflow.serving.PredictionService", ("Predict",)),
        ("tensorflow.serving.ModelService", ("GetModelStatus", "HandleReloadConfigRequest")),
    ):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {m: unavailable(m) for m in methods}),)
        )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = ServingClient(f"127.0.0.1:{port}", model="m", retries=3)
        with pytest.raises(UnavailableError):
            client.reload_config(p.ModelServerConfig(), timeout=10)
        assert attempts == {"HandleReloadConfigRequest": 1}
        with pytest.raises(UnavailableError):
            client.status(timeout=10)
        assert attempts["GetModelStatus"] == 4
        # Every failure costs a token (10): after a few failed calls the budget is below half
        # and calls go out once.
        for _ in range(4):
            with pytest.raises(UnavailableError):
                client.predict({"x": np.zeros((1, 2), np.float32)}, timeout=10)
        assert attempts["Predict"] < 4 * 4
        before = attempts["Predict"]
        with pytest.raises(UnavailableError):
            client.predict({"x": np.zeros((1, 2), np.float32)}, timeout=10)
        assert attempts["Predict"] == before + 1
        client.close()
    finally:
        server.stop(0)
