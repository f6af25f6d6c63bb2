"""Publishing to every serving replica: the config, the waits for AVAILABLE and for labels,
and retention."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import artifacts as A
from pipeline.config import ConfigError, PromoteConfig
from serving.promote.store import (
    CONFIG_FILE,
    STABLE,
    STATE_FILE,
    Paths,
    PromotionError,
    fault_point,
    manifest_digest,
    model_entry,
    read_server_config,
    read_state,
    set_versions,
    write_server_config,
)

log = logging.getLogger(__name__)


@dataclass
class Publisher:
    """Where a new models.config and new version files go besides the local production dir.

    ``sync_cmd`` (a shell command) copies the production directory where the servers read it
    (e.g. a bucket) after files change and before a config references them. ``kube_configmap``
    (NAMESPACE/NAME) patches the ConfigMap's models.config, which TF Serving polls; servers that
    poll their own copy of the file (``servers_poll``) are only watched; otherwise every replica
    is told with HandleReloadConfigRequest. Each step waits for *every* replica (see
    serving/replicas.py): a label moves only once all of them serve the version.
    """

    paths: Any
    replicas: Any = None  # serving.replicas.Replicas
    serving_base_path: str = ""
    sync_cmd: str = ""
    kube_configmap: str = ""
    servers_poll: bool = False
    deadline: float = 600.0
    kubectl: str = "kubectl"

    def base_path(self) -> str:
        root = self.serving_base_path.rstrip("/") or str(self.paths.prod.resolve())
        return f"{root}/{self.paths.model}"

    def sync(self) -> None:
        if not self.sync_cmd:
            return
        result = subprocess.run(self.sync_cmd, shell=True, capture_output=True, text=True)
        if result.returncode:
            raise PromotionError(
                f"--sync-cmd failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )

    def publish(self, config: Any) -> None:
        write_server_config(self.paths.config, config)
        if self.kube_configmap:
            namespace, _, name = self.kube_configmap.rpartition("/")
            patch = json.dumps({"data": {CONFIG_FILE: self.paths.config.read_text()}})
            cmd = [self.kubectl, "patch", "configmap", name, "--type", "merge", "-p", patch]
            if namespace:
                cmd[1:1] = ["-n", namespace]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                raise PromotionError(
                    f"kubectl patch configmap {self.kube_configmap} failed: "
                    f"{(result.stderr or result.stdout).strip()[-500:]}"
                )
        elif self.replicas and not self.servers_poll:
            self._on_replicas(lambda: self.replicas.reload_config(config))

    def wait_available(self, version: int) -> None:
        if self.replicas:
            seen = self._on_replicas(lambda: self.replicas.wait_available(version, self.deadline))
            print(f"  v{version} AVAILABLE on {len(seen)} replica(s): {', '.join(seen)}")

    def verify(self, labels: dict[str, int]) -> None:
        if self.replicas:
            seen = self._on_replicas(lambda: self.replicas.wait_labels(labels, self.deadline))
            print(f"  labels {labels} on {len(seen)} replica(s)")

    def wait_unloaded(self, versions: set[int]) -> None:
        if self.replicas and versions:
            self._on_replicas(lambda: self.replicas.wait_unloaded(versions, self.deadline))

    def _on_replicas(self, step: Any) -> Any:
        from serving.errors import ServingClientError
        from serving.replicas import ReplicaError

        try:
            return step()
        except (ReplicaError, ServingClientError) as e:
            raise PromotionError(str(e)) from e

    def close(self) -> None:
        if self.replicas:
            self.replicas.close()


def push(
    paths: Paths, staged: Path, version: int, label: str, pub: Publisher, cfg: PromoteConfig
) -> dict[str, Any]:
    """Publish the gated copy, load next to the current versions, move the label, retention."""
    paths.model_dir.mkdir(parents=True, exist_ok=True)
    dest = paths.model_dir / str(version)
    if dest.exists():
        if manifest_digest(dest) != manifest_digest(staged):
            raise PromotionError(
                f"{dest}: exists with different contents; versions are never overwritten"
            )
    else:
        os.rename(staged, dest)  # the gated bytes themselves, no second copy
        A.fsync_dir(paths.model_dir)
    pub.sync()
    fault_point("copied")

    config = read_server_config(paths.config)
    mc = model_entry(config, paths.model, pub.base_path())
    labels = dict(mc.version_labels)
    state = read_state(paths.prod, paths.model)
    loaded = set(labels.values()) | ({state["previous"]} if state.get("previous") else set())
    loaded = {v for v in loaded if (paths.model_dir / str(v)).is_dir()}
    # Step 1: the candidate loads next to everything labelled; no label moves yet.
    set_versions(mc, loaded | {version}, labels)
    pub.publish(config)
    fault_point("config_both")
    pub.wait_available(version)
    fault_point("available")

    # Step 2: move the label now that the candidate is AVAILABLE.
    previous = labels.get(label)
    if previous == version:  # a rerun after a kill: the label already moved
        previous = state.get("previous") if label == STABLE else state.get("canary_previous")
    new_labels = dict(labels, **{label: version})
    history = [*state.get("history", []), version]
    new_state = dict(state, history=history)
    if label == STABLE:
        new_state["previous"] = previous
    else:
        new_state["canary_previous"] = previous
    A.write_json(paths.model_dir / STATE_FILE, new_state)
    set_versions(mc, loaded | {version}, new_labels)
    pub.publish(config)
    fault_point("label_moved")
    pub.verify(new_labels)

    removed = apply_retention(paths, cfg.keep_versions, pub)
    fault_point("retention")
    return {"labels": new_labels, "previous": previous, "removed": removed}


def apply_retention(paths: Paths, keep: int, pub: Publisher) -> list[int]:
    """Keep labelled versions, the rollback target and the last ``keep`` promoted; drop the rest."""
    config = read_server_config(paths.config)
    mc = model_entry(config, paths.model, pub.base_path())
    labels = dict(mc.version_labels)
    state = read_state(paths.prod, paths.model)
    history = list(dict.fromkeys(state.get("history", [])))
    keep_set = set(labels.values()) | set(history[-keep:])
    keep_set |= {v for v in (state.get("previous"), state.get("canary_previous")) if v}
    on_disk = {int(p.name) for p in paths.model_dir.iterdir() if p.name.isdigit()}
    drop = sorted(on_disk - keep_set)
    loaded = set(mc.model_version_policy.specific.versions)
    if loaded & set(drop):
        # Unload first, on every replica; only then delete the files they were reading.
        set_versions(mc, loaded - set(drop), labels)
        pub.publish(config)
        pub.wait_unloaded(loaded & set(drop))
    for v in drop:
        shutil.rmtree(paths.model_dir / str(v), ignore_errors=True)
    if drop:
        pub.sync()
    return drop


def _publisher(args: argparse.Namespace, paths: Paths) -> Publisher:
    from serving.replicas import Replicas

    try:
        replicas = Replicas(args.server, args.model)
    except ValueError as e:
        raise ConfigError(f"--server {e}") from e
    return Publisher(
        paths,
        replicas,
        args.serving_base_path,
        args.sync_cmd,
        args.kube_configmap,
        servers_poll=args.servers_poll,
        deadline=args.replica_deadline,
    )
