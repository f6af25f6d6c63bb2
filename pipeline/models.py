"""One ``build_model(hp, spec, cfg)`` shared by tuning and training.

Every hyperparameter has a default, so a fresh ``HyperParameters()`` (tuning skipped) builds the
documented default model. Preprocessing lives inside the model (rescaling, normalization with the
train split's statistics, string lookups), so the exported model takes raw feature values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np

from pipeline.artifacts import PipelineError
from pipeline.config import Config, ModelConfig
from pipeline.datasets import DataSpec, input_name

MAX_ONE_HOT = 64  # larger vocabularies use an embedding
# A string value seen fewer times in the train split is out of vocabulary: a value met once (a
# row's id, free text) lets the model memorize that row and says nothing about any other.
MIN_VALUE_COUNT = 2


def model_kind(spec: DataSpec, cfg: ModelConfig) -> str:
    if cfg.kind != "auto":
        if cfg.kind == "cnn" and not spec.is_image:
            raise PipelineError("model.kind = 'cnn' needs an image dataset")
        return cfg.kind
    return "cnn" if spec.is_image else "mlp"


def build_model(hp: kt.HyperParameters, spec: DataSpec, cfg: Config) -> keras.Model:
    """Build and compile the model for ``spec`` with hyperparameters ``hp``."""
    kind = model_kind(spec, cfg.model)
    if kind == "cnn":
        inputs, features = _cnn(hp, spec, cfg.model)
    elif kind == "finetune":
        inputs, features = _finetune_base(hp, spec, cfg.model)
    else:
        inputs, features = _mlp(hp, spec)
    outputs = _head(spec, features)
    model = keras.Model(inputs=inputs, outputs=outputs, name=cfg.model.name.replace(".", "_"))
    lr = hp.Float("learning_rate", 1e-4, 1e-2, sampling="log", default=2e-3)
    compile_model(model, spec, lr)
    return model


def compile_model(model: keras.Model, spec: DataSpec, learning_rate: float) -> None:
    optimizer = keras.optimizers.Adam(learning_rate)
    if spec.task == "multiclass":
        model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    elif spec.task == "binary":
        model.compile(
            optimizer,
            "binary_crossentropy",
            metrics=["accuracy", keras.metrics.AUC(name="auc")],
        )
    else:
        model.compile(
            optimizer,
            "mse",
            metrics=[
                keras.metrics.MeanAbsoluteError(name="mae"),
                keras.metrics.RootMeanSquaredError(name="rmse"),
            ],
        )


def _head(spec: DataSpec, x: Any) -> Any:
    if spec.task == "multiclass":
        return keras.layers.Dense(spec.num_classes, activation="softmax", name="probabilities")(x)
    if spec.task == "binary":
        return keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
    # Regression: the network predicts the standardized target and a fixed rescaling returns
    # the original units, so a target of scale 1e3 trains like one of scale 1 (a plain
    # Dense(1) on an unscaled target barely moves from 0 and loses to predicting the mean).
    mean = float(spec.label_stats.get("mean") or 0.0)
    std = float(spec.label_stats.get("std") or 0.0) or 1.0
    z = keras.layers.Dense(1, name="standardized_prediction")(x)
    return keras.layers.Rescaling(scale=std, offset=mean, name="prediction")(z)


def _image_input(spec: DataSpec) -> tuple[dict[str, Any], Any]:
    name = next(n for n, e in spec.features.items() if e["kind"] == "image")
    inp = keras.Input(shape=spec.image_shape, dtype="float32", name=input_name(name))
    return {input_name(name): inp}, inp


def _augmentation(cfg: ModelConfig) -> list[keras.layers.Layer]:
    a = cfg.augment
    layers: list[keras.layers.Layer] = []
    if a.flip != "none":
        layers.append(keras.layers.RandomFlip(a.flip))
    if a.rotation:
        layers.append(keras.layers.RandomRotation(a.rotation, fill_mode="constant"))
    if a.zoom:
        layers.append(keras.layers.RandomZoom(a.zoom, fill_mode="constant"))
    if a.translation:
        layers.append(
            keras.layers.RandomTranslation(a.translation, a.translation, fill_mode="constant")
        )
    if a.contrast:
        layers.append(keras.layers.RandomContrast(a.contrast))
    return layers


def _cnn(hp: kt.HyperParameters, spec: DataSpec, cfg: ModelConfig) -> tuple[dict[str, Any], Any]:
    inputs, x = _image_input(spec)
    x = keras.layers.Rescaling(1.0 / 255.0)(x)
    # Random* layers are identity at inference: augmentation only happens in fit().
    for layer in _augmentation(cfg):
        x = layer(x)
    blocks = hp.Int("conv_blocks", 1, 3, default=2)
    filters = hp.Choice("filters", [16, 32, 64], default=32)
    for i in range(blocks):
        x = keras.layers.Conv2D(filters * 2**i, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu")(x)
        if min(x.shape[1], x.shape[2]) >= 4:
            x = keras.layers.MaxPooling2D()(x)
    if x.shape[1] * x.shape[2] > 16:
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(hp.Float("dropout", 0.0, 0.5, step=0.1, default=0.3))(x)
    x = keras.layers.Dense(
        hp.Choice("dense_units", [64, 128, 256], default=128), activation="relu"
    )(x)
    x = keras.layers.Dropout(hp.Float("head_dropout", 0.0, 0.5, step=0.1, default=0.2))(x)
    return inputs, x


@keras.saving.register_keras_serializable(package="pipeline")
class FillMissing(keras.layers.Layer):
    """NaN → ``value`` (the train-split mean of the feature)."""

    def __init__(self, value: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.value = float(value)

    def call(self, x: Any) -> Any:
        return keras.ops.where(keras.ops.isnan(x), keras.ops.cast(self.value, x.dtype), x)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "value": self.value}


def load_model(path: Path) -> Any:
    """A trained ``model.keras`` (its custom layers are registered by this module)."""
    return keras.models.load_model(path)


def _mlp(hp: kt.HyperParameters, spec: DataSpec) -> tuple[dict[str, Any], Any]:
    inputs: dict[str, Any] = {}
    parts = []
    for name, entry in spec.features.items():
        key = input_name(name)
        stats = spec.train_stats[name]
        kind = entry["kind"]
        if kind in ("float", "vector"):
            width = entry.get("length", 1)
            inp = keras.Input(shape=(width,) if kind == "vector" else (), dtype="float32", name=key)
            x = keras.layers.Reshape((width,))(inp) if kind == "float" else inp
            mean = float(stats["mean"] or 0.0)
            var = max(float(stats["std"] or 0.0) ** 2, 1e-12)
            # A missing number: parsed examples carry the train mean already (the parse
            # default); a Predict request sends NaN, filled here with the same mean.
            x = FillMissing(mean)(x)
            # Mean and variance of the train split, computed at ingest: same as adapt().
            x = keras.layers.Normalization(mean=mean, variance=var)(x)
            parts.append(x)
        elif kind == "string":
            inp = keras.Input(shape=(), dtype="string", name=key)
            vocab = sorted(v for v, n in stats["values"].items() if n >= MIN_VALUE_COUNT) or [""]
            if len(vocab) <= MAX_ONE_HOT:
                x = keras.layers.StringLookup(vocabulary=vocab, output_mode="one_hot")(inp)
            else:
                ids = keras.layers.StringLookup(vocabulary=vocab)(inp)
                dim = int(min(32, np.ceil(len(vocab) ** 0.5)))
                x = keras.layers.Flatten()(keras.layers.Embedding(len(vocab) + 1, dim)(ids))
            parts.append(x)
        else:
            raise PipelineError(f"feature {name!r}: the MLP cannot take {kind} features")
        inputs[key] = inp
    x = keras.layers.Concatenate()(parts) if len(parts) > 1 else parts[0]
    units = hp.Choice("units", [32, 64, 128, 256], default=64)
    for _ in range(hp.Int("hidden_layers", 1, 3, default=2)):
        x = keras.layers.Dense(units, activation="relu")(x)
        x = keras.layers.Dropout(hp.Float("dropout", 0.0, 0.5, step=0.1, default=0.1))(x)
    return inputs, x


def load_base_model(cfg: ModelConfig, input_shape: tuple[int, int, int]) -> keras.Model:
    """The frozen feature extractor for fine-tuning.

    ``cfg.base_model`` is a ``.keras`` file (its layers up to the one before the output) or a
    ``keras.applications`` name built with ``include_top=False`` and ``cfg.base_weights``
    (a local weights file, ``"imagenet"`` when online, or empty for random weights).
    """
    if cfg.base_model.endswith(".keras"):
        path = Path(cfg.base_model)
        if not path.exists():
            raise PipelineError(f"model.base_model: {path} does not exist")
        model = keras.models.load_model(path, compile=False)
        features = model.layers[-2].output
        base = keras.Model(model.inputs, features, name="base")
        return base
    app = getattr(keras.applications, cfg.base_model, None)
    if app is None:
        raise PipelineError(
            f"model.base_model: {cfg.base_model!r} is neither a .keras file nor a "
            "keras.applications model name (e.g. MobileNetV2)"
        )
    weights = cfg.base_weights or None
    if weights and weights != "imagenet" and not Path(weights).exists():
        raise PipelineError(f"model.base_weights: {weights} does not exist")
    shape = (input_shape[0], input_shape[1], 3)
    try:
        if weights and weights != "imagenet":
            base = app(include_top=False, weights=None, input_shape=shape, pooling="avg")
            base.load_weights(weights)
        else:
            base = app(include_top=False, weights=weights, input_shape=shape, pooling="avg")
    except ValueError as e:
        raise PipelineError(f"model.base_model {cfg.base_model}: {e}") from e
    return base


# keras.applications families by the input scaling their weights were trained with.
_TF_MODE = (
    "MobileNet",
    "Inception",
    "Xception",
    "NASNet",
    "ResNet50V2",
    "ResNet101V2",
    "ResNet152V2",
)
_TORCH_MODE = ("DenseNet",)
_CAFFE_MODE = ("ResNet50", "ResNet101", "ResNet152", "VGG16", "VGG19")


def _application_preprocessing(name: str, x: Any) -> Any:
    """keras.applications' ``preprocess_input`` expressed with serializable layers.

    (A Lambda layer would make the saved .keras file unloadable without ``safe_mode=False``.)
    EfficientNet, ConvNeXt and RegNet rescale inside the model and need nothing here.
    """
    if name.startswith(_TF_MODE):
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0)(x)
    if name.startswith(_TORCH_MODE):
        x = keras.layers.Rescaling(1 / 255.0)(x)
        return keras.layers.Normalization(
            mean=[0.485, 0.456, 0.406], variance=[0.229**2, 0.224**2, 0.225**2]
        )(x)
    if name in _CAFFE_MODE:
        # RGB → BGR with a fixed 1x1 convolution, then subtract the ImageNet BGR means.
        swap = keras.layers.Conv2D(3, 1, use_bias=False, trainable=False, name="rgb_to_bgr")
        x = swap(x)
        swap.set_weights([np.eye(3)[::-1].reshape(1, 1, 3, 3).astype("float32")])
        return keras.layers.Normalization(mean=[103.939, 116.779, 123.68], variance=[1, 1, 1])(x)
    return x


def _finetune_base(
    hp: kt.HyperParameters, spec: DataSpec, cfg: ModelConfig
) -> tuple[dict[str, Any], Any]:
    inputs, x = _image_input(spec)
    base = load_base_model(cfg, spec.image_shape)
    base.trainable = False
    for layer in _augmentation(cfg):
        x = layer(x)
    if not cfg.base_model.endswith(".keras"):
        if spec.image_shape[2] == 1:
            x = keras.layers.Concatenate()([x, x, x])
        x = _application_preprocessing(cfg.base_model, x)
    # training=False keeps the base's BatchNormalization in inference mode even when unfrozen.
    x = base(x, training=False)
    x = keras.layers.Dropout(hp.Float("dropout", 0.0, 0.5, step=0.1, default=0.2))(x)
    return inputs, x


def unfreeze_top(model: keras.Model, layers: int) -> int:
    """Make the top ``layers`` layers of the base trainable (BatchNorm stays frozen)."""
    base = next((lyr for lyr in model.layers if isinstance(lyr, keras.Model)), None)
    if base is None or layers == 0:
        return 0
    base.trainable = True
    count = 0
    for layer in base.layers[:-layers]:
        layer.trainable = False
    for layer in base.layers[-layers:]:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        elif layer.weights:
            count += 1
    return count
