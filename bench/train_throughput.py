"""Training throughput: the pipeline's tf.data over shards vs a bare model.fit on numpy arrays.

Same model, same batch size, same data, one process: the median epoch time of each (the first
epoch, which fills the cache and traces the graph, is dropped). Goal: ratio ≤ 1.10.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras
import keras_tuner as kt

from bench.ingest import make_csv
from bench.results import median, write_section
from pipeline.config import load_config
from pipeline.datasets import load_spec, make_dataset, to_numpy
from pipeline.ingest import ingest
from pipeline.models import build_model
from pipeline.sample_data import write_sample

EPOCHS = 8
BATCH = 64


class EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def epoch_time(cfg, spec, data) -> float:
    keras.utils.set_random_seed(0)
    model = build_model(kt.HyperParameters(), spec, cfg)
    timer = EpochTimer()
    if isinstance(data, tuple):
        x, y = data
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True, verbose=0, callbacks=[timer])
    else:
        model.fit(data, epochs=EPOCHS, verbose=0, callbacks=[timer])
    return median(timer.times[1:])


def measure(name: str, source: Path, root: Path, task: str) -> tuple[str, float, float]:
    (root / "c.toml").write_text("")
    cfg = load_config(
        root / "c.toml",
        [
            f'data.source="{source}"',
            f'artifacts="{root / name}"',
            f"model.task={task}",
            f"train.batch_size={BATCH}",
        ],
    )
    result = ingest(cfg)
    spec = load_spec(result.run_dir)
    ours = make_dataset(spec, "train", batch_size=BATCH, shuffle=True, seed=0)
    x, y = to_numpy(make_dataset(spec, "train", batch_size=1024, cache=False))
    baseline = epoch_time(cfg, spec, (x, y))
    pipeline = epoch_time(cfg, spec, ours)
    return name, pipeline, baseline


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        digits = write_sample("digits", root / "digits")
        rows.append(measure("digits CNN (8x8 images)", digits, root, "multiclass"))
        table = root / "t.csv"
        make_csv(table, 50_000)
        num = root / "num.csv"
        # numpy model.fit cannot take string columns: compare on the numeric columns only
        with open(table) as src, open(num, "w") as dst:
            for line in src:
                parts = line.rstrip("\n").split(",")
                dst.write(",".join(parts[:4] + parts[5:]) + "\n")
        rows.append(measure("tabular MLP (50k rows, 4 numeric)", num, root, "binary"))
    lines = [
        "| model | pipeline epoch (s) | numpy model.fit epoch (s) | ratio |",
        "|---|---|---|---|",
    ]
    for name, ours, base in rows:
        lines.append(f"| {name} | {ours:.3f} | {base:.3f} | **{ours / base:.2f}** |")
    body = (
        f"Median epoch time over epochs 2–{EPOCHS}, batch {BATCH}, same model and data. "
        "Goal: ratio ≤ 1.10.\n\n" + "\n".join(lines)
    )
    write_section("Training throughput", body)


if __name__ == "__main__":
    main()
