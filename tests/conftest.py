"""Shared fixtures: tiny seeded datasets written into tmp_path, and configs pointing at them."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

from pipeline.config import Config, load_config
from serving.promote import free_port

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# CI runs the same examples every time (a failure there is reproducible, not a coin toss);
# locally hypothesis explores new ones.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)


def make_images(
    root: Path,
    per_class: int = 12,
    classes: tuple[str, ...] = ("a", "b"),
    size: int = 8,
    seed: int = 0,
) -> Path:
    """Class folders of PNGs whose brightness pattern depends on the class (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size), dtype=np.uint8)
            img[:, c * size // len(classes) : (c + 1) * size // len(classes)] += 180
            Image.fromarray(img, mode="L").save(folder / f"{i:03d}.png")
    return root


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def tabular_rows(n: int, seed: int = 0, task: str = "binary") -> list[list[Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        x1, x2 = rng.normal(), rng.normal()
        color = rng.choice(["red", "green", "blue"])
        if task == "regression":
            label: Any = round(3 * x1 - 2 * x2 + (1 if color == "red" else 0), 4)
        else:
            label = "yes" if x1 + x2 + (0.5 if color == "red" else 0) > 0 else "no"
        rows.append([round(x1, 5), round(x2, 5), color, label])
    return rows


def config(tmp_path: Path, *overrides: str) -> Config:
    """A config whose artifacts and models live in tmp_path, with a tiny budget."""
    base = [
        f'artifacts="{tmp_path / "artifacts"}"',
        f'export.model_base_path="{tmp_path / "models"}"',
        "train.epochs=2",
        "train.batch_size=16",
        "tune.max_trials=2",
        "tune.max_epochs=2",
        "tune.time_limit_s=60",
        "data.shard_size=50",
        "model.name=m",  # one model across a test's ingests, whatever their files are called
    ]
    tmp_path.mkdir(parents=True, exist_ok=True)
    empty = tmp_path / "empty.toml"  # not ./pipeline.toml: tests start from the defaults
    empty.touch()
    return load_config(empty, [*base, *overrides])


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return make_images(tmp_path / "images")


@pytest.fixture
def binary_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "binary.csv", ["x1", "x2", "color", "label"], tabular_rows(120))


# --- servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def library(tmp_path_factory):
    from tests.servables import Library

    return Library(tmp_path_factory.mktemp("servables"))


@pytest.fixture
def serve():
    """``serve(*flags)`` starts an embedded server on free loopback ports; stopped afterwards."""
    from serving.server.options import options_from_args
    from serving.server.server import ModelServer

    servers = []

    def start(*flags: str):
        argv = [
            "--port",
            str(free_port()),
            "--rest_api_port",
            str(free_port()),
            "--file_system_poll_wait_seconds",
            "0.1",
            *flags,
        ]
        server = ModelServer(options_from_args(argv))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)
