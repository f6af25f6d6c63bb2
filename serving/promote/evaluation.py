"""The evaluation data and the in-process scoring the quality and infra gates use."""

from __future__ import annotations

import functools
import logging
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


@dataclass
class EvalData:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray  # class names (classification) or values (regression)
    task: str
    source: str


def load_eval_data(cfg: PromoteConfig, candidate: Path, artifacts: str) -> EvalData:
    from pipeline.datasets import load_spec, make_dataset, to_numpy

    card_path = candidate / A.MODEL_CARD
    if not card_path.exists():
        raise PromotionError(f"{card_path}: missing; was this version exported by the pipeline?")
    card = A.read_json(card_path)
    run_dir = Path(cfg.eval_data) if cfg.eval_data else Path(artifacts) / card["data"]["run_id"]
    if not (run_dir / A.SHARDS).is_dir():
        raise PromotionError(
            f"{run_dir}: no shards to evaluate on; set promote.eval_data to a run directory "
            "(its test split is the golden set)"
        )
    spec = load_spec(run_dir)
    x, y = to_numpy(make_dataset(spec, "test", batch_size=256, cache=False))
    n = min(cfg.eval_examples, len(y))
    x = {k: v[:n] for k, v in x.items()}
    y = y[:n]
    labels = np.array([spec.classes[int(i)] for i in y]) if spec.classes else y.astype(float)
    return EvalData(x, labels, spec.task, f"{run_dir} (test split, {n} examples)")


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
    predicted = np.array([c.decode() if isinstance(c, bytes) else str(c) for c in out["classes"]])
    metrics = {"accuracy": float((predicted == data.labels).mean())}
    probs = out["probabilities"]
    truth = np.array([classes.index(c) if c in classes else -1 for c in data.labels])
    if len(set(truth.tolist())) == len(classes) and (truth >= 0).all() and len(classes) > 1:
        if len(classes) == 2:
            metrics["auc"] = float(roc_auc_score(truth, probs[:, 1]))
        else:
            metrics["auc"] = float(roc_auc_score(truth, probs, multi_class="ovr"))
    return metrics
