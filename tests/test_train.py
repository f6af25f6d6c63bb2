"""Models, tuning, training and evaluation on tiny seeded data."""

from __future__ import annotations

import json
import re

import keras
import keras_tuner as kt
import numpy as np
import pytest

from pipeline import tune as tune_module
from pipeline.artifacts import PipelineError
from pipeline.datasets import load_spec, make_dataset
from pipeline.evaluate import choose_threshold, evaluate, regression_metrics
from pipeline.ingest import ingest
from pipeline.models import build_model
from pipeline.train import train
from pipeline.tune import tune
from tests.conftest import config, make_images, tabular_rows, write_csv


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image")
    root = make_images(tmp / "imgs", per_class=20, size=8)
    cfg = config(tmp, f'data.source="{root}"')
    ingest(cfg)
    return tmp, cfg


@pytest.fixture(scope="module")
def csv_runs(tmp_path_factory):
    out = {}
    for task in ("binary", "regression"):
        tmp = tmp_path_factory.mktemp(task)
        path = write_csv(
            tmp / "d.csv", ["x1", "x2", "color", "label"], tabular_rows(160, task=task)
        )
        cfg = config(tmp, f'data.source="{path}"', f"model.task={task}")
        ingest(cfg)
        out[task] = (tmp, cfg)
    return out


def _train_one_epoch(cfg, run_dir):
    spec = load_spec(run_dir)
    model = build_model(kt.HyperParameters(), spec, cfg)
    ds = make_dataset(spec, "train", batch_size=8, shuffle=True)
    hist = model.fit(ds, epochs=1, verbose=0).history
    assert np.isfinite(hist["loss"][0])
    return spec, model


def _run_dir(cfg):
    from pipeline.artifacts import resolve_run_dir

    return resolve_run_dir(cfg.model_dir, cfg.run_id)


def test_cnn_builds_and_trains(image_run):
    _, cfg = image_run
    spec, model = _train_one_epoch(cfg, _run_dir(cfg))
    assert model.output_shape == (None, 2)
    assert any(isinstance(l, keras.layers.Rescaling) for l in model.layers)


def test_augmentation_layers_only_in_training(image_run):
    _, cfg = image_run
    from dataclasses import replace

    aug = replace(cfg.model.augment, flip="horizontal", rotation=0.1, zoom=0.1, contrast=0.1)
    cfg2 = replace(cfg, model=replace(cfg.model, augment=aug))
    spec = load_spec(_run_dir(cfg))
    model = build_model(kt.HyperParameters(), spec, cfg2)
    x = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 1)).astype("float32")
    a = model({"image": x}, training=False).numpy()
    b = model({"image": x}, training=False).numpy()
    np.testing.assert_allclose(a, b)  # inference is deterministic: augmentation is off


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_mlp_builds_and_trains(csv_runs, task):
    _, cfg = csv_runs[task]
    spec, model = _train_one_epoch(cfg, _run_dir(cfg))
    assert set(model.input) == {"x1", "x2", "color"}
    # Preprocessing is inside the model: it takes raw values, strings included.
    out = model({"x1": np.array([0.5]), "x2": np.array([-1.0]), "color": np.array(["red"])}).numpy()
    assert out.shape == (1, 1)


def test_vector_mlp(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    np.savez(tmp_path / "d.npz", x=x, y=(x[:, 0] > 0).astype(int))
    cfg = config(tmp_path, f'data.source="{tmp_path / "d.npz"}"')
    ingest(cfg)
    spec, model = _train_one_epoch(cfg, _run_dir(cfg))
    assert model.output_shape == (None, 2)


def test_finetune_from_keras_file(image_run, tmp_path):
    tmp, cfg = image_run
    spec = load_spec(_run_dir(cfg))
    base = build_model(kt.HyperParameters(), spec, cfg)
    base.save(tmp_path / "base.keras")
    ft = config(
        tmp,
        "model.kind=finetune",
        f'model.base_model="{tmp_path / "base.keras"}"',
        "model.fine_tune_epochs=1",
        f'artifacts="{cfg.artifacts}"',
    )
    model = build_model(kt.HyperParameters(), spec, ft)
    frozen = next(l for l in model.layers if isinstance(l, keras.Model))
    assert not frozen.trainable
    path = train(ft)
    history = json.loads((path.parent / "history.json").read_text())
    assert len(history["loss"]) == ft.train.epochs + 1  # phase one + one fine-tuning epoch


def test_finetune_keras_application_with_local_weights(tmp_path):
    root = make_images(tmp_path / "imgs", per_class=8, size=32)
    weights = tmp_path / "mobilenet.weights.h5"
    keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg"
    ).save_weights(weights)
    cfg = config(
        tmp_path,
        f'data.source="{root}"',
        "data.image_size=[32,32]",
        "model.kind=finetune",
        "model.base_model=MobileNetV2",
        f'model.base_weights="{weights}"',
        "train.epochs=1",
        "model.fine_tune_epochs=1",
        "model.fine_tune_layers=5",
    )
    ingest(cfg)
    path = train(cfg)
    assert keras.models.load_model(path).output_shape == (None, 2)


