"""The evaluation data and the in-process scoring the quality and infra gates use."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import artifacts as A
from pipeline.config import PromoteConfig
from serving.promote.store import PromotionError

log = logging.getLogger(__name__)


# Metrics where lower is better; every other metric is better when higher.
LOWER_IS_BETTER = {"rmse", "mae", "loss"}


EVALSETS = "evalsets"  # PROD/evalsets/MODEL/vN/{data.npz,meta.json}


@dataclass
class EvalData:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray  # class names (classification) or values (regression)
    task: str
    source: str
    # Set when this is the first promotion's test split, to be frozen into the store at push.
    freeze_from: str = ""


def load_eval_data(
    cfg: PromoteConfig, candidate: Path, model_dir: Path, prod: Path, model: str
) -> EvalData:
    """The data the gates score on: ``promote.eval_data`` (a golden run), else production's
    frozen evaluation set, else (first promotion) the candidate's test split, frozen at push."""
    if not cfg.eval_data:
        frozen = frozen_eval_data(prod, model)
        if frozen is not None:
            return frozen
    card_path = candidate / A.MODEL_CARD
    if not card_path.exists():
        raise PromotionError(f"{card_path}: missing; was this version exported by the pipeline?")
    card = A.read_json(card_path)
    run_dir = Path(cfg.eval_data) if cfg.eval_data else model_dir / card["data"]["run_id"]
    data = _test_split(run_dir, cfg.eval_examples)
    if not cfg.eval_data:
        data.freeze_from = str(run_dir)
        data.source += "; frozen into production at this first promotion"
    return data


def _test_split(run_dir: Path, limit: int) -> EvalData:
    from pipeline.datasets import load_spec, make_dataset, to_numpy

    if not (run_dir / A.SHARDS).is_dir():
        raise PromotionError(
            f"{run_dir}: no shards to evaluate on; set promote.eval_data to a run directory "
            "(its test split is the golden set)"
        )
    spec = load_spec(run_dir)
    x, y = to_numpy(make_dataset(spec, "test", batch_size=256, cache=False))
    n = min(limit, len(y))
    x = {k: v[:n] for k, v in x.items()}
    y = y[:n]
    labels = np.array([spec.classes[int(i)] for i in y]) if spec.classes else y.astype(float)
    return EvalData(x, labels, spec.task, f"{run_dir} (test split, {n} examples)")


def _evalset_dir(prod: Path, model: str) -> Path:
    return prod / EVALSETS / model


def frozen_eval_data(prod: Path, model: str) -> EvalData | None:
    """Production's newest frozen evaluation set for ``model``, verified against its digest."""
    import hashlib

    root = _evalset_dir(prod, model)
    versions = sorted(
        (int(p.name[1:]) for p in root.glob("v*") if p.name[1:].isdigit()), reverse=True
    )
    if not versions:
        return None
    folder = root / f"v{versions[0]}"
    meta = A.read_json(folder / "meta.json")
    raw = (folder / "data.npz").read_bytes()
    if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
        raise PromotionError(
            f"{folder}/data.npz: does not match the SHA-256 in meta.json; the frozen evaluation "
            "set was changed"
        )
    with np.load(folder / "data.npz", allow_pickle=False) as npz:
        inputs = {k[len("x/") :]: npz[k] for k in npz.files if k.startswith("x/")}
        labels = npz["labels"]
    source = (
        f"frozen evaluation set {folder.relative_to(prod)} ({len(labels)} examples from run "
        f"{meta['run']}, sha256 {meta['sha256'][:12]})"
    )
    return EvalData(inputs, labels, meta["task"], source)


def freeze_eval_data(prod: Path, model: str, data: EvalData) -> Path:
    """Write ``data`` as production's evaluation set v1 (atomically; never overwritten)."""
    import hashlib
    import io

    from pipeline.datasets import as_text

    folder = _evalset_dir(prod, model) / "v1"
    if folder.exists():
        return folder
    buffer = io.BytesIO()
    # String inputs are kept as the bytes the model was fed (no pickled objects in the file).
    arrays = {
        f"x/{k}": (v.astype(bytes) if v.dtype == object else v) for k, v in data.inputs.items()
    }
    labels = as_text(data.labels) if data.labels.dtype == object else data.labels
    np.savez_compressed(buffer, labels=labels, **arrays)  # type: ignore[arg-type]
    raw = buffer.getvalue()
    tmp = folder.with_name(f".v1-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "data.npz").write_bytes(raw)
    A.write_json(
        tmp / "meta.json",
        {
            "run": Path(data.freeze_from).name,
            "task": data.task,
            "examples": len(data.labels),
            "sha256": hashlib.sha256(raw).hexdigest(),
        },
    )
    tmp.rename(folder)
    return folder


def class_recalls(version_dir: Path, data: EvalData) -> dict[str, float]:
    """Recall of every class present in the evaluation data (0 for classes the model lacks)."""
    from pipeline.datasets import as_text

    if data.task == "regression":
        return {}
    out = predict_local(version_dir, data.inputs)
    predicted = as_text(out["classes"])
    truth = as_text(data.labels)
    return {str(c): float((predicted[truth == c] == c).mean()) for c in sorted(set(truth.tolist()))}


@functools.lru_cache(maxsize=4)
def _serving_fn(version_dir: Path) -> Any:
    """The version's serving_default, loaded once: the quality and infra gates both call it."""
    import tensorflow as tf

    return tf.saved_model.load(str(version_dir)).signatures["serving_default"]


def predict_local(version_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    fn = _serving_fn(version_dir)
    outs: dict[str, list[np.ndarray]] = {}
    n = len(next(iter(inputs.values())))
    for start in range(0, n, 256):
        batch = {k: tf.constant(v[start : start + 256]) for k, v in inputs.items()}
        for k, v in fn(**batch).items():
            outs.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def model_classes(version_dir: Path) -> list[str]:
    path = version_dir / A.LABELS_FILE
    return path.read_text().splitlines() if path.exists() else []


def score(version_dir: Path, data: EvalData) -> dict[str, float]:
    """Metrics of one version on the evaluation data, computed now."""
    from sklearn.metrics import roc_auc_score

    from pipeline.datasets import as_text

    out = predict_local(version_dir, data.inputs)
    if data.task == "regression":
        pred = out["predictions"].reshape(-1)
        err = pred - data.labels
        ss_tot = float(((data.labels - data.labels.mean()) ** 2).sum())
        return {
            "rmse": float(np.sqrt((err**2).mean())),
            "mae": float(np.abs(err).mean()),
            "r2": 1 - float((err**2).sum()) / ss_tot if ss_tot else 0.0,
        }
    classes = model_classes(version_dir)
    predicted = as_text(out["classes"])
    metrics = {"accuracy": float((predicted == data.labels).mean())}
    probs = out["probabilities"]
    truth = np.array([classes.index(c) if c in classes else -1 for c in data.labels])
    if len(set(truth.tolist())) == len(classes) and (truth >= 0).all() and len(classes) > 1:
        if len(classes) == 2:
            metrics["auc"] = float(roc_auc_score(truth, probs[:, 1]))
        else:
            metrics["auc"] = float(roc_auc_score(truth, probs, multi_class="ovr"))
    return metrics
