"""The whole chain, ingest → tune → train → evaluate → export, through the CLI on a tiny budget."""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from pipeline.__main__ import main
from pipeline.export import verify_manifest
from pipeline.sample_data import write_sample

pytestmark = pytest.mark.e2e

CASES = {
    "digits": ("digits", "multiclass", ["data.image_size=[8,8]"]),
    "breast_cancer": ("breast_cancer", "binary", ["evaluate.target_precision=0.95"]),
    "diabetes": ("diabetes", "regression", []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_run(tmp_path, case, capsys):
    dataset, task, extra = CASES[case]
    source = write_sample(
        dataset, tmp_path / ("digits" if dataset == "digits" else f"{dataset}.csv")
    )
    (tmp_path / "c.toml").write_text("")
    sets = [
        f'artifacts="{tmp_path / "artifacts"}"',
        f'export.model_base_path="{tmp_path / "models"}"',
        f'data.source="{source}"',
        f"model.task={task}",
        f"model.name={case}",
        "tune.max_trials=2",
        "tune.max_epochs=2",
        "tune.algorithm=random",
        "train.epochs=3",
        *extra,
    ]
    argv = ["run", "--config", str(tmp_path / "c.toml")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for stage in ("ingest:", "tune:", "train:", "evaluate:", "export:"):
        assert stage in out
    version = tmp_path / "models" / case / "1"
    assert verify_manifest(version) == []
    card = json.loads((version / "assets.extra/model_card.json").read_text())
    assert card["task"] == task
    sig = tf.saved_model.load(str(version)).signatures["serving_default"]
    assert ("predictions" if task == "regression" else "probabilities") in sig.structured_outputs