def test_finetune_errors(image_run):
    tmp, cfg = image_run
    spec = load_spec(_run_dir(cfg))
    bad = config(tmp, "model.kind=finetune", "model.base_model=NoSuchNet")
    with pytest.raises(PipelineError, match="keras.applications"):
        build_model(kt.HyperParameters(), spec, bad)
    missing = config(
        tmp,
        "model.kind=finetune",
        "model.base_model=MobileNetV2",
        'model.base_weights="/nonexistent.h5"',
    )
    with pytest.raises(PipelineError, match="does not exist"):
        build_model(kt.HyperParameters(), spec, missing)


def test_tuning_writes_hparams_and_resumes(tmp_path):
    root = make_images(tmp_path / "imgs", per_class=12)
    cfg = config(
        tmp_path,
        f'data.source="{root}"',
        "tune.algorithm=random",
        "tune.max_trials=2",
        "tune.max_epochs=1",
        "run_id=r",
    )
    ingest(cfg)
    path = tune(cfg)
    hp = kt.HyperParameters.from_config(json.loads(path.read_text()))
    assert "learning_rate" in hp.values
    first = json.loads((path.parent / "tuning.json").read_text())["trials"]
    assert len(first) == 2
    more = config(
        tmp_path,
        f'data.source="{root}"',
        "tune.algorithm=random",
        "tune.max_trials=3",
        "tune.max_epochs=1",
        "run_id=r",
    )
    tune(more)
    trials = json.loads((path.parent / "tuning.json").read_text())["trials"]
    assert len(trials) == 3  # the two finished trials were kept, one new trial ran
    assert [t["score"] for t in trials[:2]] == [t["score"] for t in first]


def test_hyperband_and_time_limit(tmp_path):
    root = make_images(tmp_path / "imgs", per_class=10)
    cfg = config(
        tmp_path,
        f'data.source="{root}"',
        "tune.max_trials=6",
        "tune.max_epochs=2",
        "tune.time_limit_s=0.001",
    )
    ingest(cfg)
    path = tune(cfg)
    trials = json.loads((path.parent / "tuning.json").read_text())["trials"]
    assert len(trials) == 1  # the clock ran out during the first trial


def test_failed_trials_are_recorded_then_stop(tmp_path, monkeypatch):
    root = make_images(tmp_path / "imgs", per_class=10)
    cfg = config(
        tmp_path,
        f'data.source="{root}"',
        "tune.algorithm=random",
        "tune.max_trials=4",
        "tune.max_epochs=1",
        "tune.max_failed_trials=2",
    )
    ingest(cfg)
    real = tune_module.build_model
    calls = {"n": 0}

    def flaky(hp, spec, c):
        calls["n"] += 1
        if calls["n"] == 2:  # call 1 only collects the search space; call 2 is trial 0
            raise ValueError("boom")
        return real(hp, spec, c)

    monkeypatch.setattr(tune_module, "build_model", flaky)
    path = tune(cfg)
    trials = json.loads((path.parent / "tuning.json").read_text())["trials"]
    assert [t["status"] for t in trials].count("FAILED") == 1
    assert len(trials) == 4

    def broken(hp, spec, c):
        calls["n"] += 1
        if calls["n"] > 101:  # after the search-space call
            raise ValueError("always broken")
        return real(hp, spec, c)

    calls["n"] = 100
    monkeypatch.setattr(tune_module, "build_model", broken)
    cfg2 = config(
        tmp_path / "b",
        f'data.source="{root}"',
        "tune.algorithm=random",
        "tune.max_trials=5",
        "tune.max_epochs=1",
        "tune.max_failed_trials=2",
    )
    ingest(cfg2)
    with pytest.raises(PipelineError, match="2 trials failed in a row"):
        tune(cfg2)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")


