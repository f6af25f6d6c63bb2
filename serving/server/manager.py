"""Model management with TF Serving's semantics.

* Each model's ``base_path`` is polled every ``--file_system_poll_wait_seconds``; children
  named by an integer are versions (a failed load is retried ``--max_num_load_retries`` times,
  ``--load_retry_interval_micros`` apart, then reported until the version goes away).
* The version policy (``latest {num_versions}``, default 1; ``all``; ``specific {versions}``)
  picks the aspired versions.
* Availability is preserved (AvailabilityPreservingPolicy): aspired versions are loaded (and
  warmed up) first; a version that is no longer aspired is unloaded only once an aspired
  version is AVAILABLE, so a version that fails to load leaves the previous one serving, with
  the error and its code in GetModelStatus.
* Version labels are checked before anything loads and may only point to AVAILABLE versions
  (FAILED_PRECONDITION otherwise; at start-up that stops the server) unless
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

import grpc
from google.protobuf.message import DecodeError

from serving.server.errors import ServingError, failed_precondition, invalid, not_found
from serving.server.metrics import Metrics
from serving.server.options import LoadOptions
from serving.server.servable import Servable

log = logging.getLogger(__name__)

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


@dataclass
class VersionState:
    state: str = START
    error_code: str = "OK"  # tensorflow.error.Code name, as GetModelStatus reports it
    error_message: str = ""
    servable: Servable | None = None
    attempts: int = 0  # failed load attempts so far
    retry_at: float = 0.0  # monotonic time of the next attempt after a failure


@dataclass
class Model:
    name: str
    config: Any  # ModelConfig
    versions: dict[int, VersionState] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)


def list_versions(base_path: str) -> dict[int, Path]:
    """Children whose name is a non-negative int64, as TF Serving's file-system source sees
    versions; anything else (``.tmp-3``, ``latest``) is ignored.

    Raises:
        OSError: the base path is missing or cannot be listed. TF Serving then emits nothing
            (``PollFileSystemForServable``: "Could not find base path"), so what is loaded
            stays loaded; only an existing, readable base path with no versions unloads.
    """
    out = {}
    for child in Path(base_path).iterdir():
        if child.name.isdigit() and int(child.name) < 2**63 and child.is_dir():
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


def error_code(e: BaseException) -> str:
    """The tensorflow.error.Code name of a load failure, as GetModelStatus reports it."""
    if isinstance(e, ServingError):
        return e.code.name
    code = getattr(e, "error_code", None)  # tf.errors.OpError
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if isinstance(e, FileNotFoundError):
        return "NOT_FOUND"
    if isinstance(e, PermissionError):
        return "PERMISSION_DENIED"
    if isinstance(e, DecodeError):
        return "DATA_LOSS"
    return "UNKNOWN"


def error_message(e: BaseException) -> str:
    """TensorFlow's whole message, without Python's exception class."""
    if isinstance(e, ServingError):
        return e.message
    return str(getattr(e, "message", None) or e)


class ModelManager:
    """Loads, serves and unloads model versions; answers servable lookups."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        allow_unavailable_labels: bool = False,
        poll_seconds: float = 1.0,
        load: LoadOptions | None = None,
    ):
        self.metrics = metrics
        self.allow_unavailable_labels = allow_unavailable_labels
        self.poll_seconds = poll_seconds
        self.load_options = load or LoadOptions()
        self._models: dict[str, Model] = {}
        self._lock = threading.RLock()
        self._reconcile_lock = threading.Lock()  # one reconcile (load/unload pass) at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- configuration ---------------------------------------------------------------------
    def apply_config(self, config: Any, *, wait_for_new: bool = True) -> None:
        """Replace the whole model list (TF Serving's ``ServerCore::ReloadConfig``).

        The labels are checked first, against the versions AVAILABLE now, as TF Serving's
        ``UpdateModelVersionLabelMap`` does before it adds any model: a refused config loads
        and unloads nothing. New models are then loaded before this returns.

        Raises:
            ServingError: INVALID_ARGUMENT for a bad config, FAILED_PRECONDITION for a label
                pointing to a version that is not AVAILABLE.
        """
        configs = {}
        for mc in config.model_config_list.config:
            if mc.name in configs:
                raise invalid(f"Illegal to list model {mc.name} multiple times in config list")
            configs[mc.name] = mc
        # No reconcile pass runs while the model list changes, so none loads a removed model.
        with self._reconcile_lock, self._lock:
            labels = {name: self._checked_labels(name, mc) for name, mc in configs.items()}
            for name in list(self._models):
                if name not in configs:
                    log.info("model %s removed from the config: unloading", name)
                    removed = self._models.pop(name)
                    for state in removed.versions.values():
                        state.state, state.servable = END, None
            for name, mc in configs.items():
                model = self._models.get(name)
                if model is None:
                    model = self._models[name] = Model(name, mc)
                else:
                    model.config = mc
                model.labels = labels[name]
        if wait_for_new:
            self.reconcile()

    def _checked_labels(self, name: str, mc: Any) -> dict[str, int]:
        """A model's new labels, or FAILED_PRECONDITION with TF Serving's message.

        With ``--allow_version_labels_for_unavailable_models`` a label may point to a version
        that is not AVAILABLE only if it is new or keeps its version: an existing label is
        never moved to a version that cannot serve (server_core.cc).
        """
        model = self._models.get(name)
        labels = dict(mc.version_labels)
        for label, version in labels.items():
            if self.allow_unavailable_labels:
                current = model.labels.get(label) if model else None
                if current is None or current == version:
                    continue
            state = model.versions.get(version) if model else None
            if state is None or state.state != AVAILABLE:
                raise failed_precondition(
                    f"Request to assign label to version {version} of model {name}, "
                    "which is not currently available for inference"
                )
        return labels

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
        """One pass over every model: TF Serving's AvailabilityPreservingPolicy."""
        with self._reconcile_lock:
            with self._lock:
                models = list(self._models.values())
            for model in models:
                self._reconcile_model(model)

    def _reconcile_model(self, model: Model) -> None:
        try:
            on_disk = list_versions(model.config.base_path)
        except OSError as e:
            # file_system_storage_path_source.cc's words; what is loaded stays loaded.
            log.error(
                "FileSystemStoragePathSource encountered a filesystem access error: Could not "
                "find base path %s for servable %s with error %s",
                model.config.base_path,
                model.name,
                e.strerror or e,
            )
            return
        want = aspired(model.config.model_version_policy, on_disk)
        now = time.monotonic()
        for version in sorted(want, reverse=True):  # the highest new version first
            state = model.versions.get(version)
            if state is not None and state.state in (AVAILABLE, LOADING):
                continue
            retries = self.load_options.max_num_load_retries
            if (
                state is not None
                and state.attempts
                and (state.attempts > retries or now < state.retry_at)
            ):
                continue  # failed for good, or waiting for --load_retry_interval_micros
            self._load(model, version, on_disk[version])
        with self._lock:
            for version, state in model.versions.items():
                if version not in want:
                    state.attempts = 0  # aspired again later: a fresh set of load attempts
            # Unload a non-aspired version only when nothing is aspired, an aspired version
            # is AVAILABLE, or another non-aspired version still serves: the last AVAILABLE
            # version is never unloaded because a replacement failed or its files went away.
            serving = sorted(
                v for v, s in model.versions.items() if v not in want and s.state == AVAILABLE
            )
            aspired_serving = any(
                model.versions.get(v) is not None and model.versions[v].state == AVAILABLE
                for v in want
            )
            while serving and (not want or aspired_serving or len(serving) > 1):
                version = serving.pop(0)
                log.info("unloading %s version %d", model.name, version)
                state = model.versions[version]
                # Requests already running hold their own reference to the Servable.
                state.state, state.servable = END, None

    def _load(self, model: Model, version: int, path: Path) -> None:
        with self._lock:
            state = model.versions.setdefault(version, VersionState())
            state.state, state.error_code, state.error_message = LOADING, "OK", ""
        options = self.load_options
        log.info("loading %s version %d from %s", model.name, version, path)
        start = time.perf_counter()
        try:
            servable = Servable(
                model.name,
                version,
                path,
                tags=options.saved_model_tags,
                method_name_check=options.enable_signature_method_name_check,
                session_config=options.session_config,
            )
            load_seconds = time.perf_counter() - start
            if options.enable_model_warmup:
                warm_start = time.perf_counter()
                servable.warmup(options.num_request_iterations_for_warmup)
                self.metrics.warmup_latency(str(path), time.perf_counter() - warm_start)
        except Exception as e:  # noqa: BLE001 - any load failure is reported, never fatal
            code, message = error_code(e), error_message(e)
            log.error("failed to load %s version %d: %s: %s", model.name, version, code, message)
            self.metrics.load_attempt(str(path), "FAILED", time.perf_counter() - start)
            with self._lock:
                state.attempts += 1
                state.retry_at = time.monotonic() + options.load_retry_interval_seconds
                state.state, state.servable = END, None
                state.error_code, state.error_message = code, message
            return
        self.metrics.load_attempt(str(path), "OK", load_seconds)
        with self._lock:
            if self._models.get(model.name) is not model:
                log.info("%s was removed from the config while loading: dropped", model.name)
                state.state = END
                return
            state.servable, state.state = servable, AVAILABLE
            state.attempts = 0
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
