"""The embedded server against its floors, in one run.

* p50/p99 of a batch-1 Predict over gRPC, vs calling the same SavedModel signature in-process,
  vs an empty gRPC round trip (a bare grpc server echoing bytes). Goal: served p50 ≤ in-process
  p50 + 1.5 × empty-RPC p50.
* Throughput with 32 concurrent clients (grpc.aio), with and without --enable_batching, vs the
  empty-RPC throughput with the same concurrency. Goal: ≥ 0.8x with batching.
* Time from a new version directory appearing to AVAILABLE (default 1 s filesystem poll).

Servers run in their own processes so the client's work does not share their GIL.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from bench.results import median, write_section  # noqa: E402
from serving.promote import free_port  # noqa: E402

N_LATENCY = 400
CONCURRENCY = 32
THROUGHPUT_SECONDS = 5.0
EMPTY_METHOD = "/bench.Empty/Call"

EMPTY_SERVER = """
import sys, time
from concurrent import futures
import grpc
handler = grpc.method_handlers_generic_handler("bench.Empty", {
    "Call": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})
server = grpc.server(futures.ThreadPoolExecutor(16))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def wait_ready(port: int, timeout: float = 120) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=timeout)
    channel.close()


def start_server(base: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.server",
            f"--port={port}",
            "--rest_api_port=0",
            "--model_name=m",
            f"--model_base_path={base}",
            *flags,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_ready(port)
    return proc, port


def predict_request(x: np.ndarray) -> bytes:
    from tensorflow_serving.apis import predict_pb2

    from serving import codec

    req = predict_pb2.PredictRequest()
    req.model_spec.name = "m"
    from tensorflow.core.framework import tensor_pb2

    req.inputs["x"].CopyFrom(codec.to_tensor_proto(x, tensor_pb2.TensorProto))
    return req.SerializeToString()


def latencies(port: int, method: str, payload: bytes) -> list[float]:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(method)
    for _ in range(20):
        call(payload, timeout=10)
    out = []
    for _ in range(N_LATENCY):
        start = time.perf_counter()
        call(payload, timeout=10)
        out.append(time.perf_counter() - start)
    channel.close()
    return out


async def _throughput(port: int, method: str, payload: bytes) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(method)
        for _ in range(20):
            await call(payload, timeout=10)
        done = 0
        stop = time.perf_counter() + THROUGHPUT_SECONDS

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await call(payload, timeout=30)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return done / (time.perf_counter() - start)


def throughput(port: int, method: str, payload: bytes) -> float:
    return asyncio.run(_throughput(port, method, payload))


def in_process(path: Path, x: np.ndarray) -> list[float]:
    import tensorflow as tf

    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    for _ in range(20):
        fn(x=tf.constant(x))
    out = []
    for _ in range(N_LATENCY):
        start = time.perf_counter()
        fn(x=tf.constant(x))
        out.append(time.perf_counter() - start)
    return out


def time_to_available(base: Path, source: Path, port: int, version: int) -> float:
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    tmp = base / f".tmp-{version}"
    shutil.copytree(source, tmp)
    start = time.perf_counter()
    tmp.rename(base / str(version))
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "m"
    req.model_spec.version.value = version
    while True:
        try:
            status = stub.GetModelStatus(req, timeout=5).model_version_status[0]
            if status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE:
                break
        except grpc.RpcError:
            pass
        time.sleep(0.01)
    channel.close()
    return time.perf_counter() - start


def main() -> None:
    from tests.servables import build

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "m"
        source = build(root / "src", 1)
        shutil.copytree(source, base / "1")
        x = np.ones((1, 2), np.float32)
        payload = predict_request(x)
        inproc = in_process(base / "1", x)

        empty_port = free_port()
        empty = subprocess.Popen(
            [sys.executable, "-c", EMPTY_SERVER, str(empty_port)], stdout=subprocess.PIPE, text=True
        )
        assert empty.stdout is not None
        empty.stdout.readline()
        try:
            empty_lat = latencies(empty_port, EMPTY_METHOD, payload)
            empty_tp = throughput(empty_port, EMPTY_METHOD, payload)
        finally:
            empty.terminate()

        server, port = start_server(base)
        try:
            served = latencies(port, "/tensorflow.serving.PredictionService/Predict", payload)
            plain_tp = throughput(port, "/tensorflow.serving.PredictionService/Predict", payload)
            swaps = [time_to_available(base, source, port, v) for v in (2, 3, 4)]
        finally:
            server.terminate()
            server.wait()

        params = root / "batching.config"
        params.write_text(
            "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 2000 }\n"
            "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 100 }\n"
        )
        server, port = start_server(
            base, "--enable_batching", f"--batching_parameters_file={params}"
        )
        try:
            batched_tp = throughput(port, "/tensorflow.serving.PredictionService/Predict", payload)
        finally:
            server.terminate()
            server.wait()

    ms = 1000.0
    p50_served, p50_inproc, p50_empty = (median(v) * ms for v in (served, inproc, empty_lat))
    budget = p50_inproc + 1.5 * p50_empty
    body = f"""
Model: a 2-input SavedModel (tests/servables.py), batch 1. {N_LATENCY} sequential calls each;
throughput over {THROUGHPUT_SECONDS:.0f} s with {CONCURRENCY} concurrent grpc.aio clients.

| path | p50 (ms) | p99 (ms) |
|---|---|---|
| in-process SavedModel signature | {p50_inproc:.3f} | {percentile(inproc, 99) * ms:.3f} |
| empty gRPC round trip | {p50_empty:.3f} | {percentile(empty_lat, 99) * ms:.3f} |
| served Predict (gRPC) | {p50_served:.3f} | {percentile(served, 99) * ms:.3f} |

**Served p50 {p50_served:.3f} ms vs budget in-process + 1.5 × empty = {budget:.3f} ms
(ratio {p50_served / budget:.2f}, goal ≤ 1.00).**

| throughput, {CONCURRENCY} clients | requests/s | vs empty RPC |
|---|---|---|
| empty gRPC round trip | {empty_tp:.0f} | 1.00 |
| Predict, no batching | {plain_tp:.0f} | {plain_tp / empty_tp:.2f} |
| Predict, --enable_batching (max 32, 2 ms) | {batched_tp:.0f} | **{batched_tp / empty_tp:.2f}** \
(goal ≥ 0.8) |

New version directory → AVAILABLE (1 s poll, median of 3): **{median(swaps):.2f} s**
(each: {", ".join(f"{s:.2f}" for s in swaps)}).
"""
    write_section("Server latency and throughput", body)


if __name__ == "__main__":
    main()
