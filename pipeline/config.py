"""Typed, frozen pipeline configuration loaded from TOML plus command-line overrides.

Every value is checked before any stage starts: an unknown key, a wrong type or an impossible
value raises :class:`ConfigError` naming the key (``train.epochs``), so a typo never silently falls
back to a default halfway through a long run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_CONFIG = "pipeline.toml"

Task = Literal["multiclass", "binary", "regression"]
SourceFormat = Literal["auto", "images", "csv", "npz", "tfrecord"]

# Every anomaly kind the data gate can report (see data_validation.py).
ANOMALY_KINDS = (
    "bad_records",
    "missing_column",
    "new_column",
    "type_change",
    "nan_inf",
    "out_of_range",
    "unseen_category",
    "identifier",
    "unseen_label",
    "missing_label",
    "missing_values",
    "absent_class",
    "class_imbalance",
    "drift",
    "small_split",
)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split and sharded."""

    source: str = ""  # required by ingest: a .csv, image folder, .npz or TFRecord
    format: SourceFormat = "auto"
    label_column: str = "label"
    # CSV only: a column whose value identifies a row for the split hash (default: the row content,
    # so identical rows always land in the same split and never leak from train into test).
    key_column: str = ""
    csv_delimiter: str = ","
    # CSV values that mean "missing" (besides an empty field), recognised before a column's type
    # is inferred: a numeric column with "NA" stays numeric, its missing values are counted
    # (anomalies.json: missing_values) and the model fills them with the train mean.
    missing_values: tuple[str, ...] = ("NA", "N/A", "n/a", "#N/A", "<NA>", "NULL", "null", "?")
    # Images are resized to [height, width] with `channels` (1 or 3) at ingest. Left out (or
    # [] / 0): the schema's, or on a first ingest the most common size (longer side capped at
    # 160) and 1 channel when every image is grayscale, else 3.
    image_size: tuple[int, ...] = ()
    channels: int = 0
    split: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2})
    shard_size: int = 1000
    compression: Literal["GZIP", "NONE"] = "GZIP"
    max_bad_fraction: float = 0.01
    # The schema every ingest is validated against; inferred and written on the first ingest.
    schema_path: str = ""
    seed: str = "split-v1"

    def __post_init__(self) -> None:
        if set(self.split) != {"train", "val", "test"}:
            raise ConfigError(
                f"data.split: expected keys train, val, test; got {sorted(self.split)}"
            )
        for name, frac in self.split.items():
            if not 0.0 <= frac <= 1.0:
                raise ConfigError(f"data.split.{name}: {frac} is not within [0, 1]")
        if not math.isclose(sum(self.split.values()), 1.0, abs_tol=1e-6):
            raise ConfigError(
                f"data.split: ratios must sum to 1, got {sum(self.split.values()):.6g}"
            )
        if self.split["train"] <= 0:
            raise ConfigError("data.split.train: must be > 0")
        _positive("data.shard_size", self.shard_size)
        if len(self.image_size) not in (0, 2):
            raise ConfigError(
                f"data.image_size: expected [height, width] (or [] for auto), got "
                f"{list(self.image_size)}"
            )
        if self.image_size:
            _positive("data.image_size", min(self.image_size))
        if self.channels not in (0, 1, 3):
            raise ConfigError(f"data.channels: expected 1, 3 or 0 (auto), got {self.channels}")
        if not 0.0 <= self.max_bad_fraction < 1.0:
            raise ConfigError(
                f"data.max_bad_fraction: {self.max_bad_fraction} is not within [0, 1)"
            )
        if len(self.csv_delimiter) != 1:
            raise ConfigError("data.csv_delimiter: expected a single character")
        if not self.label_column:
            raise ConfigError("data.label_column: must not be empty")


