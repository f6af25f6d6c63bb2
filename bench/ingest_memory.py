"""Ingest memory: peak RSS at 1x and 10x the data (goal: 10x within 1.3x of 1x).

Each ingest runs in its own process so its peak RSS is its own. A third process only imports
TensorFlow and the pipeline: the floor every ingest pays whatever the data's size.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results import write_section

ROWS = 20_000

CHILD = """
import resource, sys
from pipeline.config import load_config
from pipeline.ingest import ingest
import tensorflow
if sys.argv[1] != "-":
    open(sys.argv[3], "w").close()
    cfg = load_config(sys.argv[3], [f'data.source="{sys.argv[1]}"', f'artifacts="{sys.argv[2]}"',
                                     "model.task=binary"])
    ingest(cfg)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_csv(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "d", "city", "label"])
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            x = rng.normal(size=(n, 4))
            cities = rng.choice(["paris", "lima", "oslo", "pune", "kobe"], n)
            for row, city in zip(x, cities):
                w.writerow([f"{v:.5f}" for v in row] + [city, "yes" if row[0] > 0 else "no"])


def peak_rss_mb(source: str, artifacts: Path, cfg: Path) -> tuple[float, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, source, str(artifacts), str(cfg)],
        capture_output=True,
        text=True,
        check=True,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
        cwd=Path(__file__).resolve().parent.parent,
    )
    return int(out.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - start


def main() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        floor, _ = peak_rss_mb("-", root / "none", root / "c.toml")
        results = {}
        for scale in (1, 10):
            path = root / f"x{scale}.csv"
            make_csv(path, ROWS * scale)
            rss, secs = peak_rss_mb(str(path), root / f"art{scale}", root / "c.toml")
            results[scale] = (rss, secs)
    ratio = results[10][0] / results[1][0]
    above = (results[10][0] - floor) / max(results[1][0] - floor, 1e-9)
    body = f"""
CSV source (4 numeric + 1 categorical column), {ROWS:,} vs {10 * ROWS:,} rows.

| data | peak RSS (MB) | wall (s) |
|---|---|---|
| import TensorFlow + pipeline only | {floor:.0f} | |
| 1x ({ROWS:,} rows) | {results[1][0]:.0f} | {results[1][1]:.1f} |
| 10x ({10 * ROWS:,} rows) | {results[10][0]:.0f} | {results[10][1]:.1f} |

**10x / 1x peak RSS: {ratio:.2f}** (goal ≤ 1.3). Above the import floor: {above:.2f}x.
"""
    write_section("Ingest memory", body)
    return {"ratio": ratio}


if __name__ == "__main__":
    main()