def test_training_resumes_after_interruption(tmp_path):
    root = make_images(tmp_path / "imgs", per_class=10)
    cfg = config(tmp_path, f'data.source="{root}"', "train.epochs=5", "train.patience=10")
    ingest(cfg)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, extra_callbacks=[_Interrupt()])
    run_dir = _run_dir(cfg)
    assert len(list((run_dir / "checkpoints").glob("backup-*"))) == 1
    assert not (run_dir / "model.keras").exists()
    train(cfg)
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["loss"]) == 3  # epochs 3..5: the first two were restored, not redone
    assert not (run_dir / "checkpoints").exists()


def test_a_backup_of_other_hyperparameters_is_replaced_not_fatal(tmp_path, caplog):
    """Killed training, then a tuning run that picked other hyperparameters: the rerun removes
    the stale backup with a warning and trains from the start (it used to crash every rerun)."""
    root = make_images(tmp_path / "imgs", per_class=10)
    cfg = config(tmp_path, f'data.source="{root}"', "train.epochs=3", "train.patience=10")
    ingest(cfg)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, extra_callbacks=[_Interrupt()])
    run_dir = _run_dir(cfg)
    (stale,) = (run_dir / "checkpoints").glob("backup-*")
    hp = kt.HyperParameters()
    hp.Fixed("filters", 16)
    hp.Fixed("conv_blocks", 1)
    (run_dir / "hparams.json").write_text(json.dumps(hp.get_config()))
    train(cfg)
    assert "a backup of a training with other hyperparameters" in caplog.text
    assert len(json.loads((run_dir / "history.json").read_text())["loss"]) == 3


def test_training_is_reproducible(tmp_path):
    root = make_images(tmp_path / "imgs", per_class=10)
    losses = []
    for run in ("a", "b"):
        cfg = config(tmp_path, f'data.source="{root}"', f"run_id={run}", "train.epochs=2")
        ingest(cfg)
        train(cfg)
        losses.append(json.loads((_run_dir(cfg) / "history.json").read_text())["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_kfold_reports_mean_and_spread(csv_runs):
    tmp, cfg = csv_runs["binary"]
    cfg3 = config(
        tmp,
        f'data.source="{cfg.data.source}"',
        "model.task=binary",
        "train.kfold=3",
        f'run_id="{_run_dir(cfg).name}"',
    )
    train(cfg3)
    result = json.loads((_run_dir(cfg3) / "kfold.json").read_text())
    assert result["k"] == 3 and len(result["scores"]) == 3
    assert 0 <= result["mean"] <= 1 and result["std"] >= 0


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_evaluate_writes_metrics_report_and_plots(csv_runs, task):
    _, cfg = csv_runs[task]
    train(cfg)
    metrics = evaluate(cfg)
    run_dir = _run_dir(cfg)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["examples"] == metrics["examples"] > 0
    assert (run_dir / "report.md").read_text().startswith("# Evaluation report")
    assert (run_dir / "learning_curves.png").stat().st_size > 0
    if task == "binary":
        assert {"auc", "precision", "recall", "threshold", "confusion_matrix"} <= set(saved)
        assert (run_dir / "pr_curve.png").exists() and (run_dir / "confusion_matrix.png").exists()
    else:
        assert {"mae", "rmse", "r2"} <= set(saved)
    assert saved["diagnosis"]["verdict"] in {
        "good fit",
        "overfitting",
        "underfitting",
        "still improving",
        "worse than baseline",
    }
    assert {"trivial", "linear"} <= set(saved["baselines"])


def test_regression_metrics_on_fixed_numbers():
    m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 4.0, 2.0]))
    assert m["mae"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx(np.sqrt(5 / 4))
    assert m["r2"] == pytest.approx(1 - 5 / 5)


def test_threshold_for_target_precision_and_recall():
    y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9])
    t, how = choose_threshold(y, s, 1.0, 0.0)
    assert t == pytest.approx(0.6) and "precision" in how  # first threshold with no false positive
    t, how = choose_threshold(y, s, 0.0, 1.0)
    assert t == pytest.approx(0.45)  # lowest positive score keeps recall 1 at best precision
    t, how = choose_threshold(y, s, 0.0, 0.0)
    assert how == "best F1" and t == pytest.approx(0.45)  # F1 10/11 beats 0.6's 8/9
    assert choose_threshold(np.ones(4), s[:4], 0.0, 0.0)[0] == 0.5


