"""Artifact names, run directories and atomic file publication.

Everything a stage writes goes through :func:`atomic_write_text` / :func:`atomic_write_bytes`
(temporary file in the same directory, fsync, rename), so a killed process leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

# File names inside a run directory (artifacts/RUN_ID/).
SHARDS = "shards"
STATS = "stats.json"
SCHEMA = "schema.json"
ANOMALIES = "anomalies.json"
LABELS = "labels.txt"
HPARAMS = "hparams.json"
TUNER = "tuner"
TUNER_SUMMARY = "tuning.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
MODEL = "model.keras"
HISTORY = "history.json"
METRICS = "metrics.json"
# The headline keys of metrics.json, in the order reports show them (those a task computes).
METRIC_KEYS = (
    *("loss", "accuracy", "auc", "macro_f1", "precision", "recall", "f1", "threshold"),
    *("mae", "rmse", "r2"),
)
REPORT = "report.md"
RUN_REPORT = "report.html"  # python -m pipeline report
ERRORS = "errors.json"  # the test examples the model gets most wrong (evaluate)
ERROR_GRID = "errors.png"  # and, for images, a picture of them
EXPORTED = "exported.json"
LATEST = "LATEST"  # in the artifacts root: the id of the newest successfully ingested run

# Inside an exported version (models/NAME/VERSION/).
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
MODEL_CARD = "assets.extra/model_card.json"
VERSION_REPORT = "assets.extra/report.html"  # the run's page (pipeline/report.py)
MANIFEST = "assets.extra/MANIFEST.sha256"
SIGNATURE = "assets.extra/MANIFEST.sha256.sig"  # optional, see pipeline/signing.py
LABELS_FILE = "assets/labels.txt"


class PipelineError(RuntimeError):
    """A stage cannot proceed; the message says what is wrong and where."""


def git_commit() -> str | None:
    """The checkout's commit (lineage in model cards and audit records), None outside git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid() % 10000:04d}"


def resolve_run_dir(artifacts: str | Path, run_id: str) -> Path:
    """The run directory a later stage works in: ``run_id`` or the one named by ``LATEST``.

    Raises:
        PipelineError: no run id was given and no ingest has completed yet.
    """
    root = Path(artifacts)
    if not run_id:
        latest = root / LATEST
        if not latest.exists():
            raise PipelineError(
                f"{latest}: no completed ingest found; run `python -m pipeline ingest` first"
            )
        run_id = latest.read_text().strip()
    run_dir = root / run_id
    if not run_dir.is_dir():
        raise PipelineError(f"{run_dir}: run directory does not exist")
    return run_dir


def require(path: Path, stage: str) -> Path:
    """Return ``path`` or explain which stage produces it."""
    if not path.exists():
        raise PipelineError(f"{path}: missing; run `python -m pipeline {stage}` first")
    return path


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory below ``root`` (before renaming it into place)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
