"""The server on a bad day: disk faults under load, hostile requests, bounded resources, drain.

Every test runs a real server on loopback; counts and times are bounded.
"""

from __future__ import annotations

import gc
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.conftest import free_port
from tests.test_server import Client, rpc_error, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
STATE = get_model_status_pb2.ModelVersionStatus


class Load:
    """Threads predicting over gRPC and REST until stopped; every failure is kept."""

    def __init__(self, server, threads: int = 2):
        self.client = Client(server)
        self.stop = threading.Event()
        self.ok = 0
        self.versions: set[int] = set()
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._grpc) for _ in range(threads)]
        self.threads.append(threading.Thread(target=self._rest))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _grpc(self) -> None:
        while not self.stop.is_set():
            try:
                resp, _ = self.client.predict(np.zeros((1, 2), np.float32))
                self.versions.add(resp.model_spec.version.value)
                self.ok += 1
            except grpc.RpcError as e:
                self.failures.append(f"gRPC {e.code().name}: {e.details()}")

    def _rest(self) -> None:
        while not self.stop.is_set():
            status, body = self.client.http("/v1/models/tiny:predict", {"instances": [[1, 2]]})
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(f"REST {status}: {body}")


def test_the_last_available_version_serves_through_every_disk_fault(
    serve, tmp_path, library, monkeypatch
):
    """Half-copied and corrupt newer versions, an unlistable and a vanished base path, and the
    loaded version's own directory deleted: 0 failed requests, version 2 answers throughout."""
    base = tmp_path / "tiny"
    library.copy(base, 1)
    library.copy(base, 2)
    server = serve("--model_name", "tiny", "--model_base_path", str(base))
    c = Client(server)
    polls = 0.5  # five poll passes at 0.1 s

    with Load(server) as load:
        # A version directory still being copied: the variables' data file is cut short.
        half = base / "3"
        shutil.copytree(base / "2", half)
        data = next((half / "variables").glob("variables.data-*"))
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        wait_for(lambda: c.status(version=3).model_version_status[0].state == STATE.END)
        # A corrupt newer version.
        (base / "4").mkdir()
        (base / "4" / "saved_model.pb").write_bytes(b"\x00garbage")
        wait_for(lambda: c.status(version=4).model_version_status[0].state == STATE.END)
        time.sleep(polls)
        # The base path cannot be listed (permissions, a flaky network file system).
        original = Path.iterdir

        def denied(self):
            if self == base:
                raise PermissionError(13, "Permission denied", str(self))
            return original(self)

        monkeypatch.setattr(Path, "iterdir", denied)
        time.sleep(polls)
        monkeypatch.setattr(Path, "iterdir", original)
        # The base path disappears for a while (an unmounted volume).
        moved = tmp_path / "moved"
        base.rename(moved)
        time.sleep(polls)
        moved.rename(base)
        # The loaded version's own files go away.
        shutil.rmtree(base / "2")
        time.sleep(polls)
    assert load.failures == [] and load.ok > 20
    assert load.versions == {2}
    assert [s.state for s in c.status(version=2).model_version_status] == [STATE.AVAILABLE]


