"""The embedded server against its floors, in one run.

* p50/p99 of a batch-1 Predict over gRPC, vs calling the same SavedModel signature in-process,
  vs an empty gRPC round trip (a bare grpc server echoing bytes). Goal: served p50 ≤ in-process
  p50 + 1.5 × empty-RPC p50.
* Throughput with 32 concurrent clients (grpc.aio), with and without --enable_batching, vs the
  empty-RPC throughput with the same concurrency. Goal: ≥ 0.8x with batching. Two rungs
  between them show where the rest goes: an empty grpc.aio server (the serving core's framework
  alone) and the server with the model call taken out (every other step of a Predict: parse,
  decode, resolve, checks, metrics, response encoding).
* The same over HTTP: REST :predict p50 and 32-client throughput vs an empty HTTP server
  (aiohttp, echoing the body).
* Time from a new version directory appearing to AVAILABLE (default 1 s filesystem poll).

Servers run in their own processes so the client's work does not share their GIL. All of them
start first, then the measurements take turns, round after round, so a neighbour's burst on a
shared machine hits every path alike; ratios are taken within a round, reported as medians.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from bench.results import median, write_section  # noqa: E402
from serving.promote import free_port  # noqa: E402

N_LATENCY = 200
CONCURRENCY = 32
THROUGHPUT_SECONDS = 3.0
ROUNDS = 3
EMPTY_METHOD = "/bench.Empty/Call"
PREDICT = "/tensorflow.serving.PredictionService/Predict"
REST_BODY = b'{"instances": [[1.0, 1.0]]}'

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


AIO_EMPTY_SERVER = """
import asyncio, sys
import grpc
async def echo(req, ctx):  # a coroutine: grpc.aio runs a plain function on a thread pool
    return req
async def main():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Empty", {
        "Call": grpc.unary_unary_rpc_method_handler(echo)}),))
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""

# The embedded server with the model call replaced by its first answer, reused: what a Predict
# costs besides TensorFlow. (A model answering that fast runs on the event loop, as fast models
# do.) argv: port, model base path.
NO_MODEL_SERVER = """
import sys
from serving.server import servable
from serving.server.__main__ import main
real_run = servable.Servable._run
answers = {}
def _run(self, key, sig, feeds, aliases):
    rows = next(iter(feeds.values())).shape[:1]
    if (key, rows) not in answers:
        answers[key, rows] = real_run(self, key, sig, feeds, aliases)
    self.run_seconds = 0.0
    return answers[key, rows]
servable.Servable._run = _run
main(["--port=" + sys.argv[1], "--rest_api_port=0", "--model_name=m",
      "--model_base_path=" + sys.argv[2]])
"""