@dataclass(frozen=True)
class IngestConfig:
    """Where the ingest runs: in this process, or as an Apache Beam pipeline."""

    # local: this process (pyarrow for CSV). beam: the same reading, splitting, statistics and
    # shard layout as a Beam pipeline; `beam_args` are its pipeline options, e.g.
    # ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing"]
    # or ["--runner=DataflowRunner", "--project=…", "--region=…", "--temp_location=gs://…"].
    runner: Literal["local", "beam"] = "local"
    beam_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of the data gate and which anomaly kinds stop the pipeline."""

    max_class_imbalance: float = 10.0
    drift_linf: float = 0.25
    # bad_records is always blocking once data.max_bad_fraction is exceeded.
    blocking: tuple[str, ...] = (
        "missing_column",
        "type_change",
        "nan_inf",
        "unseen_label",
        "absent_class",  # a retrain that lost a class must not reach production
    )

    def __post_init__(self) -> None:
        if self.max_class_imbalance < 1:
            raise ConfigError("validation.max_class_imbalance: must be >= 1")
        if not 0 < self.drift_linf <= 1:
            raise ConfigError("validation.drift_linf: must be within (0, 1]")
        for kind in self.blocking:
            if kind not in ANOMALY_KINDS:
                raise ConfigError(
                    f"validation.blocking: unknown anomaly kind {kind!r}; "
                    f"expected one of {', '.join(ANOMALY_KINDS)}"
                )


@dataclass(frozen=True)
class AugmentConfig:
    """Image augmentation, applied only while training."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    rotation: float = 0.0
    zoom: float = 0.0
    contrast: float = 0.0
    translation: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rotation", "zoom", "contrast", "translation"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.augment.{name}: {value} is not within [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    """What is learned: the task, the model family and its fine-tuning base."""

    # models/NAME/VERSION; left empty, it is derived from data.source ("data/churn.csv" → churn).
    name: str = ""
    task: Task = "multiclass"
    kind: Literal["auto", "cnn", "mlp", "finetune"] = "auto"
    # Fine-tuning: a keras.applications name (e.g. "MobileNetV2") or a path to a .keras file.
    base_model: str = ""
    # keras.applications weights: a local weights file, "imagenet" (online users) or "" (random).
    base_weights: str = ""
    fine_tune_layers: int = 20
    fine_tune_epochs: int = 5
    fine_tune_lr_factor: float = 0.1
    # Binary classification: the label treated as positive (default: the last in sorted order).
    positive_label: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"model.name: {self.name!r} may use only letters, digits, - _ .")
        if self.kind == "finetune" and not self.base_model:
            raise ConfigError("model.base_model: required when model.kind = 'finetune'")
        if self.fine_tune_layers < 0:
            raise ConfigError("model.fine_tune_layers: must be >= 0")
        if self.fine_tune_epochs < 0:
            raise ConfigError("model.fine_tune_epochs: must be >= 0")
        if not 0 < self.fine_tune_lr_factor <= 1:
            raise ConfigError("model.fine_tune_lr_factor: must be within (0, 1]")


@dataclass(frozen=True)
class TuneConfig:
    """The keras-tuner search and its budget."""

    enabled: bool = True
    algorithm: Literal["hyperband", "random", "bayesian"] = "hyperband"
    max_trials: int = 10
    max_epochs: int = 10
    time_limit_s: float = 120.0
    patience: int = 3
    max_failed_trials: int = 3
    objective: str = ""  # default: val_accuracy (classification) or val_loss (regression)

    def __post_init__(self) -> None:
        _positive("tune.max_trials", self.max_trials)
        _positive("tune.max_epochs", self.max_epochs)
        _positive("tune.time_limit_s", self.time_limit_s)
        _positive("tune.patience", self.patience)
        _positive("tune.max_failed_trials", self.max_failed_trials)


@dataclass(frozen=True)
class TrainConfig:
    """The final training run."""

    batch_size: int = 64
    epochs: int = 40
    patience: int = 8
    seed: int = 42
    kfold: int = 0  # 0 = off; k >= 2 adds a k-fold cross-validation report
    cache: bool = True
    shuffle_buffer: int = 10000

    def __post_init__(self) -> None:
        _positive("train.batch_size", self.batch_size)
        _positive("train.epochs", self.epochs)
        _positive("train.patience", self.patience)
        _positive("train.shuffle_buffer", self.shuffle_buffer)
        if self.kfold == 1 or self.kfold < 0:
            raise ConfigError(f"train.kfold: expected 0 (off) or >= 2, got {self.kfold}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation on the held-out test split."""

    # Binary only: pick the decision threshold that reaches this precision (or recall); 0 = off.
    target_precision: float = 0.0
    target_recall: float = 0.0

    def __post_init__(self) -> None:
        for name in ("target_precision", "target_recall"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"evaluate.{name}: must be within [0, 1]")
        if self.target_precision and self.target_recall:
            raise ConfigError("evaluate: set target_precision or target_recall, not both")


