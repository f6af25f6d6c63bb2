"""Offline sample data from scikit-learn's bundled datasets.

``digits`` is written as PNG files in one folder per class (the layout of a user's image
folder); ``breast_cancer`` (binary), ``wine`` (multiclass) and ``diabetes`` (regression) as CSV
files with a ``label`` column. Nothing is downloaded.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.artifacts import PipelineError

DATASETS = ("digits", "breast_cancer", "wine", "diabetes")


def write_sample(name: str, out: str | Path) -> Path:
    """Write dataset ``name`` under ``out`` (a folder for digits, a .csv otherwise).

    The output is built next to its destination and renamed into place, so an interrupted run
    never leaves half a dataset behind.
    """
    from sklearn import datasets

    out = Path(out)
    if name not in DATASETS:
        raise PipelineError(f"unknown sample dataset {name!r}; expected one of {DATASETS}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if name == "digits":
        from PIL import Image

        bunch = datasets.load_digits()
        for i, (image, target) in enumerate(zip(bunch.images, bunch.target)):
            folder = tmp / str(target)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    else:
        bunch = getattr(datasets, f"load_{name}")()
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([n.replace(" ", "_") for n in bunch.feature_names] + ["label"])
            for row, target in zip(bunch.data, bunch.target):
                label = f"{target:g}" if name == "diabetes" else str(bunch.target_names[target])
                writer.writerow([f"{v:.6g}" for v in row] + [label])
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    tmp.rename(out)
    return out
