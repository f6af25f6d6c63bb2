from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config


def _load(tmp_path: Path, text: str, *overrides: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(path, overrides)


def test_defaults_and_file_values(tmp_path):
    cfg = _load(tmp_path, "[train]\nepochs = 3\n[data]\nimage_size = [16, 12]\n")
    assert cfg.train.epochs == 3
    assert cfg.data.image_size == (16, 12)
    assert cfg.model.task == "multiclass"


def test_overrides_are_typed_and_win(tmp_path):
    cfg = _load(
        tmp_path,
        "[train]\nepochs = 3\n",
        "train.epochs=7",
        "model.name=flowers",
        "data.split={train=0.8,val=0.1,test=0.1}",
    )
    assert cfg.train.epochs == 7
    assert cfg.model.name == "flowers"
    assert cfg.data.split["train"] == 0.8


@pytest.mark.parametrize(
    "text, key",
    [
        ("[train]\nepochs = -1\n", "train.epochs"),
        ("[train]\nepoch = 3\n", "train.epoch"),
        ("[train]\nepochs = 'ten'\n", "train.epochs"),
        ("[train]\nbatch_size = 1.5\n", "train.batch_size"),
        ("[data]\nsplit = {train = 0.5, val = 0.1, test = 0.1}\n", "data.split"),
        ("[data]\nsplit = {train = 0.9, test = 0.1}\n", "data.split"),
        ("[model]\ntask = 'clustering'\n", "model.task"),
        ("[model]\nkind = 'finetune'\n", "model.base_model"),
        ("[validation]\nblocking = ['typo']\n", "validation.blocking"),
        ("[export]\nwarmup_records = 5000\n", "export.warmup_records"),
        ("[data]\nchannels = 2\n", "data.channels"),
        ("[data]\nimage_size = [8]\n", "data.image_size"),
        ("[tune]\nenabled = 'yes'\n", "tune.enabled"),
        ("bogus = 1\n", "bogus"),
        ("[evaluate]\ntarget_precision = 0.9\ntarget_recall = 0.9\n", "evaluate"),
        ("run_id = '..'\n", "run_id"),
        ("run_id = '../elsewhere'\n", "run_id"),
        ("run_id = '.hidden'\n", "run_id"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _load(tmp_path, text)


def test_bad_toml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="c.toml"):
        _load(tmp_path, "[train\n")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        _load(tmp_path, "", "train.epochs")


def test_config_is_frozen(tmp_path):
    cfg = _load(tmp_path, "")
    with pytest.raises(AttributeError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_shipped_configs_are_valid_and_only_the_example_is_about_digits():
    root = Path(__file__).parent.parent
    defaults = load_config(root / "pipeline.toml")
    assert defaults.data.source == "" and defaults.data.image_size == ()
    assert defaults.data.channels == 0 and defaults.promote.min_metrics == {}
    digits = load_config(root / "configs" / "digits.toml")
    assert digits.data.source == "data/digits" and digits.model.name == "digits"
    assert digits.model_dir == Path("artifacts") / "digits"


def test_model_name_defaults_to_the_data_source(tmp_path):
    assert _load(tmp_path, "", 'data.source="data/My Churn.v2.csv"').model.name == "My-Churn"
    assert _load(tmp_path, "", 'data.source="/x/hotdogs/"').model.name == "hotdogs"
    assert _load(tmp_path, "", "model.name=keep").model.name == "keep"


def test_run_keeps_its_own_run_id_when_latest_moves(tmp_path, monkeypatch):
    """`run` pins its run id at the start: an ingest beside it (which moves LATEST) does not
    redirect its later stages."""
    import pipeline.__main__ as cli

    seen = []

    def fake_stage(stage, cfg):
        seen.append((stage, cfg.run_id))
        # Another ingest lands while this run is between stages.
        (tmp_path / "art" / "m" / "someone-else").mkdir(parents=True, exist_ok=True)
        (tmp_path / "art" / "m" / "LATEST").write_text("someone-else\n")

    monkeypatch.setattr(cli, "run_stage", fake_stage)
    monkeypatch.setattr(cli.console, "quiet_tensorflow", lambda: None)
    (tmp_path / "c.toml").write_text("")
    argv = ["run", "--config", str(tmp_path / "c.toml"), "--set", f'artifacts="{tmp_path / "art"}"']
    argv += ["--set", "model.name=m"]
    assert cli.main([*argv, "--stages", "ingest,train,evaluate"]) == 0
    ids = {run_id for _, run_id in seen}
    assert len(ids) == 1 and "someone-else" not in ids
    seen.clear()
    # Without ingest, the run takes LATEST once, at the start.
    assert cli.main([*argv, "--stages", "train,evaluate"]) == 0
    assert [run_id for _, run_id in seen] == ["someone-else", "someone-else"]
