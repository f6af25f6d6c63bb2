"""Where a served Predict spends its time: py-spy over the embedded server under load.

    .venv/bin/python bench/profile_server.py [--batching] [--seconds 10] [--gil] [--native]
                                             [--out profile.txt]

Starts the server (its own process) on the benchmark's model, drives it with 32 concurrent
grpc.aio clients from this process, and records the server with ``py-spy record`` (every
thread, idle samples dropped). Prints the functions with the most samples, own and inclusive:
the list to read before changing the request path. ``--gil`` keeps only the samples of the
thread holding the GIL (the server's ceiling is one core of Python); ``--native`` adds C/C++
frames (grpc's Cython shows as ``Handle._run`` without it), pausing the server to sample it.
Needs py-spy (``pip install py-spy``) and the right to ptrace the server (root in a container,
or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.server_latency import _throughput, predict_request, start_server  # noqa: E402

PREDICT = "/tensorflow.serving.PredictionService/Predict"


def top(collapsed: Path, n: int = 25) -> str:
    """Own and inclusive sample counts per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples", "", "own %  function"]
    lines += [f"{100 * c / total:5.1f}  {f}" for f, c in own.most_common(n)]
    lines += ["", "incl % function"]
    lines += [f"{100 * c / total:5.1f}  {f}" for f, c in inclusive.most_common(n)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batching", action="store_true", help="profile with --enable_batching")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    ap.add_argument("--native", action="store_true", help="C/C++ frames too")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    from tests.servables import build

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "m"
        shutil.copytree(build(root / "src", 1), base / "1")
        flags = []
        if args.batching:
            params = root / "batching.config"
            params.write_text(
                "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 2000 }\n"
                "num_batch_threads { value: 2 }\nmax_enqueued_batches { value: 100 }\n"
            )
            flags = ["--enable_batching", f"--batching_parameters_file={params}"]
        server, port = start_server(base, *flags)
        collapsed = root / "profile.txt"
        try:
            spy = subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--format",
                    "raw",
                    "--threads",
                    "--output",
                    str(collapsed),
                    "--duration",
                    str(int(args.seconds)),
                    *([] if args.native else ["--nonblocking"]),
                    *(["--gil"] if args.gil else []),
                    *(["--native"] if args.native else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            payload = predict_request(np.ones((1, 2), np.float32))
            import bench.server_latency as latency

            latency.THROUGHPUT_SECONDS = args.seconds
            rate = asyncio.run(_throughput(port, PREDICT, payload))
            spy.wait(timeout=60)
        finally:
            server.terminate()
            server.wait()
        report = f"{rate:.0f} requests/s while recording\n" + top(collapsed)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