def _cli(tmp_path, rows, *sets):
    """A tabular project driven through ``python -m pipeline`` processes, as the k8s Jobs run
    it: returns ``launch(command, **env)`` → Popen (output on ``stdout``)."""
    import os
    import subprocess
    import sys

    data = write_csv(tmp_path / "d.csv", ["x1", "x2", "color", "label"], tabular_rows(rows))
    (tmp_path / "c.toml").write_text("")
    every = [f'artifacts="{tmp_path / "art"}"', "model.name=m", f'data.source="{data}"', *sets]
    args = ["--config", str(tmp_path / "c.toml"), *(a for s in every for a in ("--set", s))]

    def launch(command, **env):
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", command, *args],
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    return launch


def _latest_run(tmp_path):
    return tmp_path / "art" / "m" / (tmp_path / "art" / "m" / "LATEST").read_text().strip()


@pytest.mark.slow
def test_two_workers_train_like_one(tmp_path):
    """Two real worker processes on loopback, started as k8s/jobs/training.yaml starts them
    (TF_CONFIG, MultiWorkerMirroredStrategy, dict features): both finish, only the chief
    writes, each worker kept its own backup directory, and the chief's model scores within
    0.1 accuracy of the same training on one worker (same data, epochs, global batch)."""
    from tests.conftest import free_port

    pipeline = _cli(tmp_path, 300, 'model.task="binary"', "train.epochs=8", "train.batch_size=32")
    assert pipeline("ingest").wait(timeout=300) == 0
    run = _latest_run(tmp_path)
    single = pipeline("train")
    single_out = single.communicate(timeout=300)[0]
    assert single.returncode == 0, single_out[-3000:]
    assert pipeline("evaluate").wait(timeout=300) == 0
    single_accuracy = json.loads((run / "metrics.json").read_text())["accuracy"]
    (run / "model.keras").unlink()

    hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    workers = [
        pipeline(
            "train",
            TF_CONFIG=json.dumps(
                {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
            ),
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
    assert "the chief saves the model" in outputs[1]
    assert (run / "model.keras").exists()
    assert pipeline("evaluate").wait(timeout=300) == 0
    two_accuracy = json.loads((run / "metrics.json").read_text())["accuracy"]
    assert single_accuracy > 0.8
    assert abs(two_accuracy - single_accuracy) <= 0.1, (single_accuracy, two_accuracy)


@pytest.mark.slow
def test_a_killed_worker_and_its_peer_resume_from_their_backups(tmp_path):
    """Two workers on loopback; worker 1 is killed (SIGKILL) after its backup of epoch 2. Its
    peer's collectives fail, so it exits non-zero (k8s restarts both: restartPolicy
    OnFailure). Started again, both resume from their own backups instead of epoch 1, finish,
    and the chief saves the model."""
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import free_port

    pipeline = _cli(
        tmp_path,
        1500,
        'model.task="binary"',
        "train.epochs=6",
        "train.patience=100",
        "train.batch_size=8",
    )
    ingest_run = pipeline("ingest")
    assert ingest_run.wait(timeout=300) == 0, ingest_run.communicate()[0]
    run = _latest_run(tmp_path)

    def start_workers() -> list[subprocess.Popen]:
        hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
        return [
            pipeline(
                "train",
                TF_CONFIG=json.dumps(
                    {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
                ),
            )
            for i in range(2)
        ]

    workers = start_workers()
    deadline = time.monotonic() + 300
    while True:
        metadata = list((run / "checkpoints").glob("backup-*-worker-1/training_metadata.json"))
        if metadata and json.loads(metadata[0].read_text()).get("epoch", -1) >= 2:
            break
        assert all(w.poll() is None for w in workers), "a worker ended before the kill"
        assert time.monotonic() < deadline, "no backup of epoch 2 within 300 s"
        time.sleep(0.2)
    os.kill(workers[1].pid, signal.SIGKILL)
    workers[1].wait(timeout=30)
    try:
        assert workers[0].wait(timeout=180) != 0  # its collectives failed: it must not hang
    finally:
        workers[0].kill()
    first = workers[0].communicate()[0]
    assert not (run / "model.keras").exists()

    workers = start_workers()
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
        epochs = [int(m) for m in re.findall(r"train: epoch (\d+)/6", out)]
        assert epochs and epochs[0] >= 3 and epochs[-1] == 6, (epochs, first[-2000:])
    assert (run / "model.keras").exists()


def test_is_chief_follows_tf_config(monkeypatch):
    from pipeline.train import is_chief

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert is_chief()
    monkeypatch.setenv(
        "TF_CONFIG", '{"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 1}}'
    )
    assert not is_chief()
    monkeypatch.setenv(
        "TF_CONFIG",
        '{"cluster": {"chief": ["c"], "worker": ["a"]}, "task": {"type": "worker", "index": 0}}',
    )
    assert not is_chief()


@pytest.mark.slow
def test_distributed_tuning_ends_cleanly_at_a_5_second_limit(tmp_path):
    """A chief and two workers on loopback with the env of k8s/jobs/tuning.yaml and a 5 s
    budget: every process exits 0 soon after the limit and the chief writes hparams.json."""
    import time

    from tests.conftest import free_port

    pipeline = _cli(
        tmp_path, 120, "tune.time_limit_s=5", "tune.max_trials=100", "tune.max_epochs=3"
    )
    assert pipeline("ingest").wait(timeout=300) == 0
    oracle = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_port())}

    def tuner(name):
        return pipeline("tune", KERASTUNER_TUNER_ID=name, **oracle)

    start = time.monotonic()
    chief = tuner("chief")
    time.sleep(2)
    workers = [tuner(f"tuner{i}") for i in range(2)]
    outputs = {p: p.communicate(timeout=300)[0] for p in (chief, *workers)}
    elapsed = time.monotonic() - start
    for process, out in outputs.items():
        assert process.returncode == 0, out[-3000:]
    for worker in workers:
        assert "done" in outputs[worker]
    run = _latest_run(tmp_path)
    assert json.loads((run / "hparams.json").read_text())["values"]
    summary = json.loads((run / "tuning.json").read_text())
    assert summary["trials"] and len(summary["trials"]) < 100  # the clock, not the count
    assert elapsed < 120, elapsed


def test_regression_on_a_large_scale_target_beats_the_mean_and_matches_ridge(tmp_path):
    """A target of scale 1e3: predictions come back in the original units, the model beats
    predicting the mean by far and lands within 0.05 R² of ridge regression on the same split
    (a plain Dense(1) on the unscaled target did worse than the mean)."""
    rows = [
        [x1, x2, c, round(1000 * y + 5000, 2)]
        for x1, x2, c, y in tabular_rows(400, task="regression")
    ]
    path = write_csv(tmp_path / "r.csv", ["x1", "x2", "color", "label"], rows)
    cfg = config(tmp_path, f'data.source="{path}"', 'model.task="regression"', "train.epochs=60")
    ingest(cfg)
    train(cfg)
    m = evaluate(cfg)
    assert m["beats_trivial"] and m["r2"] > 0.9, m
    assert m["r2"] >= m["baselines"]["linear"]["r2"] - 0.05, m["baselines"]
    assert m["baselines"]["trivial"]["r2"] < 0.05
    spec = load_spec(_run_dir(cfg))
    model = keras.models.load_model(_run_dir(cfg) / "model.keras")
    predictions = model.predict(make_dataset(spec, "test", batch_size=8), verbose=0)
    assert 3000 < float(np.mean(predictions)) < 7000  # original units


def test_export_refuses_a_model_that_does_not_beat_the_trivial_baseline(tmp_path):
    """Labels unrelated to the features, 90% one class: the best a model can do is the
    majority class, which is no model; export says so and only publishes when told to."""
    from pipeline.export import export

    rng = np.random.default_rng(1)
    rows = [
        [x1, x2, c, "rare" if rng.random() < 0.1 else "common"]
        for x1, x2, c, _ in tabular_rows(300, seed=3)
    ]
    path = write_csv(tmp_path / "noise.csv", ["x1", "x2", "color", "label"], rows)
    cfg = config(tmp_path, f'data.source="{path}"', "train.epochs=3")
    ingest(cfg)
    train(cfg)
    m = evaluate(cfg)
    assert not m["beats_trivial"], (m["accuracy"], m["baselines"])
    assert m["diagnosis"]["verdict"] == "worse than baseline"
    with pytest.raises(PipelineError, match="export.allow_below_baseline=true"):
        export(cfg)
    assert not list((tmp_path / "models").rglob("saved_model.pb"))
    forced = config(tmp_path, f'data.source="{path}"', "export.allow_below_baseline=true")
    assert (export(forced) / "saved_model.pb").exists()


def test_an_id_column_is_not_memorized_and_text_is_utf8(tmp_path):
    """A CSV as users have them: a customer id unique per row and a city in non-ASCII text.
    Ingest warns that the id identifies rows, the model leaves values seen once out of its
    vocabulary (every id answers alike), and evaluation's baselines read the UTF-8 text."""
    rng = np.random.default_rng(4)
    cities = ["Zürich", "São Paulo", "東京", "New York"]
    rows = [
        [f"C{i:05d}", x1, x2, c, rng.choice(cities), label]
        for i, (x1, x2, c, label) in enumerate(tabular_rows(300, seed=5))
    ]
    path = write_csv(
        tmp_path / "c.csv", ["customer id", "x1", "x2", "color", "city", "label"], rows
    )
    cfg = config(tmp_path, f'data.source="{path}"', "train.epochs=10")
    result = ingest(cfg)
    report = json.loads((result.run_dir / "anomalies.json").read_text())
    flagged = {a["feature"] for a in report["anomalies"] if a["kind"] == "identifier"}
    assert flagged == {"customer id"}, report
    train(cfg)
    m = evaluate(cfg)
    assert m["beats_trivial"], m
    assert "linear" in m["baselines"] and "accuracy" in m["baselines"]["linear"], m["baselines"]
    model = keras.models.load_model(_run_dir(cfg) / "model.keras")

    ids = [f"C{i:05d}" for i in range(300)] + ["never seen"]
    same_row = {"x1": 0.3, "x2": -0.1, "color": "red", "city": "Zürich"}
    batch = {k: np.array([v] * len(ids)) for k, v in same_row.items()}
    answers = model({**batch, "customer_id": np.array(ids)}).numpy()
    assert np.ptp(answers, axis=0).max() < 1e-6, np.unique(answers)  # float rounding only


def _judged(task, accuracy, auc, confusion):
    from pipeline.evaluate import judge_against_baselines

    metrics = {
        "task": task,
        "accuracy": accuracy,
        "auc": auc,
        "confusion_matrix": confusion,
        "baselines": {"trivial": {"rule": "always 'no' (the train majority)", "accuracy": 0.75}},
        "diagnosis": {"verdict": "good fit", "reason": "train and validation losses are close"},
    }
    judge_against_baselines(metrics)
    return metrics


def test_a_binary_model_below_the_majority_accuracy_passes_on_a_sure_auc():
    """On imbalanced data the F1 threshold costs accuracy against "always no", which cannot
    rank at all: a binary model passes when its AUC is surely above 0.5, not by luck."""
    churn = _judged("binary", 0.726, 0.735, [[170, 48], [32, 42]])  # 292 test rows
    assert churn["beats_trivial"] and 0.65 < churn["auc_lower_bound"] < 0.7, churn
    assert "ranks above chance" in churn["diagnosis"]["reason"]
    lucky = _judged("binary", 0.70, 0.60, [[40, 5], [10, 5]])  # 60 rows: 0.6 is within noise
    assert not lucky["beats_trivial"] and lucky["auc_lower_bound"] < 0.5, lucky
    assert "not surely above chance" in lucky["diagnosis"]["reason"]
    assert lucky["diagnosis"]["verdict"] == "worse than baseline"
    # Multiclass keeps the plain accuracy comparison (argmax against the majority's argmax).
    assert not _judged("multiclass", 0.70, 0.9, [[40, 5], [10, 5]])["beats_trivial"]
    assert _judged("binary", 0.80, 0.55, [[40, 5], [10, 5]])["beats_trivial"]
