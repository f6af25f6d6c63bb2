"""Train the final model from the best hyperparameters (or the documented defaults).

BackupAndRestore keeps an epoch-level backup in ``RUN/checkpoints/`` so a killed training resumes
where it stopped when rerun; EarlyStopping restores the best weights; TensorBoard logs go to
``RUN/tensorboard/``. With ``train.kfold = k`` a k-fold cross-validation over train+val reports
the mean and spread of the validation metric (the final model is still trained on train).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from pipeline import artifacts as A
from pipeline.config import Config
from pipeline.console import epoch_callback, number
from pipeline.datasets import DataSpec, load_spec, make_dataset
from pipeline.models import build_model, compile_model, model_kind, unfreeze_top

log = logging.getLogger(__name__)


def load_hparams(run_dir: Path) -> tuple[kt.HyperParameters, str]:
    """The tuned hyperparameters, or an empty set (every ``hp.*`` call returns its default)."""
    path = run_dir / A.HPARAMS
    if path.exists():
        return kt.HyperParameters.from_config(A.read_json(path)), "tuned"
    return kt.HyperParameters(), "defaults (tuning skipped)"


def distribution_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored under TF_CONFIG (a training Job), Mirrored on a multi-GPU node,
    else the default (one device)."""
    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief() -> bool:
    """Whether this process writes the results: the only process, the TF_CONFIG "chief", or
    worker 0 when the cluster has no chief (TensorFlow's convention)."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    if not config:
        return True
    task = config.get("task", {})
    if "chief" in config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def _backup_dir(run_dir: Path, hp: kt.HyperParameters, cfg: Config, chief: bool) -> Path:
    """This training's BackupAndRestore directory, named after what it trains (the
    hyperparameters and model settings): a backup left by a killed training of another
    configuration (say, before a new tuning run) would not restore into this model, so it is
    removed with a warning instead of crashing every rerun."""
    import hashlib

    what = json.dumps(
        {"hp": hp.values, "model": repr(cfg.model), "seed": cfg.train.seed}, sort_keys=True
    )
    tag = hashlib.sha256(what.encode()).hexdigest()[:12]
    name = f"backup-{tag}" + ("" if chief else f"-worker-{_task_index()}")
    root = run_dir / A.CHECKPOINTS
    if chief and root.is_dir():
        for stale in root.glob("backup*"):
            if not stale.name.startswith(f"backup-{tag}"):
                log.warning("removing %s: a backup of a training with other hyperparameters", stale)
                shutil.rmtree(stale, ignore_errors=True)
    return root / name


def _task_index() -> int:
    return int(json.loads(os.environ.get("TF_CONFIG") or "{}").get("task", {}).get("index", 0))


def _patch_keras_multi_worker(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Work around keras-team/keras#20329 (open): before the first step, Keras 3 builds the
    model from one batch reduced with ``strategy.reduce`` over the *whole* input structure,
    which MultiWorkerMirroredStrategy cannot do for a dict of features ("Attempt to convert a
    value ({'image': PerReplica...}) ... unsupported type dict"). The build needs only the
    batch's structure and shapes: give it this worker's own first batch (no collective, so
    workers whose batches differ in length, as a short last batch does, cannot clash)."""
    original = model._maybe_symbolic_build

    def local(v: Any) -> Any:
        if isinstance(v, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(v)[0]
        return v

    def build(iterator: Any = None, data_batch: Any = None) -> Any:
        if iterator is not None and data_batch is None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(local, next(it))
                break
        return original(iterator=None, data_batch=data_batch)

    model._maybe_symbolic_build = build
    _reduce_scalar_logs_without_axis()


def _reduce_scalar_logs_without_axis() -> None:
    """Work around keras-team/keras#20585 (open): under MultiWorkerMirroredStrategy, Keras 3
    averages each step's logs with ``strategy.reduce("MEAN", v, axis=0)``, which fails on the
    scalar loss and metrics ("Invalid reduction dimension 0 for input with 0 dimensions").
    Scalars are averaged across replicas instead (axis None); everything else is Keras' own."""
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "scalar_safe", False):
        return

    def reduce_per_replica(values: Any, strategy: Any, reduction: str = "auto") -> Any:
        def scalar(v: Any) -> bool:
            # One replica per worker (CPU) gives plain tensors, several give PerReplica.
            parts = (
                strategy.experimental_local_results(v)
                if isinstance(v, tf.distribute.DistributedValues)
                else [v]
            )
            return all(getattr(t, "shape", None) is not None and t.shape.rank == 0 for t in parts)

        if reduction in ("auto", "mean") and all(scalar(v) for v in tf.nest.flatten(values)):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica.scalar_safe = True  # type: ignore[attr-defined]
    tf_trainer.reduce_per_replica = reduce_per_replica


