"""The client against the official route, in one run.

* Encode + decode a mix of small (1x8x8x1) and large (32x224x224x3 float32) tensors, array →
  TensorProto wire bytes → array: serving.wire vs tf.make_tensor_proto + serialization +
  tf.make_ndarray. Goal: ≥ 3x faster overall.
* Import time of ``serving.client`` vs ``tensorflow_serving.apis`` (fresh processes). Goal: ≤ 0.5 s.
* Client-side p50 of a batch-1 Predict: ServingClient vs the raw official stub (request built
  with tf.make_tensor_proto, outputs read with tf.make_ndarray), same server.
"""

from __future__ import annotations

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

import numpy as np  # noqa: E402

from bench.results import median, write_section  # noqa: E402
from bench.server_latency import start_server  # noqa: E402

REPEATS = 7
N_CALLS = 400


def import_time(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    times = []
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return median(times)


def codec_times() -> tuple[float, float]:
    """array → TensorProto wire bytes → array, both ways round: what a client pays per tensor."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    from serving import wire

    rng = np.random.default_rng(0)
    small = [rng.random((1, 8, 8, 1), dtype=np.float32) for _ in range(100)]
    large = [rng.random((32, 224, 224, 3), dtype=np.float32) for _ in range(2)]
    mix = small + large

    def ours() -> None:
        for a in mix:
            wire.decode_tensor(memoryview(wire.encode_tensor(a)))

    def official() -> None:
        for a in mix:
            data = tf.make_tensor_proto(a).SerializeToString()
            tf.make_ndarray(tensor_pb2.TensorProto.FromString(data))

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return median(samples)

    return timed(ours), timed(official)


def predict_p50(port: int) -> tuple[float, float]:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving.client import ServingClient

    x = np.ones((1, 2), np.float32)
    client = ServingClient(f"127.0.0.1:{port}", model="m")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def official() -> None:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "m"
        req.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
        resp = stub.Predict(req, timeout=10)
        {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}

    def ours() -> None:
        client.predict({"x": x})

    results = []
    for fn in (ours, official):
        for _ in range(20):
            fn()
        samples = []
        for _ in range(N_CALLS):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        results.append(median(samples))
    client.close()
    channel.close()
    return results[0], results[1]


def main() -> None:
    from tests.servables import build

    ours_codec, tf_codec = codec_times()
    client_import = import_time("import serving.client")
    official_import = import_time("import tensorflow_serving.apis.prediction_service_pb2_grpc")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "m"
        src = build(Path(tmp) / "src", 1)
        shutil.copytree(src, base / "1")
        server, port = start_server(base)
        try:
            ours_p50, official_p50 = predict_p50(port)
        finally:
            server.terminate()
            server.wait()
    ms = 1000.0
    body = f"""
| measure | ours | official route | ratio |
|---|---|---|---|
| encode+decode, 100 × 1x8x8x1 + 2 × 32x224x224x3 float32 | {ours_codec * ms:.1f} ms | \
{tf_codec * ms:.1f} ms | **{tf_codec / ours_codec:.1f}x faster** (goal ≥ 3x) |
| import time (fresh process) | {client_import:.2f} s (`serving.client`) | \
{official_import:.2f} s (`tensorflow_serving.apis`) | goal ≤ 0.5 s |
| batch-1 Predict p50, client side | {ours_p50 * ms:.3f} ms (ServingClient) | \
{official_p50 * ms:.3f} ms (stub + make_tensor_proto) | {official_p50 / ours_p50:.2f}x |

Medians of {REPEATS} codec passes, 5 imports, {N_CALLS} calls; same server process for both
Predict columns.
"""
    write_section("Client", body)


if __name__ == "__main__":
    main()