@dataclass(frozen=True)
class ExportConfig:
    """Publishing a version into the TF Serving model directory."""

    model_base_path: str = "models"
    warmup_records: int = 50
    # Reloaded SavedModel vs in-memory Keras model, element-wise |a - b| <= atol + rtol * |b|.
    parity_atol: float = 1e-5
    parity_rtol: float = 1e-4
    # Sign assets.extra/MANIFEST.sha256 with this private key (PEM, Ed25519 or ECDSA).
    signing_key: str = ""
    # "sequence" (1, 2, 3…) or "timestamp" (Unix seconds: no collisions between CI runners
    # that export into one store without seeing each other's versions).
    version_scheme: str = "sequence"
    # Export refuses a model that does not beat the trivial baseline (majority class, or the
    # train mean) on the test split (a binary one passes on an AUC surely above 0.5, see
    # evaluate.judge_against_baselines); true publishes it anyway (recorded in the model card).
    allow_below_baseline: bool = False

    def __post_init__(self) -> None:
        if self.version_scheme not in ("sequence", "timestamp"):
            raise ConfigError(
                f"export.version_scheme: expected 'sequence' or 'timestamp', got "
                f"{self.version_scheme!r}"
            )
        if not 0 <= self.warmup_records <= 1000:
            raise ConfigError(
                "export.warmup_records: TF Serving reads at most 1000 warmup records; "
                f"got {self.warmup_records}"
            )
        if self.parity_atol < 0 or self.parity_rtol < 0:
            raise ConfigError("export.parity_atol / parity_rtol: must be >= 0")


@dataclass(frozen=True)
class PromoteConfig:
    """The promotion gates (serving/promote/gates.py)."""

    # Absolute thresholds on metrics computed now on the evaluation data, e.g.
    # min_metrics = {accuracy = 0.95, auc = 0.9}, max_metrics = {rmse = 50.0}.
    min_metrics: dict[str, float] = field(default_factory=dict)
    max_metrics: dict[str, float] = field(default_factory=dict)
    # How much worse than production's `stable` a metric may be (absolute difference).
    max_regression: float = 0.005
    # A run directory whose test split is the golden set. Default: production's frozen
    # evaluation set (PROD/evalsets/MODEL/), made once from the test split of the first
    # promoted version's run and never the candidate's own split afterwards.
    eval_data: str = ""
    # Every class of the evaluation set needs at least this recall (a model that forgot a
    # class, or never saw one, fails the quality gate).
    min_class_recall: float = 0.1
    eval_examples: int = 2000
    # Served vs in-process predictions: |served - local| <= parity_atol element-wise.
    parity_atol: float = 1e-4
    latency_requests: int = 100
    latency_p99_ms: float = 250.0
    keep_versions: int = 3  # promoted versions kept on disk besides every labelled one
    # Verify assets.extra/MANIFEST.sha256.sig with this public key (PEM); required if set.
    public_key: str = ""

    def __post_init__(self) -> None:
        for name in ("max_regression", "parity_atol", "latency_p99_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"promote.{name}: must be >= 0")
        _positive("promote.eval_examples", self.eval_examples)
        _positive("promote.latency_requests", self.latency_requests)
        _positive("promote.keep_versions", self.keep_versions)


@dataclass(frozen=True)
class Config:
    """The whole pipeline configuration."""

    artifacts: str = "artifacts"
    run_id: str = ""  # default: the newest run for later stages, a new timestamp for ingest
    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def __post_init__(self) -> None:
        # A plain directory name under artifacts/: never "..", a path or a hidden name.
        if self.run_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_id):
            raise ConfigError(
                f"run_id: {self.run_id!r} must be a plain name: letters, digits, - _ . "
                "(starting with a letter or digit)"
            )

    @property
    def model_dir(self) -> Path:
        """``artifacts/NAME``: this model's schema, ``LATEST`` and run directories. Each model
        (``model.name``, by default named after its data) keeps its own, so a second dataset
        never meets the first one's schema nor lands in its versions."""
        return Path(self.artifacts) / self.model.name

    @property
    def schema_path(self) -> Path:
        return Path(self.data.schema_path or self.model_dir / "schema.json")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load the configuration.

    Args:
        path: a TOML file; ``None`` reads ``pipeline.toml`` when it exists, else the defaults.
        overrides: ``section.key=value`` strings; the value is read as TOML, or as a bare string.

    Raises:
        ConfigError: the file cannot be read or parsed, or a value is invalid.
    """
    table: dict[str, Any] = {}
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    if path is not None:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from e
    for item in overrides:
        _apply_override(table, item)
    cfg = _build(Config, table, "")
    if not cfg.model.name:
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, name=derived_name(cfg.data.source))
        )
    return cfg


def derived_name(source: str) -> str:
    """A model name from a data source path: its file or folder name, made name-safe."""
    stem = Path(source.rstrip("/")).name.split(".")[0]
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem).strip("-")
    return name or "model"


def _apply_override(table: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node = table
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[leaf] = value


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; expected one of {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in table.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"{prefix}: {e}") from e


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")  # type: ignore[arg-type]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):  # pragma: no cover - not used yet
        raise ConfigError(f"{key}: union types are not supported")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover
