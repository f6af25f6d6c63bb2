"""Conformance of the embedded server, driven by the official tensorflow-serving-api stubs and raw
HTTP/JSON over real loopback sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

pytestmark = pytest.mark.integration


class Client:
    """The official stubs plus raw REST, pointed at one server."""

    def __init__(self, server, credentials=None, host="127.0.0.1"):
        target = f"{host}:{server.port}"
        self.channel = (
            grpc.secure_channel(target, credentials)
            if credentials
            else grpc.insecure_channel(target)
        )
        self.predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.rest = f"http://127.0.0.1:{server.rest_port}"

    def predict(
        self, x, model="tiny", version=None, label=None, signature="", output_filter=(), timeout=10
    ):
        req = predict_pb2.PredictRequest()
        req.model_spec.name = model
        if version is not None:
            req.model_spec.version.value = version
        if label is not None:
            req.model_spec.version_label = label
        req.model_spec.signature_name = signature
        req.output_filter.extend(output_filter)
        inputs = x if isinstance(x, dict) else {"x": x}
        for k, v in inputs.items():
            req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
        resp = self.predict_stub.Predict(req, timeout=timeout)
        return resp, {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}

    def status(self, model="tiny", version=None):
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = model
        if version is not None:
            req.model_spec.version.value = version
        return self.model_stub.GetModelStatus(req, timeout=10)

    def http(self, path, body=None):
        data = (
            None
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        req = urllib.request.Request(self.rest + path, data=data)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except grpc.RpcError:
            pass  # e.g. NOT_FOUND until the version shows up
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def config_text(models: dict[str, tuple], labels: dict[str, dict[str, int]] | None = None) -> str:
    config = model_server_config_pb2.ModelServerConfig()
    for name, (path, policy) in models.items():
        mc = config.model_config_list.config.add(
            name=name, base_path=str(path), model_platform="tensorflow"
        )
        if policy == "all":
            mc.model_version_policy.all.SetInParent()
        elif isinstance(policy, list):
            mc.model_version_policy.specific.versions.extend(policy)
        elif isinstance(policy, int):
            mc.model_version_policy.latest.num_versions = policy
        for label, version in (labels or {}).get(name, {}).items():
            mc.version_labels[label] = version
    from google.protobuf import text_format

    return text_format.MessageToString(config)


@pytest.fixture
def two_versions(tmp_path, library):
    base = tmp_path / "tiny"
    library.copy(base, 1)
    library.copy(base, 2)
    return base


# --- predict, metadata, status ------------------------------------------------------------------


def test_predict_latest_version_and_output_filter(serve, two_versions):
    server = serve("--model_name", "tiny", "--model_base_path", str(two_versions))
    c = Client(server)
    resp, out = c.predict(np.array([[1.0, 2.0]], np.float32))
    assert resp.model_spec.version.value == 2  # latest{1} by default
    assert resp.model_spec.signature_name == "serving_default"
    np.testing.assert_allclose(out["y"], [[4.0, 6.0]])
    assert out["label"].tolist() == [b"pos"]
    _, out = c.predict(np.zeros((3, 2), np.float32), output_filter=["version"])
    assert set(out) == {"version"} and out["version"].tolist() == [2.0] * 3
    err = rpc_error(c.predict, np.zeros((1, 2), np.float32), version=1)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "Servable not found for request: Specific(tiny, 1)"
    err = rpc_error(c.predict, np.zeros((1, 2), np.float32), model="nope")
    assert err.details() == "Servable not found for request: Latest(nope)"


def test_status_and_metadata_grpc_and_rest(serve, two_versions):
    server = serve("--model_name", "tiny", "--model_base_path", str(two_versions))
    c = Client(server)
    status = c.status()
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (2, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]
    code, body = c.http("/v1/models/tiny")
    assert code == 200
    assert body == {
        "model_version_status": [
            {
                "version": "2",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert c.http("/v1/models/tiny/versions/9")[0] == 404
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "tiny"
    resp = c.predict_stub.GetModelMetadata(req, timeout=10)
    sigs = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sigs)
    assert {"serving_default", "classification", "regression", "echo"} <= set(sigs.signature_def)
    assert sigs.signature_def["classification"].method_name == "tensorflow/serving/classify"
    code, body = c.http("/v1/models/tiny/versions/2/metadata")
    assert code == 200 and body["model_spec"]["version"] == "2"
    inputs = body["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert inputs["x"]["dtype"] == "DT_FLOAT"


def test_rest_predict_row_columnar_and_b64(serve, two_versions):
    server = serve("--model_name", "tiny", "--model_base_path", str(two_versions))
    c = Client(server)
    code, body = c.http("/v1/models/tiny:predict", {"instances": [[1, 2], [0, 0]]})
    assert code == 200
    assert body["predictions"][0]["y"] == [4.0, 6.0] and body["predictions"][1]["label"] == "pos"
    code, body = c.http("/v1/models/tiny/versions/2:predict", {"inputs": {"x": [[1, 1]]}})
    assert code == 200 and body["outputs"]["y"] == [[4.0, 4.0]]
    raw = b"\x00\xffbin"
    code, body = c.http(
        "/v1/models/tiny:predict",
        {"signature_name": "echo", "instances": [{"b64": base64.b64encode(raw).decode()}, "hi"]},
    )
    assert code == 200
    assert body["predictions"][0]["text_bytes"] == {"b64": base64.b64encode(raw).decode()}
    assert body["predictions"][1]["length"] == 2


def test_rest_errors(serve, two_versions):
    server = serve("--model_name", "tiny", "--model_base_path", str(two_versions))
    c = Client(server)
    cases = [
        ("/v1/models/tiny:predict", {"instances": [["a", "b"]]}, 400, "is not of expected type"),
        ("/v1/models/tiny:predict", {"nothing": 1}, 400, "Missing 'inputs' or 'instances' key"),
        ("/v1/models/tiny:predict", b"{not json", 400, "JSON Parse error"),
        ("/v1/models/nope:predict", {"instances": [[1, 2]]}, 404, "Latest(nope)"),
        (
            "/v1/models/tiny/labels/stable:predict",
            {"instances": [[1, 2]]},
            400,
            "Unrecognized servable version label: stable",
        ),
        (
            "/v1/models/tiny:predict",
            {"signature_name": "zzz", "instances": [[1, 2]]},
            400,
            'Serving signature key "zzz" not found.',
        ),
        ("/v1/models/tiny:explode", {"instances": [[1, 2]]}, 400, "Malformed request"),
    ]
    for path, body, status, message in cases:
        code, reply = c.http(path, body)
        assert (code, message in reply["error"]) == (status, True), (path, reply)


def test_rest_json_values_follow_json_tensor_rules(serve, two_versions):
    """What json_tensor.cc takes and its exact texts: a float is no int32, ragged rows are
    named by element, the columnar object ignores keys the signature lacks."""
    c = Client(serve("--model_name", "tiny", "--model_base_path", str(two_versions)))
    predict = "/v1/models/tiny:predict"
    element = "Failed to process element: {} of 'instances' list. Error: INVALID_ARGUMENT: "
    cases = [
        (
            {"instances": [["a", "b"]]},
            element.format(0) + 'JSON Value: "a" Type: String is not of expected type: float',
        ),
        (
            {"signature_name": "spin", "instances": [1.5]},
            element.format(0) + "JSON Value: 1.5 Type: Number is not of expected type: int32",
        ),
        ({"instances": [[1, 2], [3]]}, element.format(1) + "Expecting tensor size: 2 but got: 1"),
        (
            {"instances": [[[1], 2]]},  # json_tensor.cc says level + 1 for the level found
            element.format(0) + "JSON Value: 2 found at incorrect level: 2 in the JSON DOM. "
            "Expected at level: 2",
        ),
        (
            {"instances": [[1, [2]]]},
            element.format(0) + "Encountered list at unexpected level: 1 expected < 1",
        ),
        ({"inputs": {"y": [[1, 1]]}}, "Missing named input: x in 'inputs' object."),
        (
            {"inputs": [[1, 1]], "instances": [[1, 1]]},
            'JSON Value: {\n    "inputs": [[1, 1]],\n    "instances": [[1, 1]]\n} Not formatted '
            "correctly expecting only one of 'inputs' or 'instances' keys to exist ",
        ),
    ]
    for body, message in cases:
        assert c.http(predict, body) == (400, {"error": message}), body
    code, reply = c.http(predict, {"inputs": {"x": [[1, 1]], "not_an_input": 5}})
    assert code == 200 and reply["outputs"]["y"] == [[4.0, 4.0]]
    deep: list = [1.0]
    for _ in range(100):  # more dimensions than a tensor may have: no 500, no crash
        deep = [deep]
    code, reply = c.http(predict, {"instances": deep})
    assert code == 400 and reply["error"].startswith("tensor parsing error: x ("), reply


def test_grpc_input_errors_and_server_survives(serve, two_versions):
    server = serve(
        "--model_name",
        "tiny",
        "--model_base_path",
        str(two_versions),
        "--max_request_size_bytes",
        "65536",
    )
    c = Client(server)
    x = np.zeros((1, 2), np.float32)
    cases = [
        ({"x": x, "extra": x}, "Sent extra: {extra}"),
        ({"nope": x}, "Signature input alias: x(feed name: serving_default_x:0) not found"),
        ({"x": x.astype(np.float64)}, "Expects arg[0] to be float but double is provided"),
    ]
    for inputs, message in cases:
        err = rpc_error(c.predict, inputs)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details(), (
            message,
            err.details(),
        )
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "tiny"
    bad = req.inputs["x"]
    bad.CopyFrom(tf.make_tensor_proto(x))
    bad.tensor_content = b"\x00" * 3  # undecodable: 3 bytes for two floats
    err = rpc_error(c.predict_stub.Predict, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = rpc_error(c.predict, {"x": np.zeros((10000, 2), np.float32)})
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    err = rpc_error(c.predict, x, output_filter=["nope"])
    assert "output tensor alias not found in signature: nope" in err.details()
    err = rpc_error(c.predict, x, label="stable")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = rpc_error(c.predict, {"n": np.array([200000], np.int32)}, signature="spin", timeout=0.3)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _, out = c.predict(x)  # still serving after every error
    np.testing.assert_allclose(out["y"], [[2.0, 2.0]])


def _example(x):
    return tf.train.Example(
        features=tf.train.Features(
            feature={"x": tf.train.Feature(float_list=tf.train.FloatList(value=x))}
        )
    )


def test_classify_and_regress(serve, two_versions):
    server = serve("--model_name", "tiny", "--model_base_path", str(two_versions))
    c = Client(server)
    req = classification_pb2.ClassificationRequest()
    req.model_spec.name = "tiny"
    req.model_spec.signature_name = "classification"
    req.input.example_list.examples.extend([_example([1, 1]), _example([-5, -5])])
    resp = c.predict_stub.Classify(req, timeout=10)
    first = resp.result.classifications[0].classes
    assert [cl.label for cl in first] == ["neg", "pos"] and first[1].score > 0.9
    assert resp.result.classifications[1].classes[0].score > 0.9
    rreq = regression_pb2.RegressionRequest()
    rreq.model_spec.name = "tiny"
    rreq.model_spec.signature_name = "regression"
    rreq.input.example_list.examples.append(_example([1, 1]))
    rresp = c.predict_stub.Regress(rreq, timeout=10)
    assert rresp.result.regressions[0].value == pytest.approx(4.0)
    req.model_spec.signature_name = "serving_default"  # not shaped for classification
    err = rpc_error(c.predict_stub.Classify, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "Expected one or two output Tensors, found 3"
    # A runtime error comes back whole, as TF Serving's C++ status has it (every line, node
    # included), without what Python's function call adds around it.
    req.model_spec.signature_name = "classification"
    del req.input.example_list.examples[:]
    req.input.example_list.examples.append(_example([1, 1, 1]))
    err = rpc_error(c.predict_stub.Classify, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("Name: <unknown>, Key: x, Index: 0.  Number of float values")
    assert "\n\t [[{{function_node " in err.details() and "[Op:" not in err.details()
    code, body = c.http(
        "/v1/models/tiny:classify",
        {"signature_name": "classification", "examples": [{"x": [1.0, 1.0]}]},
    )
    assert code == 200 and body["results"][0][1][0] == "pos"
    code, body = c.http(
        "/v1/models/tiny:regress",
        {"signature_name": "regression", "context": {"x": [0.5, 0.5]}, "examples": [{}]},
    )
    assert code == 200 and body["results"] == [pytest.approx(3.0)]


# --- model management -----------------------------------------------------------------------


def test_hot_reload_of_a_new_version_and_unload(serve, two_versions, library):
    server = serve("--model_name", "tiny", "--model_base_path", str(two_versions))
    c = Client(server)
    library.copy(two_versions, 3)
    wait_for(lambda: c.predict(np.zeros((1, 2), np.float32))[0].model_spec.version.value == 3)
    wait_for(
        lambda: (
            [s.state for s in c.status(version=2).model_version_status]
            == [get_model_status_pb2.ModelVersionStatus.END]
        )
    )
    # Non-numeric or incomplete directories are never versions.
    (two_versions / "tmp-99").mkdir()
    (two_versions / "100").mkdir()
    time.sleep(0.5)
    assert c.predict(np.zeros((1, 2), np.float32))[0].model_spec.version.value == 3


def test_corrupt_version_leaves_the_previous_serving(serve, two_versions, library):
    server = serve("--model_name", "tiny", "--model_base_path", str(two_versions))
    c = Client(server)
    bad = two_versions / "3"
    shutil.copytree(two_versions / "2", bad)
    (bad / "saved_model.pb").write_bytes(b"garbage")
    wait_for(
        lambda: (
            c.status(version=3).model_version_status[0].state
            == get_model_status_pb2.ModelVersionStatus.END
        )
    )
    status = c.status(version=3).model_version_status[0].status
    assert status.error_code != 0 and status.error_message
    assert c.predict(np.zeros((1, 2), np.float32))[0].model_spec.version.value == 2


def test_failing_warmup_fails_the_load(serve, tmp_path, library):
    base = tmp_path / "tiny"
    library.copy(base, 1)
    server = serve("--model_name", "tiny", "--model_base_path", str(base))
    c = Client(server)
    library.copy(base, 2, warmup="broken")
    wait_for(
        lambda: (
            c.status(version=2).model_version_status[0].state
            == get_model_status_pb2.ModelVersionStatus.END
        )
    )
    assert "no_such_input" in c.status(version=2).model_version_status[0].status.error_message
    assert c.predict(np.zeros((1, 2), np.float32))[0].model_spec.version.value == 1


def test_version_policies_and_labels_from_config_file(serve, tmp_path, two_versions, library):
    library.copy(two_versions, 3)
    config = tmp_path / "models.config"
    config.write_text(
        config_text({"tiny": (two_versions, [1, 2])}, {"tiny": {"stable": 1, "canary": 2}})
    )
    # Labels in the first config need the flag (TF Serving checks them before loading).
    server = serve(
        "--model_config_file",
        str(config),
        "--model_config_file_poll_wait_seconds",
        "0.2",
        "--allow_version_labels_for_unavailable_models",
    )
    c = Client(server)
    assert c.predict(np.zeros((1, 2), np.float32), label="stable")[0].model_spec.version.value == 1
    assert c.predict(np.zeros((1, 2), np.float32), label="canary")[0].model_spec.version.value == 2
    assert c.predict(np.zeros((1, 2), np.float32))[0].model_spec.version.value == 2
    code, body = c.http("/v1/models/tiny/labels/stable:predict", {"instances": [[0, 0]]})
    assert code == 200 and body["predictions"][0]["version"] == 1.0
    # The file is polled: switch to "all", then (once 3 is AVAILABLE) move stable.
    config.write_text(config_text({"tiny": (two_versions, "all")}, {"tiny": {"stable": 1}}))
    wait_for(lambda: c.predict(np.zeros((1, 2), np.float32))[0].model_spec.version.value == 3)
    config.write_text(config_text({"tiny": (two_versions, "all")}, {"tiny": {"stable": 3}}))
    wait_for(
        lambda: (
            c.predict(np.zeros((1, 2), np.float32), label="stable")[0].model_spec.version.value == 3
        )
    )
    versions = {
        s.version
        for s in c.status().model_version_status
        if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    }
    assert versions == {1, 2, 3}
    config.write_text(config_text({"tiny": (two_versions, 2)}))
    wait_for(
        lambda: (
            {
                s.version
                for s in c.status().model_version_status
                if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
            }
            == {2, 3}
        )
    )


def test_reload_config_rpc(serve, tmp_path, two_versions, library):
    server = serve("--model_name", "tiny", "--model_base_path", str(two_versions))
    c = Client(server)
    other = tmp_path / "other"
    library.copy(other, 7)

    def reload(text):
        from google.protobuf import text_format

        req = model_management_pb2.ReloadConfigRequest()
        text_format.Parse(text, req.config)
        return c.model_stub.HandleReloadConfigRequest(req, timeout=30)

    # A label may only point to an AVAILABLE version.
    err = rpc_error(reload, config_text({"tiny": (two_versions, 1)}, {"tiny": {"stable": 1}}))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    reload(config_text({"tiny": (two_versions, [1, 2])}))
    reload(
        config_text({"tiny": (two_versions, [1, 2]), "other": (other, 1)}, {"tiny": {"stable": 1}})
    )
    assert c.predict(np.zeros((1, 2), np.float32), model="other")[0].model_spec.version.value == 7
    assert c.predict(np.zeros((1, 2), np.float32), label="stable")[0].model_spec.version.value == 1
    reload(config_text({"other": (other, 1)}))  # the whole config is replaced: tiny goes away
    err = rpc_error(c.predict, np.zeros((1, 2), np.float32))
    assert err.code() == grpc.StatusCode.NOT_FOUND


# --- operations -----------------------------------------------------------------------------


def test_health_and_metrics(serve, tmp_path, two_versions):
    monitoring = tmp_path / "monitoring.config"
    monitoring.write_text(
        'prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }'
    )
    server = serve(
        "--model_name",
        "tiny",
        "--model_base_path",
        str(two_versions),
        "--monitoring_config_file",
        str(monitoring),
        "--enable_grpc_healthcheck_service",
    )
    c = Client(server)
    health = health_pb2_grpc.HealthStub(c.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    c.predict(np.zeros((1, 2), np.float32))
    rpc_error(c.predict, np.zeros((1, 2), np.float32), model="nope")
    with urllib.request.urlopen(c.rest + "/monitoring/prometheus/metrics", timeout=5) as r:
        text = r.read().decode()
    assert ':tensorflow:serving:request_count{model_name="tiny",status="OK"} 1.0' in text
    assert 'status="NOT_FOUND"' in text
    assert ":tensorflow:serving:request_latency_bucket" in text
    assert ":tensorflow:cc:saved_model:load_attempt_count" in text


def _certs(tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def make(name, issuer=None, issuer_key=None, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
            )
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        pem_key = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert, key, cert.public_bytes(serialization.Encoding.PEM), pem_key

    ca, ca_key, ca_pem, _ = make("test-ca", ca=True)
    _, _, server_pem, server_key = make("localhost", ca, ca_key)
    _, _, client_pem, client_key = make("client", ca, ca_key)
    return ca_pem, server_pem, server_key, client_pem, client_key


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_and_mutual_tls(serve, tmp_path, two_versions, mutual):
    ca, cert, key, client_cert, client_key = _certs(tmp_path)
    ssl = tmp_path / "ssl.config"
    ssl.write_text(
        f"server_key: {json.dumps(key.decode())}\nserver_cert: {json.dumps(cert.decode())}\n"
        f"custom_ca: {json.dumps(ca.decode())}\nclient_verify: {str(mutual).lower()}\n"
    )
    server = serve(
        "--model_name",
        "tiny",
        "--model_base_path",
        str(two_versions),
        "--ssl_config_file",
        str(ssl),
    )
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=client_key if mutual else None,
        certificate_chain=client_cert if mutual else None,
    )
    c = Client(server, creds, host="localhost")
    assert c.predict(np.zeros((1, 2), np.float32))[0].model_spec.version.value == 2
    if mutual:  # without a client certificate the handshake is refused
        anonymous = Client(
            server, grpc.ssl_channel_credentials(root_certificates=ca), host="localhost"
        )
        assert rpc_error(anonymous.predict, np.zeros((1, 2), np.float32), timeout=5).code() == (
            grpc.StatusCode.UNAVAILABLE
        )
    plaintext = Client(server)
    assert rpc_error(plaintext.predict, np.zeros((1, 2), np.float32), timeout=5).code() == (
        grpc.StatusCode.UNAVAILABLE
    )


def test_batching_is_correct_under_concurrency(serve, tmp_path, two_versions):
    params = tmp_path / "batching.config"
    params.write_text(
        "max_batch_size { value: 8 }\nbatch_timeout_micros { value: 20000 }\n"
        "num_batch_threads { value: 2 }\nallowed_batch_sizes: [2, 4, 8]\n"
    )
    server = serve(
        "--model_name",
        "tiny",
        "--model_base_path",
        str(two_versions),
        "--enable_batching",
        "--batching_parameters_file",
        str(params),
    )
    c = Client(server)
    results, errors = {}, []

    def call(i):
        try:
            rows = 1 + i % 3
            x = np.full((rows, 2), float(i), np.float32)
            results[i] = c.predict(x)[1]
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, out in results.items():
        rows = 1 + i % 3
        np.testing.assert_allclose(out["y"], np.full((rows, 2), 2.0 * i + 2))
        assert out["version"].shape == (rows,)
    err = rpc_error(c.predict, np.zeros((9, 2), np.float32))
    assert "larger than maximum input batch size 8" in err.details()


def test_batcher_rejects_when_the_queue_is_full():
    from serving.server.batching import Batcher
    from serving.server.errors import ServingError
    from serving.server.options import Batching

    release = threading.Event()

    class Slow:
        runs_inline = False  # a slow model's batches run on the batch threads

        def run_checked(self, signature, inputs, output_filter):
            release.wait(5)
            return {"y": inputs["x"]}

    # One batch running and one waiting (max_enqueued_batches 1): the third must be refused.
    batcher = Batcher(
        Batching(
            max_batch_size=1, batch_timeout_micros=0, max_enqueued_batches=1, num_batch_threads=1
        )
    )
    slow = Slow()

    async def call():
        try:
            await batcher.submit(slow, "s", {"x": np.zeros((1, 1))}, ())  # type: ignore[arg-type]
            return "ok"
        except ServingError as e:
            return e.code

    async def main():
        tasks = []
        for _ in range(4):
            tasks.append(asyncio.ensure_future(call()))
            await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(*tasks)

    outcomes = asyncio.run(main())
    batcher.stop()
    assert outcomes[:2] == ["ok", "ok"], outcomes
    assert grpc.StatusCode.UNAVAILABLE in outcomes and "ok" in outcomes


# --- command line ---------------------------------------------------------------------------


def test_cli_rejects_bad_flags_and_files(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "serving.server", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = run("--port", "99999", "--model_base_path", str(tmp_path))
    assert r.returncode == 255 and "--port: 99999 is not a port number" in r.stderr
    r = run("--model_config_file", str(tmp_path / "missing.config"))
    assert r.returncode == 255 and "Failed to start server. Error: " in r.stderr
    (tmp_path / "bad.config").write_text("model_config_list { config { nme: 'x' } }")
    r = run("--model_config_file", str(tmp_path / "bad.config"))
    assert r.returncode == 255
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig: 1:30:" in r.stderr
    assert f"INVALID_ARGUMENT: Invalid protobuf file: '{tmp_path / 'bad.config'}'" in r.stderr
    r = run()
    assert r.returncode == 255 and "model_config_file are empty!" in r.stderr


def test_cli_serves_and_stops_on_sigterm(tmp_path, two_versions):
    from tests.conftest import free_port

    port, rest = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.server",
            f"--port={port}",
            f"--rest_api_port={rest}",
            "--model_name=tiny",
            f"--model_base_path={two_versions}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def ready():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{rest}/v1/models/tiny", timeout=1):
                    return True
            except OSError:
                return False

        wait_for(ready, timeout=90)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_load_during_hot_swap_loses_no_request(serve, two_versions, library):
    """≥ 200 requests/s for ≥ 10 s over loopback while version 3 is published and 2 unloaded."""
    server = serve(
        "--model_name", "tiny", "--model_base_path", str(two_versions), "--grpc_max_threads", "8"
    )
    c = Client(server)
    duration, workers = 10.0, 4
    seen: list[tuple[float, int]] = []
    failures: list[Exception] = []
    lock = threading.Lock()
    start = time.monotonic()

    def load():
        x = np.ones((1, 2), np.float32)
        while time.monotonic() - start < duration:
            try:
                resp, _ = c.predict(x, timeout=5)
                with lock:
                    seen.append((time.monotonic() - start, resp.model_spec.version.value))
            except Exception as e:  # noqa: BLE001 - every failure is a test failure
                failures.append(e)

    threads = [threading.Thread(target=load) for _ in range(workers)]
    for t in threads:
        t.start()
    time.sleep(3)
    library.copy(two_versions, 3)
    for t in threads:
        t.join()
    assert not failures
    rate = len(seen) / duration
    print(f"hot swap load: {rate:.0f} requests/s")
    assert rate >= 200, f"only {rate:.0f} requests/s"
    versions = [v for _, v in sorted(seen)]
    assert versions[0] == 2 and versions[-1] == 3
    switch = versions.index(3)
    assert set(versions[switch:]) == {3}  # once switched, never back to the unloaded version


def test_boolean_flags_take_tensorflow_model_server_forms(tmp_path, serve, two_versions):
    from serving.server.options import OptionsError, options_from_args

    base = ["--model_base_path", str(tmp_path)]
    assert options_from_args([*base, "--enable_batching"]).batching is not None
    assert options_from_args([*base, "--enable_batching=true"]).batching is not None
    assert options_from_args([*base, "--enable_batching=false"]).batching is None
    with pytest.raises(SystemExit):
        options_from_args([*base, "--enable_batching=maybe"])
    with pytest.raises(OptionsError, match="allowed_batch_sizes"):
        params = tmp_path / "b.config"
        params.write_text("max_batch_size { value: 8 }\nallowed_batch_sizes: [4, 2]\n")
        options_from_args([*base, "--enable_batching", "--batching_parameters_file", str(params)])
    server = serve(
        "--model_name",
        "tiny",
        "--model_base_path",
        str(two_versions),
        "--enable_serialization_as_tensor_content=true",
        "--enable_grpc_healthcheck_service=true",
    )
    resp, out = Client(server).predict(np.ones((1, 2), np.float32))
    assert resp.outputs["y"].tensor_content and not resp.outputs["y"].float_val
    health = health_pb2_grpc.HealthStub(Client(server).channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="PredictionService"), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