def test_hostile_rest_requests_get_400_json_and_cost_nothing(serve, tmp_path, library):
    library.copy(tmp_path / "tiny", 1)
    server = serve(
        "--model_name",
        "tiny",
        "--model_base_path",
        str(tmp_path / "tiny"),
        "--max_request_size_bytes",
        "4096",
        "--rest_api_timeout_in_ms",
        "700",
    )
    c = Client(server)
    # Deep nesting, a version beyond int64, other methods, paths outside /v1/.
    status, body = c.http("/v1/models/tiny:predict", b"[" * 4000)
    assert status == 400 and "JSON Parse error" in body["error"]
    huge = "99999999999999999999"
    status, body = c.http(f"/v1/models/tiny/versions/{huge}:predict", {"instances": []})
    assert (status, body["error"]) == (
        400,
        f"Failed to convert version: {huge} to numeric.",
    )
    for method in ("PUT", "DELETE", "PATCH"):
        conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
        conn.request(method, "/v1/models/tiny", body=b"{}")
        reply = conn.getresponse()
        assert reply.status == 400
        assert json.loads(reply.read()) == {"error": f"Malformed request: {method} /v1/models/tiny"}
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    conn.request("GET", "/elsewhere")
    assert conn.getresponse().status == 404

    def raw(data: bytes, wait: float = 10) -> bytes:
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=wait) as s:
            s.sendall(data)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    def status(reply: bytes) -> int:
        return int(reply.split(b" ", 2)[1])

    head = b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    # A negative length must not turn into "read to EOF": refused before the body is read.
    assert status(raw(head + b"Content-Length: -1\r\n\r\n" + b"1" * 20_000)) == 400
    # Over the cap by the header, and by a chunked body that never declared a size.
    too_big = raw(head + b"Content-Length: 5000\r\n\r\n" + b" " * 5000)
    assert status(too_big) == 429 and b"larger than the maximum of 4096" in too_big
    chunk = b"800\r\n" + b" " * 0x800 + b"\r\n"
    chunked = raw(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n")
    assert status(chunked) == 429
    # A body that stops coming: answered 504 at --rest_api_timeout_in_ms.
    start = time.monotonic()
    slow = raw(head + b"Content-Length: 100\r\n\r\n{")
    assert status(slow) == 504 and b"Deadline Exceeded" in slow
    assert time.monotonic() - start < 5


def test_idle_connections_are_closed_and_threads_stay_flat(serve, tmp_path, library):
    """300 idle sockets and 300 half-sent headers: no thread per connection, all closed after
    --rest_api_timeout_in_ms, and the server still answers."""
    library.copy(tmp_path / "tiny", 1)
    server = serve(
        "--model_name",
        "tiny",
        "--model_base_path",
        str(tmp_path / "tiny"),
        "--rest_api_timeout_in_ms",
        "1000",
    )
    c = Client(server)
    assert c.http("/v1/models/tiny")[0] == 200
    threads_before = threading.active_count()
    sockets = []
    for i in range(300):
        s = socket.create_connection(("127.0.0.1", server.rest_port), timeout=10)
        if i % 2:
            s.sendall(b"GET /v1/models/tiny HTTP/1.1\r\nHost: x\r\n")  # never finished
        sockets.append(s)
    assert c.http("/v1/models/tiny")[0] == 200  # served beside them
    assert threading.active_count() <= threads_before + 2
    time.sleep(2.5)
    closed = sum(s.recv(1) == b"" for s in sockets)
    for s in sockets:
        s.close()
    assert closed == len(sockets)
    assert threading.active_count() <= threads_before + 2


def _tensor(shape: list[int], values: list[float] | None = None) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    proto.float_val.extend(values or [1.0])
    return proto


def test_grpc_requests_that_declare_huge_tensors_are_refused_before_allocating(
    serve, tmp_path, library
):
    library.copy(tmp_path / "tiny", 1)
    server = serve(
        "--model_name",
        "tiny",
        "--model_base_path",
        str(tmp_path / "tiny"),
        "--max_request_elements",
        "1000000",
    )
    stub = prediction_service_pb2_grpc.PredictionServiceStub(Client(server).channel)
    rss = psutil.Process().memory_info().rss
    for shape in ([1 << 30, 2], [2**62, 4], [1000, 1001]):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "tiny"
        request.inputs["x"].CopyFrom(_tensor(shape))  # ~20 bytes that would fill gigabytes
        assert len(request.SerializeToString()) < 64
        err = rpc_error(stub.Predict, request, timeout=10)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("tensor parsing error: x (")
        assert "--max_request_elements" in err.details()
    assert psutil.Process().memory_info().rss - rss < 100 << 20
    # Within the cap the same trick is a real tensor, as TensorFlow fills it.
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.inputs["x"].CopyFrom(_tensor([3, 2], [0.5]))
    assert stub.Predict(request, timeout=10).outputs["y"].tensor_shape.dim[0].size == 3
    # Bytes that are no PredictRequest: INTERNAL, as gRPC C++ (proto_utils.h) answers for
    # TF Serving.
    raw = Client(server).channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    err = rpc_error(raw, b"\xff\xff\xff\xff garbage", timeout=10)
    assert err.code() == grpc.StatusCode.INTERNAL


def test_multi_inference_follows_tf_serving_rules(serve, tmp_path, library):
    library.copy(tmp_path / "tiny", 1)
    server = serve("--model_name", "tiny", "--model_base_path", str(tmp_path / "tiny"))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(Client(server).channel)
    # No tasks: the servable of an empty ModelSpec (multi_inference_helper.cc), NOT_FOUND.
    err = rpc_error(stub.MultiInference, inference_pb2.MultiInferenceRequest(), timeout=10)
    assert (err.code(), err.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "Servable not found for request: Latest()",
    )
    request = inference_pb2.MultiInferenceRequest()
    for _ in range(2):
        task = request.tasks.add(method_name="tensorflow/serving/regress")
        task.model_spec.name = "tiny"
        task.model_spec.signature_name = "serving_default"
    err = rpc_error(stub.MultiInference, request, timeout=10)
    assert (err.code(), err.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "Duplicate evaluation of signature: serving_default",
    )
    request.tasks[1].model_spec.name = "other"
    err = rpc_error(stub.MultiInference, request, timeout=10)
    assert "must access the same model name" in err.details()


def _server_process(base: Path, *flags: str, stderr: int = subprocess.DEVNULL):
    """``python -m serving.server`` for model ``tiny`` at ``base``: (process, gRPC, REST port)."""
    port, rest = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.server",
            f"--port={port}",
            f"--rest_api_port={rest}",
            "--model_name=tiny",
            f"--model_base_path={base}",
            *flags,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )
    return proc, port, rest


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