def train(cfg: Config, extra_callbacks: list[keras.callbacks.Callback] | None = None) -> Path:
    """Train, save ``model.keras`` and ``history.json``; return the model's path."""
    run_dir = A.resolve_run_dir(cfg.model_dir, cfg.run_id)
    spec = load_spec(run_dir)
    hp, origin = load_hparams(run_dir)
    keras.utils.set_random_seed(cfg.train.seed)
    strategy = distribution_strategy()
    with strategy.scope():
        model = build_model(hp, spec, cfg)
    if strategy.extended._in_multi_worker_mode():
        _patch_keras_multi_worker(model, strategy)
    chief = is_chief()
    shown = {k: number(v) for k, v in hp.values.items() if not k.startswith("tuner/")}
    log.info("training %s with %s hyperparameters %s", model.name, origin, shown)
    batch: dict[str, Any] = dict(batch_size=cfg.train.batch_size, cache=cfg.train.cache)
    train_ds = make_dataset(
        spec,
        "train",
        shuffle=True,
        seed=cfg.train.seed,
        shuffle_buffer=cfg.train.shuffle_buffer,
        **batch,
    )
    val_ds = make_dataset(spec, "val", **batch)
    verbose = 0  # epoch_callback prints one line per epoch with its ETA
    # One backup directory per worker (Keras 3's BackupAndRestore has no multi-worker
    # awareness: workers sharing one would overwrite each other's files mid-write). The
    # weights are identical on every worker, so each restores its own copy after a restart.
    backup = _backup_dir(run_dir, hp, cfg, chief)
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.BackupAndRestore(str(backup)),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=cfg.train.patience, restore_best_weights=True
        ),
        keras.callbacks.TensorBoard(
            str(run_dir / A.TENSORBOARD / ("" if chief else f"worker-{os.getpid()}"))
        ),
        epoch_callback(cfg.train.epochs),
        *(extra_callbacks or []),
    ]
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=cfg.train.epochs,
        shuffle=False,
        callbacks=callbacks,
        verbose=verbose,
    ).history
    if model_kind(spec, cfg.model) == "finetune" and cfg.model.fine_tune_epochs:
        history = _fine_tune(model, hp, spec, cfg, train_ds, val_ds, history, run_dir, verbose)

    out = run_dir / A.MODEL
    if not chief:
        # Every worker saves (saving can involve collective ops); only the chief's file stays.
        with tempfile.TemporaryDirectory() as scratch:
            model.save(Path(scratch) / A.MODEL)
        print("train: worker done; the chief saves the model")
        return out
    tmp = run_dir / f".{A.MODEL}.tmp.keras"
    model.save(tmp)
    tmp.replace(out)
    A.write_json(run_dir / A.HISTORY, {k: [float(v) for v in vs] for k, vs in history.items()})
    A.write_json(run_dir / "train.json", {"hyperparameters": hp.values, "origin": origin})
    if cfg.train.kfold:
        A.write_json(run_dir / "kfold.json", cross_validate(cfg, spec, hp))
    shutil.rmtree(run_dir / A.CHECKPOINTS, ignore_errors=True)
    last = {k: round(v[-1], 4) for k, v in history.items()}
    print(f"train: {out} epochs={len(next(iter(history.values()), []))} {last}")
    return out


def _fine_tune(
    model: keras.Model,
    hp: kt.HyperParameters,
    spec: DataSpec,
    cfg: Config,
    train_ds: Any,
    val_ds: Any,
    history: dict[str, list[float]],
    run_dir: Path,
    verbose: int,
) -> dict[str, list[float]]:
    """Phase two: unfreeze the base's top layers and continue at a lower learning rate."""
    layers = unfreeze_top(model, cfg.model.fine_tune_layers)
    lr = hp.get("learning_rate") if "learning_rate" in hp.values else 2e-3
    compile_model(model, spec, lr * cfg.model.fine_tune_lr_factor)
    log.info("fine-tuning the top %d layers at lr=%g", layers, lr * cfg.model.fine_tune_lr_factor)
    start = len(next(iter(history.values()), []))
    more = model.fit(
        train_ds,
        validation_data=val_ds,
        initial_epoch=start,
        shuffle=False,
        epochs=start + cfg.model.fine_tune_epochs,
        verbose=verbose,
        callbacks=[
            keras.callbacks.BackupAndRestore(str(run_dir / A.CHECKPOINTS / "finetune")),
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=cfg.train.patience, restore_best_weights=True
            ),
            epoch_callback(start + cfg.model.fine_tune_epochs, "fine-tune"),
        ],
    ).history
    return {k: list(history.get(k, [])) + list(more.get(k, [])) for k in set(history) | set(more)}


def cross_validate(cfg: Config, spec: DataSpec, hp: kt.HyperParameters) -> dict[str, Any]:
    """k-fold cross-validation over train+val; the metric's mean and standard deviation."""
    k = cfg.train.kfold
    metric = "val_loss" if spec.task == "regression" else "val_accuracy"
    scores = []
    for fold in range(k):
        keras.utils.set_random_seed(cfg.train.seed + fold)
        model = build_model(hp, spec, cfg)
        common: dict[str, Any] = dict(batch_size=cfg.train.batch_size, cache=cfg.train.cache)
        fit_ds = make_dataset(
            spec, "train+val", shuffle=True, seed=cfg.train.seed, fold=(k, fold, False), **common
        )
        held = make_dataset(spec, "train+val", fold=(k, fold, True), **common)
        hist = model.fit(
            fit_ds,
            validation_data=held,
            epochs=cfg.train.epochs,
            verbose=0,
            shuffle=False,
            callbacks=[
                keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=cfg.train.patience, restore_best_weights=True
                )
            ],
        ).history
        best = int(np.argmin(hist["val_loss"]))
        scores.append(float(hist[metric][best]))
        log.info("fold %d/%d: %s=%.4f", fold + 1, k, metric, scores[-1])
    result = {
        "k": k,
        "metric": metric,
        "scores": scores,
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
    }
    print(f"train: {k}-fold {metric} = {result['mean']:.4f} ± {result['std']:.4f}")
    return result
