"""`python -m pipeline run` on scikit-learn's bundled data sets vs a linear reference.

For wine, breast_cancer, diabetes and a synthetic regression whose target has a scale of 1e3,
runs the pipeline with its defaults (tuning budget: ``TUNE_SECONDS``) in a scratch directory and
reads what evaluate wrote: the model's test accuracy (or R²) beside the logistic (or ridge)
regression and the trivial baseline fitted on the same train split and scored on the same
test split. Goal (issue #15): within 1 point of accuracy or 0.05 R² of the linear model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.results import write_section  # noqa: E402

TUNE_SECONDS = int(os.environ.get("BENCH_TUNE_SECONDS", "60"))


def synthetic(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 2000
    x = rng.normal(size=(n, 4))
    color = rng.choice(["red", "green", "blue"], size=n)
    y = 1000 * (2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2] * x[:, 3] + (color == "red")) + 20_000
    y += rng.normal(scale=200, size=n)
    lines = ["x1,x2,x3,x4,color,label"]
    lines += [
        f"{a:.5f},{b:.5f},{c:.5f},{d:.5f},{k},{t:.2f}" for (a, b, c, d), k, t in zip(x, color, y)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(work: Path, name: str, source: Path, task: str) -> dict:
    artifacts = work / name / "artifacts"
    sets = {
        "data.source": f'"{source}"',
        "data.label_column": '"label"',
        "model.name": f'"{name}"',
        "model.task": f'"{task}"',
        "artifacts": f'"{artifacts}"',
        "export.model_base_path": f'"{work / name / "models"}"',
        "tune.time_limit_s": str(TUNE_SECONDS),
        "export.allow_below_baseline": "true",  # measure, do not gate
    }
    empty = work / "empty.toml"
    empty.touch()
    args = ["--config", str(empty), *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    subprocess.run([sys.executable, "-m", "pipeline", "run", "-q", *args], cwd=ROOT, check=True)
    run_id = (artifacts / name / "LATEST").read_text().strip()
    return json.loads((artifacts / name / run_id / "metrics.json").read_text())


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = []
        for dataset, task in (
            ("wine", "multiclass"),
            ("breast_cancer", "binary"),
            ("diabetes", "regression"),
        ):
            out = work / f"{dataset}.csv"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "sample-data",
                    "--dataset",
                    dataset,
                    "--out",
                    str(out),
                ],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            sets.append((dataset, out, task))
        sets.append(("synthetic_1e3", synthetic(work / "synthetic.csv"), "regression"))
        for name, source, task in sets:
            m = run(work, name, source, task)
            key = "r2" if task == "regression" else "accuracy"
            ours, linear = m[key], m["baselines"]["linear"][key]
            trivial = m["baselines"]["trivial"][key]
            goal = 0.05 if key == "r2" else 0.01
            rows.append(
                f"| {name} | {key} | {ours:.3f} | {linear:.3f} | {trivial:.3f} | "
                f"{ours - linear:+.3f} | {'yes' if ours >= linear - goal else '**no**'} |"
            )
            print(rows[-1], flush=True)
    body = (
        f"`python -m pipeline run`, defaults (tuning budget {TUNE_SECONDS} s), test split;\n"
        "linear = logistic/ridge regression on the same train split (evaluate's own baseline).\n\n"
        "| data | metric | pipeline | linear | trivial | pipeline − linear | within goal |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        "Goal: within 1 point of accuracy or 0.05 R² of the linear model.\n"
    )
    write_section("Right answers on bundled data", body)


if __name__ == "__main__":
    main()