@pytest.mark.slow
def test_soak_large_bodies_give_their_memory_back(tmp_path, library):
    """A bounded soak against a server process: 4 MiB JSON bodies, then small requests; the
    server's RSS comes back down and its thread count stays flat."""
    library.copy(tmp_path / "tiny", 1)
    proc, port, rest = _server_process(tmp_path / "tiny")
    try:
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=120)
        small = json.dumps({"instances": [[1.0, 2.0]]}).encode()
        big = json.dumps({"instances": [[1.0, 2.0]] * 300_000}).encode()  # ~4 MiB

        def post(body: bytes) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", rest, timeout=60)
            conn.request("POST", "/v1/models/tiny:predict", body=body)
            reply = conn.getresponse()
            reply.read()
            conn.close()
            return reply.status

        for _ in range(50):
            assert post(small) == 200
        baseline, threads = _rss_mb(proc.pid), psutil.Process(proc.pid).num_threads()
        peaks = []
        for _ in range(3):
            assert post(big) == 200
            peaks.append(_rss_mb(proc.pid))
        for _ in range(50):
            assert post(small) == 200
        gc.collect()
        after = _rss_mb(proc.pid)
        assert after - baseline < 150, (baseline, peaks, after)
        assert psutil.Process(proc.pid).num_threads() <= threads + 2
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_sigterm_drains_in_flight_grpc_and_rest_requests(tmp_path, library):
    """Requests waiting in a 2-second batch when SIGTERM arrives still get their answers; the
    ports close at once and the process exits 0 inside the grace."""
    library.copy(tmp_path / "tiny", 1)
    params = tmp_path / "batching.config"
    params.write_text(
        "max_batch_size { value: 64 }\nbatch_timeout_micros { value: 2000000 }\n"
        "num_batch_threads { value: 1 }\n"
    )
    proc, port, rest = _server_process(
        tmp_path / "tiny",
        "--enable_batching",
        f"--batching_parameters_file={params}",
        "--drain_grace_seconds=10",
        stderr=subprocess.PIPE,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=120)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "tiny"
        request.inputs["x"].CopyFrom(_tensor([1, 2], [1.0, 2.0]))
        results: dict[str, object] = {}

        def grpc_call():
            try:
                results["grpc"] = stub.Predict(request, timeout=30).model_spec.version.value
            except grpc.RpcError as e:
                results["grpc"] = e.code()

        def rest_call():
            conn = http.client.HTTPConnection("127.0.0.1", rest, timeout=30)
            conn.request("POST", "/v1/models/tiny:predict", body=b'{"instances": [[1.0, 2.0]]}')
            reply = conn.getresponse()
            results["rest"] = (reply.status, json.loads(reply.read()))

        calls = [threading.Thread(target=grpc_call), threading.Thread(target=rest_call)]
        for t in calls:
            t.start()
        time.sleep(0.7)  # both are waiting in the batch now
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection(("127.0.0.1", rest), timeout=2).close()
        for t in calls:
            t.join(timeout=30)
        assert results["grpc"] == 1
        assert results["rest"][0] == 200 and results["rest"][1]["predictions"]
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - start < 10
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert "draining for up to 10s" in (proc.stderr.read() if proc.stderr else "")


def test_the_drain_grace_fits_the_pods_termination_grace():
    """k8s: preStop sleep + --drain_grace_seconds (default) < terminationGracePeriodSeconds, so
    an embedded server started by these manifests would finish before the kubelet's SIGKILL."""
    import yaml

    from serving.server.options import ServerOptions

    deployment = yaml.safe_load((ROOT / "k8s/base/deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "tfserving"]
    sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep + ServerOptions().drain_grace_seconds < pod["terminationGracePeriodSeconds"]