EMPTY_HTTP_SERVER = """
import sys
from aiohttp import web
async def echo(request):
    return web.Response(body=await request.read(), content_type="application/json")
app = web.Application()
app.router.add_post("/{tail:.*}", echo)
print("ready", flush=True)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def wait_ready(port: int, timeout: float = 120) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=timeout)
    channel.close()


def start_server(base: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [f"--port={port}", "--rest_api_port=0", "--model_name=m", f"--model_base_path={base}"]
    return _started([sys.executable, "-m", "serving.server", *args, *flags], port)


def start_no_model_server(base: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    return _started([sys.executable, "-c", NO_MODEL_SERVER, str(port), str(base)], port)


def _started(cmd: list[str], port: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used; NaN without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cost(proc: subprocess.Popen, run: Callable[[], float]) -> tuple[float, float]:
    """``run()``'s requests/s, and the server's CPU microseconds per request during it."""
    before = process_cpu(proc.pid)
    start = time.perf_counter()
    rate = run()
    cpu = process_cpu(proc.pid) - before
    return rate, cpu / (rate * (time.perf_counter() - start)) * 1e6


def http_latencies(port: int, path: str) -> list[float]:
    """Sequential POSTs of REST_BODY on one keep-alive connection."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}

    def call() -> None:
        conn.request("POST", path, REST_BODY, headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status

    for _ in range(20):
        call()
    out = []
    for _ in range(N_LATENCY):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    conn.close()
    return out


async def _http_throughput(port: int, path: str) -> float:
    import aiohttp

    url = f"http://127.0.0.1:{port}{path}"
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        done = 0
        stop = time.perf_counter() + THROUGHPUT_SECONDS

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with session.post(url, data=REST_BODY, headers=headers) as response:
                    await response.read()
                    assert response.status == 200, response.status
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return done / (time.perf_counter() - start)


def http_throughput(port: int, path: str) -> float:
    return asyncio.run(_http_throughput(port, path))


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


def helper(source: str) -> tuple[subprocess.Popen, int]:
    """A baseline server (``source`` takes its port as argv[1]), once it says ready."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", source, str(port)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc, port


def main() -> None:
    from tests.servables import build

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "m"
        source = build(root / "src", 1)
        shutil.copytree(source, base / "1")
        x = np.ones((1, 2), np.float32)
        payload = predict_request(x)
        params = root / "batching.config"
        params.write_text(
            "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 2000 }\n"
            "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 100 }\n"
        )
        procs = []
        try:
            empty, empty_port = helper(EMPTY_SERVER)
            aio, aio_port = helper(AIO_EMPTY_SERVER)
            no_model, no_model_port = start_no_model_server(base)
            http, http_port = helper(EMPTY_HTTP_SERVER)
            rest_port = free_port()
            served, port = start_server(base, f"--rest_api_port={rest_port}")
            batched, batched_port = start_server(
                base, "--enable_batching", f"--batching_parameters_file={params}"
            )
            procs = [empty, aio, no_model, http, served, batched]
            rest_path = "/v1/models/m:predict"
            lat: dict[str, list[float]] = {
                k: [] for k in ("inproc", "empty", "grpc", "http", "rest")
            }
            tp: dict[str, list[float]] = {
                k: [] for k in ("empty", "aio", "no_model", "plain", "batched", "http", "rest")
            }
            cpu_us: dict[str, list[float]] = {k: [] for k in tp}
            for _ in range(ROUNDS):
                lat["inproc"] += in_process(base / "1", x)
                lat["empty"] += latencies(empty_port, EMPTY_METHOD, payload)
                lat["grpc"] += latencies(port, PREDICT, payload)
                lat["http"] += http_latencies(http_port, rest_path)
                lat["rest"] += http_latencies(rest_port, rest_path)
                runs = {
                    "empty": (empty, lambda: throughput(empty_port, EMPTY_METHOD, payload)),
                    "aio": (aio, lambda: throughput(aio_port, EMPTY_METHOD, payload)),
                    "no_model": (no_model, lambda: throughput(no_model_port, PREDICT, payload)),
                    "plain": (served, lambda: throughput(port, PREDICT, payload)),
                    "batched": (batched, lambda: throughput(batched_port, PREDICT, payload)),
                    "http": (http, lambda: http_throughput(http_port, rest_path)),
                    "rest": (served, lambda: http_throughput(rest_port, rest_path)),
                }
                for key, (proc, run) in runs.items():
                    rate, cost = server_cost(proc, run)
                    tp[key].append(rate)
                    cpu_us[key].append(cost)
            swaps = [time_to_available(base, source, port, v) for v in (2, 3, 4)]
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()

    ms = 1000.0
    p50 = {k: median(v) * ms for k, v in lat.items()}
    p99 = {k: percentile(v, 99) * ms for k, v in lat.items()}
    budget = p50["inproc"] + 1.5 * p50["empty"]
    rest_budget = p50["inproc"] + 1.5 * p50["http"]

    def ratio(key: str, base_key: str) -> float:
        return median([a / b for a, b in zip(tp[key], tp[base_key])])

    def rates(key: str) -> str:
        return ", ".join(f"{r:.0f}" for r in tp[key])

    def cpu(key: str) -> str:
        return f"{median(cpu_us[key]):.0f}"

    body = f"""
Model: a 2-input SavedModel (tests/servables.py), batch 1. {ROUNDS} rounds; in each, every path
in turn: {N_LATENCY} sequential calls, then {THROUGHPUT_SECONDS:.0f} s with {CONCURRENCY} concurrent
clients (grpc.aio; aiohttp over HTTP). Latencies pool the rounds; throughput ratios are taken
within each round, then the median.

| path | p50 (ms) | p99 (ms) |
|---|---|---|
| in-process SavedModel signature | {p50["inproc"]:.3f} | {p99["inproc"]:.3f} |
| empty gRPC round trip | {p50["empty"]:.3f} | {p99["empty"]:.3f} |
| served Predict (gRPC) | {p50["grpc"]:.3f} | {p99["grpc"]:.3f} |
| empty HTTP round trip (aiohttp echo) | {p50["http"]:.3f} | {p99["http"]:.3f} |
| served :predict (REST) | {p50["rest"]:.3f} | {p99["rest"]:.3f} |

**Served p50 {p50["grpc"]:.3f} ms vs budget in-process + 1.5 × empty = {budget:.3f} ms
(ratio {p50["grpc"] / budget:.2f}, goal ≤ 1.00).** REST: {p50["rest"]:.3f} ms vs
{rest_budget:.3f} ms (ratio {p50["rest"] / rest_budget:.2f}).

| throughput, {CONCURRENCY} clients | requests/s (each round) | vs empty (median) | \
server CPU µs/request |
|---|---|---|---|
| empty gRPC round trip | {rates("empty")} | 1.00 | {cpu("empty")} |
| empty grpc.aio server (the serving core's framework) | {rates("aio")} | \
{ratio("aio", "empty"):.2f} | {cpu("aio")} |
| Predict with the model call taken out, no batching | {rates("no_model")} | \
{ratio("no_model", "empty"):.2f} | {cpu("no_model")} |
| Predict, no batching | {rates("plain")} | {ratio("plain", "empty"):.2f} | {cpu("plain")} |
| Predict, --enable_batching (max 32, 2 ms) | {rates("batched")} | \
**{ratio("batched", "empty"):.2f}** (goal ≥ 0.8) | {cpu("batched")} |
| empty HTTP round trip | {rates("http")} | 1.00 | {cpu("http")} |
| REST :predict, no batching | {rates("rest")} | {ratio("rest", "http"):.2f} | {cpu("rest")} |

Where the time goes (median server CPU per request, all of the server's threads): the empty
Python gRPC server {cpu("empty")} µs; grpc.aio with an empty coroutine {cpu("aio")} µs; every
step of a Predict but the model call {cpu("no_model")} µs; with the model, unbatched
{cpu("plain")} µs, batched {cpu("batched")} µs. For 0.8x a batched Predict may cost
{median(cpu_us["empty"]) / 0.8:.0f} µs. The server's Python is one thread holding the GIL
(`bench/profile_server.py --gil`), so every µs above the framework's is throughput lost.

New version directory → AVAILABLE (1 s poll, median of 3): **{median(swaps):.2f} s**
(each: {", ".join(f"{s:.2f}" for s in swaps)}).
"""
    write_section("Server latency and throughput", body)


if __name__ == "__main__":
    main()
