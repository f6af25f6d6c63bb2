"""Hyperparameter search with keras-tuner (Hyperband by default).

The search lives in ``RUN/tuner/`` and is resumed by a rerun (``overwrite=False``). Its budget is
``tune.max_trials`` trials of at most ``tune.max_epochs`` epochs and ``tune.time_limit_s``
seconds of wall clock: once the clock runs out the current trial stops at the end of its epoch
and no new trial starts. A trial that raises is recorded as failed and the search goes on until
``tune.max_failed_trials`` fail in a row.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt

from pipeline import artifacts as A
from pipeline.artifacts import PipelineError
from pipeline.config import Config
from pipeline.console import duration, number, say
from pipeline.datasets import DataSpec, load_spec, make_dataset
from pipeline.models import build_model

log = logging.getLogger(__name__)

ALGORITHMS: dict[str, type[kt.Tuner]] = {
    "hyperband": kt.Hyperband,
    "random": kt.RandomSearch,
    "bayesian": kt.BayesianOptimization,
}


class DeadlineCallback(keras.callbacks.Callback):
    """Stop training at the end of the epoch in which ``deadline`` (monotonic) has passed."""

    def __init__(self, deadline: float):
        super().__init__()
        self.deadline = deadline

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if time.monotonic() >= self.deadline:
            self.model.stop_training = True


def objective_for(cfg: Config, spec: DataSpec) -> kt.Objective:
    name = cfg.tune.objective or ("val_loss" if spec.task == "regression" else "val_accuracy")
    direction = (
        "min" if "loss" in name or "error" in name or name.endswith(("mae", "rmse")) else "max"
    )
    return kt.Objective(name, direction)


def make_tuner(cfg: Config, spec: DataSpec, directory: Path, deadline: float) -> kt.Tuner:
    """The configured tuner, resuming any search already in ``directory``."""
    base = ALGORITHMS[cfg.tune.algorithm]

    class BudgetedTuner(base):  # type: ignore[valid-type,misc]
        def pre_create_trial(self) -> None:
            # The oracle stops handing out trials once len(trials) >= max_trials. A
            # distributed worker holds only a client of the chief's oracle: the chief
            # enforces the deadline there (enforce_deadline).
            if not _is_worker() and time.monotonic() >= deadline:
                self.oracle.max_trials = max(len(self.oracle.trials), 1)
            super().pre_create_trial()

        def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().run_trial(trial, *args, **kwargs)
            except kt.errors.FatalError:
                raise
            except Exception as e:
                log.warning("trial %s failed: %s", trial.trial_id, e)
                raise kt.errors.FailedTrialError(f"{type(e).__name__}: {e}") from e

    kwargs: dict[str, Any] = dict(
        hypermodel=lambda hp: build_model(hp, spec, cfg),
        objective=objective_for(cfg, spec),
        directory=str(directory),
        project_name=cfg.model.name,
        overwrite=False,
        seed=cfg.train.seed,
        max_consecutive_failed_trials=cfg.tune.max_failed_trials,
    )
    if cfg.tune.algorithm == "hyperband":
        kwargs.update(max_epochs=cfg.tune.max_epochs, factor=3, hyperband_iterations=1)
    else:
        kwargs.update(max_trials=cfg.tune.max_trials)
    tuner = BudgetedTuner(**kwargs)
    # A resumed oracle keeps its saved state; the budget is this config's.
    tuner.oracle.max_trials = cfg.tune.max_trials
    return tuner


def tune(cfg: Config, extra_callbacks: list[keras.callbacks.Callback] | None = None) -> Path:
    """Run (or resume) the search and write ``hparams.json`` and ``tuning.json``.

    Returns:
        The path of ``hparams.json``.

    Raises:
        PipelineError: too many trials failed in a row, or none completed.
    """
    run_dir = A.resolve_run_dir(cfg.model_dir, cfg.run_id)
    spec = load_spec(run_dir)
    keras.utils.set_random_seed(cfg.train.seed)
    start = time.monotonic()
    deadline = start + cfg.tune.time_limit_s
    batch: dict[str, Any] = dict(batch_size=cfg.train.batch_size, cache=cfg.train.cache)
    train_ds = make_dataset(spec, "train", shuffle=True, seed=cfg.train.seed, **batch)
    val_ds = make_dataset(spec, "val", **batch)
    tuner = make_tuner(cfg, spec, run_dir / A.TUNER, deadline)
    objective = tuner.oracle.objective.name
    trial_progress(tuner, cfg.tune.max_trials, start, cfg.tune.time_limit_s)
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=objective, patience=cfg.tune.patience),
        DeadlineCallback(deadline),
        *(extra_callbacks or []),
    ]
    log.info(
        "tuning with %s: up to %d trials, %d epochs each, %.0f s",
        cfg.tune.algorithm,
        cfg.tune.max_trials,
        cfg.tune.max_epochs,
        cfg.tune.time_limit_s,
    )
    if _is_worker():
        return _work_for_chief(tuner, train_ds, val_ds, cfg, callbacks, run_dir)
    if os.environ.get("KERASTUNER_TUNER_ID") == "chief":
        # The chief only serves the oracle; it ends when every worker has been told to stop,
        # or a grace after the deadline whatever the workers do (a killed worker never asks).
        serve_oracle(tuner, deadline, grace=max(30.0, cfg.tune.time_limit_s * 0.25))
    try:
        if os.environ.get("KERASTUNER_TUNER_ID") != "chief":
            tuner.search(
                train_ds,
                validation_data=val_ds,
                epochs=cfg.tune.max_epochs,
                shuffle=False,  # the dataset shuffles itself
                callbacks=callbacks,
                verbose=0,  # one line per trial instead (trial_progress)
            )
    except RuntimeError as e:
        if "consecutive failures" in str(e):
            raise PipelineError(
                f"tuning stopped: {cfg.tune.max_failed_trials} trials failed in a row "
                f"(tune.max_failed_trials); first lines of the last error:\n"
                + "\n".join(str(e).splitlines()[:3])
            ) from e
        raise
    trials = summarize(tuner)
    completed = [t for t in trials if t["status"] == "COMPLETED" and t["score"] is not None]
    if not completed:
        raise PipelineError(
            f"tuning finished with no completed trial ({len(trials)} trials); "
            f"see {run_dir / A.TUNER}"
        )
    best = tuner.get_best_hyperparameters(1)[0]
    path = run_dir / A.HPARAMS
    A.write_json(path, best.get_config())
    A.write_json(
        run_dir / A.TUNER_SUMMARY,
        {
            "algorithm": cfg.tune.algorithm,
            "objective": {"name": objective, "direction": tuner.oracle.objective.direction},
            "seconds": round(time.monotonic() - start, 1),
            "best": best.values,
            "trials": trials,
        },
    )
    print_summary(trials, objective, best.values)
    return path


def _is_worker() -> bool:
    """A worker of a distributed search (KERASTUNER_TUNER_ID set, not the chief)."""
    return os.environ.get("KERASTUNER_TUNER_ID", "chief") != "chief"


def _work_for_chief(
    tuner: kt.Tuner, train_ds: Any, val_ds: Any, cfg: Config, callbacks: list[Any], run_dir: Path
) -> Path:
    """Run the trials the chief hands out until it says stop (exit 0), or until it is gone:
    a chief that ended at its deadline is a finished search, not a failure."""
    import grpc

    name = os.environ["KERASTUNER_TUNER_ID"]
    try:
        tuner.search(
            train_ds,
            validation_data=val_ds,
            epochs=cfg.tune.max_epochs,
            shuffle=False,
            callbacks=callbacks,
            verbose=0,
        )
    except grpc.RpcError as e:
        if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            raise
        say(f"tune: worker {name}: the chief's oracle is gone ({e.code().name}); stopping")
    print(f"tune: worker {name} done")
    return run_dir / A.HPARAMS


def serve_oracle(tuner: kt.Tuner, deadline: float, grace: float) -> None:
    """The chief's side of a distributed search: keras-tuner's oracle service, with the
    deadline enforced on every worker's trial request, and an end that does not wait for
    workers that died (keras-tuner's own loop waits for each to ask once more, forever)."""
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    oracle = tuner.oracle
    oracle.verbose = 0  # keras-tuner's per-trial tables; the workers print one line each
    create_trial = oracle.create_trial

    def create_trial_within_budget(tuner_id: str) -> Any:
        if time.monotonic() >= deadline:
            oracle.max_trials = max(len(oracle.trials), 1)
        return create_trial(tuner_id)

    oracle.create_trial = create_trial_within_budget
    tuner.save()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    if not server.add_insecure_port(address):
        raise PipelineError(f"tune: the chief cannot listen on {address}")
    server.start()
    say(f"tune: chief serving the oracle on {address}")
    try:
        while True:
            time.sleep(0.5)
            if servicer.stop_triggered and oracle_chief.exit_chief(oracle):
                break
            if time.monotonic() >= deadline + grace:
                say(f"tune: chief: {len(oracle.tuner_ids)} worker(s) silent past the deadline")
                break
    finally:
        server.stop(grace=2)
        oracle.create_trial = create_trial
        oracle.max_trials = max(len(oracle.trials), 1)  # the chief's own search ends at once


def summarize(tuner: kt.Tuner) -> list[dict[str, Any]]:
    out = []
    for trial in tuner.oracle.trials.values():
        out.append(
            {
                "trial_id": trial.trial_id,
                "status": trial.status,
                "score": None if trial.score is None else float(trial.score),
                "hyperparameters": trial.hyperparameters.values,
                "error": (trial.message or "").strip().splitlines()[-1:] or None,
            }
        )
    return sorted(out, key=lambda t: t["trial_id"])


def print_summary(trials: list[dict[str, Any]], objective: str, best: dict[str, Any]) -> None:
    done = [t for t in trials if t["score"] is not None]
    failed = [t for t in trials if t["status"] in ("FAILED", "INVALID")]
    print(f"tune: {len(trials)} trials, {len(done)} scored, {len(failed)} failed")
    ranked = sorted(done, key=lambda t: t["score"], reverse="loss" not in objective)
    for t in ranked[:5]:
        print(f"  trial {t['trial_id']}: {objective}={t['score']:.4f} {_hp(t['hyperparameters'])}")
    print(f"tune: best {_hp(best)}")


def _hp(values: dict[str, Any]) -> str:
    shown = (f"{k}: {number(v)}" for k, v in values.items() if not k.startswith("tuner/"))
    return "{" + ", ".join(shown) + "}"


def trial_progress(tuner: kt.Tuner, max_trials: int, start: float, budget: float) -> None:
    """One line per finished trial: its number, score, the best so far, elapsed/budget.

    Works on a distributed worker too: the best comes from the chief's oracle.
    """
    finished = tuner.on_trial_end
    objective = tuner.oracle.objective

    def on_trial_end(trial: Any) -> None:
        finished(trial)
        if _is_worker():  # the chief's oracle holds the score
            trial = tuner.oracle.get_trial(trial.trial_id)
        best_trials = tuner.oracle.get_best_trials(1)
        best = best_trials[0].score if best_trials else None
        score = "failed" if trial.score is None else number(float(trial.score))
        who = "" if not _is_worker() else f" (worker {os.environ['KERASTUNER_TUNER_ID']})"
        say(
            f"tune: trial {int(trial.trial_id) + 1}/{max_trials}{who} {objective.name}={score} "
            f"best={number(best) if best is not None else '-'} "
            f"({duration(time.monotonic() - start)} of {duration(budget)})"
        )

    tuner.on_trial_end = on_trial_end
