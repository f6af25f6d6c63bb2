"""The production store: its files (models.config, promotion.json, the staged copy), the
lock that keeps promotions from interleaving, and the audit record of each attempt."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import artifacts as A
from pipeline.artifacts import PipelineError
from serving import audit as trail

log = logging.getLogger(__name__)


CONFIG_FILE = "models.config"


STATE_FILE = "promotion.json"


LOCK_FILE = ".promote.lock"


STABLE, CANARY = "stable", "canary"


class PromotionError(PipelineError):
    """The promotion cannot go on; production is untouched (or consistent, see the message)."""


class LockBusy(PromotionError):
    """Another promotion holds the production directory's lock."""


def read_server_config(path: Path) -> Any:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    if path.exists():
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as e:
            raise PromotionError(f"{path}: invalid ModelServerConfig: {e}") from e
    else:
        config.model_config_list.SetInParent()
    return config


def write_server_config(path: Path, config: Any) -> None:
    from google.protobuf import text_format

    A.atomic_write_text(path, text_format.MessageToString(config))


def model_entry(config: Any, model: str, base_path: str) -> Any:
    """The model's entry in a ModelServerConfig (added if missing), pointing at ``base_path``."""
    for mc in config.model_config_list.config:
        if mc.name == model:
            break
    else:
        mc = config.model_config_list.config.add()
        mc.name = model
        mc.model_platform = "tensorflow"
    mc.base_path = base_path
    return mc


def set_versions(mc: Any, versions: set[int], labels: dict[str, int]) -> None:
    mc.model_version_policy.Clear()
    mc.model_version_policy.specific.versions.extend(sorted(versions))
    mc.version_labels.clear()
    for label, version in sorted(labels.items()):
        mc.version_labels[label] = version


def read_state(prod: Path, model: str) -> dict[str, Any]:
    path = prod / model / STATE_FILE
    return A.read_json(path) if path.exists() else {"history": []}


def manifest_digest(version_dir: Path) -> str:
    path = version_dir / A.MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def fault_point(step: str) -> None:
    """Fault injection for the kill-at-each-step tests: PROMOTE_KILL_AT=step."""
    if os.environ.get("PROMOTE_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Paths:
    source: Path
    prod: Path
    model: str

    @property
    def model_dir(self) -> Path:
        return self.prod / self.model

    @property
    def config(self) -> Path:
        return self.prod / CONFIG_FILE


def current_labels(paths: Paths) -> dict[str, int]:
    config = read_server_config(paths.config)
    for mc in config.model_config_list.config:
        if mc.name == paths.model:
            return dict(mc.version_labels)
    return {}


def stage(paths: Paths, version: int) -> Path:
    """Copy the candidate once, next to production, before any gate reads it.

    Every gate checks this copy and the push renames it into place, so what reaches production
    is byte for byte what was gated, whatever happens to the source meanwhile. Called under the
    lock: any other staged copy was left by a killed promotion.
    """
    source = paths.source / paths.model / str(version)
    if not source.is_dir():
        raise PromotionError(f"{source}: no such version")
    # In the production root (same filesystem as the version's final place, outside any
    # directory a server watches); a refused promotion leaves production as it was.
    for stale in [*paths.prod.glob(".staged-*"), *paths.model_dir.glob(".tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    staged = paths.prod / f".staged-{paths.model}-{version}-{os.getpid()}"
    shutil.copytree(source, staged, symlinks=False)
    A.fsync_tree(staged)
    return staged


def _lock(prod: Path, wait: float) -> Any:
    from filelock import FileLock, Timeout

    prod.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(prod / LOCK_FILE), timeout=wait)
    try:
        lock.acquire()
    except Timeout as e:
        raise LockBusy(
            f"{prod / LOCK_FILE}: another promotion is running; retry when it is "
            "done (or pass --wait-lock SECONDS)"
        ) from e
    return lock


@contextlib.contextmanager
def attempt(prod: Path, wait_lock: float, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One audited attempt under the production lock.

    A ``started`` record goes into the trail before anything changes, the outcome record after,
    whatever happens: refused, done, a PipelineError, any other exception (``crashed``), or the
    lock held by someone else (``lock busy``, recorded without the lock). A kill leaves the
    ``started`` record alone, which ``verify-audit`` reports as unfinished.
    """
    record = dict(record, attempt=uuid.uuid4().hex, git_commit=A.git_commit())
    record["time"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        lock = _lock(prod, wait_lock)
    except LockBusy as e:
        trail.append(prod, dict(record, event="outcome", outcome="lock busy", error=str(e)))
        raise
    outcome = dict(record, event="outcome")
    try:
        trail.append(prod, dict(record, event="started"))
        yield outcome
    except PipelineError as e:
        outcome.update(outcome="error", error=str(e))
        raise
    except BaseException as e:
        outcome.update(outcome="crashed", error=f"{type(e).__name__}: {e}"[:2000])
        raise
    finally:
        outcome["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        trail.append(prod, outcome)
        fault_point("audit")
        lock.release()
