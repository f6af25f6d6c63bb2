"""Multi-worker training on loopback: the median epoch time of two MultiWorkerMirroredStrategy
workers against one worker, same data, same epochs, same global batch (issue #12 asks for the
numbers, no goal: on one 2-core machine the two workers share the cores and add collectives,
so this measures the strategy's overhead rather than a speed-up).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.ingest import make_csv
from bench.results import median, write_section

ROOT = Path(__file__).resolve().parent.parent
ROWS = 20_000
EPOCHS = 6
EPOCH_LINE = re.compile(r"train: epoch (\d+)/\d+ .*\((\d+(?:\.\d+)?)s, ETA")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def epoch_seconds(output: str) -> list[float]:
    """Per-epoch times from the cumulative elapsed times of the epoch lines, first dropped."""
    elapsed = [float(m.group(2)) for m in EPOCH_LINE.finditer(output)]
    return [b - a for a, b in itertools.pairwise(elapsed)]


def main() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_csv(root / "d.csv", ROWS)
        (root / "c.toml").write_text("")
        sets = [
            f'artifacts="{root / "art"}"',
            f'data.source="{root / "d.csv"}"',
            "model.task=binary",
            f"train.epochs={EPOCHS}",
            "train.patience=100",
            "train.batch_size=64",
        ]
        args = ["--config", str(root / "c.toml"), *(a for s in sets for a in ("--set", s))]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

        def pipeline(command: str, extra: dict[str, str] | None = None) -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-m", "pipeline", command, *args],
                cwd=ROOT,
                env=dict(env, **(extra or {})),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )

        assert pipeline("ingest").wait() == 0
        single = pipeline("train").communicate()[0]
        hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
        workers = [
            pipeline(
                "train",
                {
                    "TF_CONFIG": json.dumps(
                        {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
                    )
                },
            )
            for i in range(2)
        ]
        chief, _ = (w.communicate()[0] for w in workers)
    one, two = median(epoch_seconds(single)), median(epoch_seconds(chief))
    body = f"""
Tabular MLP, {ROWS:,} rows (4 numeric + 1 categorical), {EPOCHS} epochs, global batch 64, both
on this machine's cores over loopback; median epoch time over epochs 2–{EPOCHS} (the chief's).

| training | epoch (s) |
|---|---|
| 1 worker | {one:.2f} |
| 2 workers (MultiWorkerMirroredStrategy, TF_CONFIG) | {two:.2f} |

**2 workers / 1 worker: {two / one:.2f}** (reported, no goal: two workers on one 2-core machine
share its cores and add an all-reduce per step; on separate nodes each does half the steps).
"""
    write_section("Multi-worker training", body)
    return {"one": one, "two": two}


if __name__ == "__main__":
    main()
