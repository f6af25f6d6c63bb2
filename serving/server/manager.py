"""Model management with TF Serving's semantics.

* Each model's ``base_path`` is polled every ``--file_system_poll_wait_seconds``; only children
  named by an integer that contain ``saved_model.pb`` are versions.
* The version policy (``latest {num_versions}``, default 1; ``all``; ``specific {versions}``)
  picks the aspired versions.
* Availability is preserved: aspired versions are loaded (and warmed up) first; a version that
  is no longer aspired is unloaded only once an aspired version is AVAILABLE, so a version that
  fails to load leaves the previous one serving, with the error in its status.
* Version labels may only point to AVAILABLE versions (FAILED_PRECONDITION otherwise) unless
  ``--allow_version_labels_for_unavailable_models``.
* A new config (file poll or HandleReloadConfigRequest) replaces the whole model list.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.server.errors import ServingError, failed_precondition, invalid, not_found
from serving.server.metrics import Metrics
from serving.server.servable import Servable

log = logging.getLogger(__name__)

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


@dataclass
class VersionState:
    state: str = START
    error_code: str = "OK"  # tensorflow.error.Code name, as GetModelStatus reports it
    error_message: str = ""
    servable: Servable | None = None
    failed_mtime: float | None = None  # a failed version is retried only when its files change


@dataclass
class Model:
    name: str
    config: Any  # ModelConfig
    versions: dict[int, VersionState] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)


def list_versions(base_path: str) -> dict[int, Path]:
    """Integer-named children that hold a saved_model.pb (anything else is ignored)."""
    root = Path(base_path)
    out = {}
    try:
        children = list(root.iterdir())
    except OSError:
        return {}
    for child in children:
        if child.name.isdigit() and (child / "saved_model.pb").is_file():
            out[int(child.name)] = child
    return out


def aspired(policy: Any, available: dict[int, Path]) -> set[int]:
    """The versions a ModelVersionPolicy wants loaded, out of those on disk."""
    kind = policy.WhichOneof("policy_choice") if policy is not None else None
    if kind == "all":
        return set(available)
    if kind == "specific":
        return set(policy.specific.versions) & set(available)
    n = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions else 1
    return set(sorted(available)[-n:])


class ModelManager:
    """Loads, serves and unloads model versions; answers servable lookups."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        allow_unavailable_labels: bool = False,
        poll_seconds: float = 1.0,
        warmup: bool = True,
    ):
        self.metrics = metrics
        self.allow_unavailable_labels = allow_unavailable_labels
        self.poll_seconds = poll_seconds
        self.warmup = warmup
        self._models: dict[str, Model] = {}
        self._lock = threading.RLock()
        self._reconcile_lock = threading.Lock()  # one reconcile (load/unload pass) at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- configuration ---------------------------------------------------------------------
    def apply_config(self, config: Any, *, wait_for_new: bool = True) -> None:
        """Replace the whole model list (TF Serving's reload semantics).

        New models are loaded before this returns (like TF Serving, which waits for models it
        adds); labels are then checked against the versions available at that point.

        Raises:
            ServingError: INVALID_ARGUMENT for a bad config, FAILED_PRECONDITION for a label
                pointing to a version that is not AVAILABLE.
        """
        configs = {}
        for mc in config.model_config_list.config:
            if mc.name in configs:
                raise invalid(f"Illegal to list model {mc.name} multiple times in config list")
            configs[mc.name] = mc
        with self._lock:
            for name in list(self._models):
                if name not in configs:
                    log.info("model %s removed from the config: unloading", name)
                    removed = self._models.pop(name)
                    for state in removed.versions.values():
                        state.state, state.servable = END, None
            for name, mc in configs.items():
                model = self._models.get(name)
                if model is None:
                    self._models[name] = Model(name, mc)
                else:
                    model.config = mc
        if wait_for_new:
            self.reconcile()
        with self._lock:
            # Check every label before moving any, so a refused config changes no label.
            for name, mc in configs.items():
                self._check_labels(self._models[name], dict(mc.version_labels))
            for name, mc in configs.items():
                self._models[name].labels = dict(mc.version_labels)

    def _check_labels(self, model: Model, labels: dict[str, int]) -> None:
        if self.allow_unavailable_labels:
            return
        for version in labels.values():
            state = model.versions.get(version)
            if state is None or state.state != AVAILABLE:
                raise failed_precondition(
                    f"Request to assign label to version {version} of model {model.name}, "
                    "which is not currently available for inference."
                )

    # --- the version poller ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll, name="version-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.reconcile()
            except Exception:
                log.exception("version poll failed; retrying in %.1fs", self.poll_seconds)

    def reconcile(self) -> None:
        """One pass: load aspired versions, then unload the rest where availability allows."""
        with self._reconcile_lock:
            with self._lock:
                models = list(self._models.values())
            for model in models:
                self._reconcile_model(model)

    def _reconcile_model(self, model: Model) -> None:
        on_disk = list_versions(model.config.base_path)
        want = aspired(model.config.model_version_policy, on_disk)
        for version in sorted(want, reverse=True):
            state = model.versions.get(version)
            if state is not None and state.state in (AVAILABLE, LOADING):
                continue
            mtime = _mtime(on_disk[version])
            if state is not None and state.failed_mtime == mtime:
                continue  # failed before and unchanged since
            self._load(model, version, on_disk[version], mtime)
        with self._lock:
            any_aspired_available = any(
                model.versions.get(v) is not None and model.versions[v].state == AVAILABLE
                for v in want
            )
            for version, state in model.versions.items():
                if version in want or state.state != AVAILABLE:
                    continue
                if not any_aspired_available and on_disk and version in on_disk:
                    continue  # keep serving until a replacement is AVAILABLE
                log.info("unloading %s version %d", model.name, version)
                state.state = UNLOADING
                # Requests already running hold their own reference to the Servable.
                state.servable = None
                state.state = END

    def _load(self, model: Model, version: int, path: Path, mtime: float) -> None:
        with self._lock:
            state = model.versions.setdefault(version, VersionState())
            state.state, state.error_code, state.error_message = LOADING, "OK", ""
        log.info("loading %s version %d from %s", model.name, version, path)
        start = time.perf_counter()
        try:
            servable = Servable(model.name, version, path)
            load_seconds = time.perf_counter() - start
            if self.warmup:
                warm_start = time.perf_counter()
                servable.warmup()
                self.metrics.warmup_latency(str(path), time.perf_counter() - warm_start)
        except Exception as e:  # noqa: BLE001 - any load failure is reported, never fatal
            message = e.message if isinstance(e, ServingError) else f"{type(e).__name__}: {e}"
            log.error("failed to load %s version %d: %s", model.name, version, message)
            self.metrics.load_attempt(str(path), "FAILED", time.perf_counter() - start)
            with self._lock:
                state.state, state.servable = END, None
                state.error_code, state.error_message = "UNKNOWN", message
                state.failed_mtime = mtime
            return
        self.metrics.load_attempt(str(path), "OK", load_seconds)
        with self._lock:
            state.servable, state.state = servable, AVAILABLE
            state.failed_mtime = None
        log.info(
            "%s version %d AVAILABLE (%.2fs)", model.name, version, time.perf_counter() - start
        )

    # --- lookups ---------------------------------------------------------------------------
    def resolve(self, model_spec: Any) -> Servable:
        """The servable for a ModelSpec (version, label, or latest).

        Raises:
            ServingError: NOT_FOUND / INVALID_ARGUMENT with TF Serving's messages.
        """
        name = model_spec.name
        with self._lock:
            model = self._models.get(name)
            version = _requested_version(model, model_spec)
            if version is not None:
                state = model.versions.get(version) if model else None
                if state is None or state.servable is None:
                    raise not_found(f"Servable not found for request: Specific({name}, {version})")
                return state.servable
            if model is not None:
                live = [v for v, s in model.versions.items() if s.servable is not None]
                if live:
                    servable = model.versions[max(live)].servable
                    assert servable is not None
                    return servable
            raise not_found(f"Servable not found for request: Latest({name})")

    def status(self, model_spec: Any) -> list[tuple[int, VersionState]]:
        """GetModelStatus: (version, state) pairs, newest first."""
        name = model_spec.name
        if not name:
            raise invalid("Missing model name in request.")
        with self._lock:
            model = self._models.get(name)
            version = _requested_version(model, model_spec)
            if version is not None:
                state = model.versions.get(version) if model else None
                if state is None:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [(version, _copy(state))]
            if model is None or not model.versions:
                raise not_found(f"Could not find any versions of model {name}")
            return [(v, _copy(s)) for v, s in sorted(model.versions.items(), reverse=True)]

    def models(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def wait_available(self, timeout: float) -> bool:
        """True once every configured model has an AVAILABLE version (or the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                ready = all(
                    any(s.state == AVAILABLE for s in m.versions.values())
                    for m in self._models.values()
                )
            if ready:
                return True
            time.sleep(0.05)
        return False


def _requested_version(model: Model | None, model_spec: Any) -> int | None:
    """The version a ModelSpec names (directly or by label); None for "latest".

    Raises:
        ServingError: INVALID_ARGUMENT for a label the model does not have.
    """
    choice = model_spec.WhichOneof("version_choice")
    if choice == "version_label":
        label = model_spec.version_label
        if model is None or label not in model.labels:
            raise invalid(f"Unrecognized servable version label: {label}")
        return model.labels[label]
    if choice == "version":
        return int(model_spec.version.value)
    return None


def _copy(state: VersionState) -> VersionState:
    return VersionState(state.state, state.error_code, state.error_message)


def _mtime(path: Path) -> float:
    try:
        return max(p.stat().st_mtime for p in [path, *path.rglob("*")])
    except OSError:
        return 0.0
