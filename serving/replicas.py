"""Every serving replica a promotion must see, and waiting until all of them agree.

A promotion on N replicas is safe only if step 2 (the label moves) reaches no replica before
step 1 (the new version loads next to the old one): TF Serving refuses to move an existing label
onto a version that is not AVAILABLE there, and keeps its old config when it refuses. Kubelets
deliver a ConfigMap to each pod after their own delay, so the promotion waits until *every*
ready replica reports the new version AVAILABLE before publishing step 2, then checks every
replica again until each one resolves each label to the expected version.

Replicas are named by specs, resolved again at every check (pods come and go):

- ``HOST:PORT``: one server.
- ``dns:NAME:PORT``: every address NAME resolves to; for a headless Service, its ready pods.
- ``@FILE``: one ``HOST:PORT`` per line (an endpoints list kept by something else).
- ``kube:NAMESPACE/SERVICE:PORT``: the endpoints of a Service that publishes not-ready
  addresses (k8s/base/service-replicas.yaml), less the terminating ones, each reached through its
  own ``kubectl port-forward pod/NAME`` (for a promotion run outside the cluster, e.g. CI).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from serving.client import ServingClient
from serving.errors import ServingClientError

log = logging.getLogger(__name__)


class ReplicaError(Exception):
    """A replica did not reach the expected state in time (which one and what it said)."""


class Replicas:
    """The serving replicas named by ``specs`` with one client per resolved target."""

    def __init__(self, specs: Iterable[str], model: str, kubectl: str = "kubectl"):
        self.specs = [s for s in specs if s]
        self.model, self.kubectl = model, kubectl
        self._clients: dict[str, ServingClient] = {}
        self._forwards: dict[tuple[str, str, int], tuple[subprocess.Popen[str], str]] = {}
        for spec in self.specs:
            _parse(spec)  # fail on a malformed spec before anything changes

    def __bool__(self) -> bool:
        return bool(self.specs)

    def targets(self) -> list[str]:
        """Every replica's HOST:PORT now (sorted, deduplicated)."""
        found: set[str] = set()
        for spec in self.specs:
            kind, value = _parse(spec)
            if kind == "host":
                found.add(value)
            elif kind == "dns":
                host, port = value.rsplit(":", 1)
                found |= {_join(a, port) for a in _resolve(host, int(port))}
            elif kind == "file":
                path = Path(value)
                lines = path.read_text().split() if path.exists() else []
                found |= set(lines)
            else:
                found |= set(self._kube_targets(value))
        return sorted(found)

    def client(self, target: str) -> ServingClient:
        if target not in self._clients:
            self._clients[target] = ServingClient(target, model=self.model, timeout=10)
        return self._clients[target]

    def reload_config(self, config: Any) -> None:
        """HandleReloadConfigRequest on every replica (for servers not polling a file)."""
        for target in self.targets():
            self.client(target).reload_config(config)

    def wait_available(self, version: int, deadline: float) -> list[str]:
        """Until every replica reports ``version`` AVAILABLE; returns the replicas checked."""

        def check(client: ServingClient) -> str:
            states = {s.version: s for s in client.status()}
            s = states.get(version)
            if s is not None and s.state == "END" and s.error_message:
                raise ReplicaError(f"version {version} failed to load: {s.error_message}")
            return "" if s is not None and s.state == "AVAILABLE" else f"v{version} {s}"

        return self._until_all(check, deadline, f"version {version} AVAILABLE")

    def wait_unloaded(self, versions: set[int], deadline: float) -> list[str]:
        """Until no replica serves any of ``versions`` (before their files are deleted)."""

        def check(client: ServingClient) -> str:
            live = {s.version for s in client.status() if s.state != "END"}
            left = sorted(live & versions)
            return f"still loaded: {left}" if left else ""

        return self._until_all(check, deadline, f"versions {sorted(versions)} unloaded")

    def wait_labels(self, labels: dict[str, int], deadline: float) -> list[str]:
        """Until every replica resolves each label to its version (GetModelMetadata by label)."""

        def check(client: ServingClient) -> str:
            wrong = []
            for label, version in sorted(labels.items()):
                try:
                    got: int | str = client.metadata(label=label, refresh=True).version
                except ServingClientError as e:
                    got = str(e).splitlines()[0][:120]
                if got != version:
                    wrong.append(f"{label}→{got} (want {version})")
            return ", ".join(wrong)

        return self._until_all(check, deadline, f"labels {labels}")

    def _until_all(self, check: Callable[[ServingClient], str], deadline: float, what: str):
        end = time.monotonic() + deadline
        while True:
            targets = self.targets()
            pending = {}
            for target in targets:
                try:
                    problem = check(self.client(target))
                except ReplicaError as e:
                    raise ReplicaError(f"replica {target}: {e}") from e
                except ServingClientError as e:  # not up yet, restarting, model not loaded
                    problem = str(e).splitlines()[0][:200]
                if problem:
                    pending[target] = problem
            if targets and not pending:
                return targets
            if time.monotonic() >= end:
                detail = "; ".join(f"{t}: {p}" for t, p in pending.items()) or "no replicas found"
                raise ReplicaError(f"not every replica has {what} after {deadline:g}s: {detail}")
            time.sleep(0.2)

    # --- kube: one port-forward per ready pod ---------------------------------------------------

    def _kube_targets(self, value: str) -> list[str]:
        namespace, rest = value.split("/", 1)
        service, port = rest.rsplit(":", 1)
        out = subprocess.run(
            [self.kubectl, "-n", namespace, "get", "endpointslices", "-o", "json", "-l",
             f"kubernetes.io/service-name={service}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if out.returncode:
            raise ReplicaError(f"kubectl get endpointslices for {value}: {out.stderr.strip()}")
        pods = {
            ep["targetRef"]["name"]
            for item in json.loads(out.stdout).get("items", [])
            for ep in item.get("endpoints", [])
            # Every pod that is not going away, ready or not (the Service publishes not-ready
            # addresses): a pod still loading must also reach each step.
            if not ep.get("conditions", {}).get("terminating", False) and ep.get("targetRef")
        }
        for key in [k for k in self._forwards if k[0] == namespace and k[1] not in pods]:
            self._forwards.pop(key)[0].terminate()  # the pod is gone
        return [self._forward(namespace, pod, int(port)) for pod in sorted(pods)]

    def _forward(self, namespace: str, pod: str, port: int) -> str:
        key = (namespace, pod, port)
        proc, target = self._forwards.get(key, (None, ""))
        if proc is not None and proc.poll() is None:
            return target
        proc = subprocess.Popen(
            [self.kubectl, "-n", namespace, "port-forward", f"pod/{pod}", f":{port}",
             "--address", "127.0.0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:43125 -> 8500"
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not match:
            proc.terminate()
            raise ReplicaError(f"kubectl port-forward pod/{pod}: {line.strip() or 'no output'}")
        target = f"127.0.0.1:{match.group(1)}"
        self._forwards[key] = (proc, target)
        self._clients.pop(target, None)
        return target

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        for proc, _ in self._forwards.values():
            proc.terminate()
        self._forwards.clear()


def _parse(spec: str) -> tuple[str, str]:
    for prefix, kind, pattern in (
        ("dns:", "dns", r"[^:\s]+:\d+"),
        ("@", "file", r".+"),
        ("kube:", "kube", r"[a-z0-9-]+/[a-z0-9-]+:\d+"),
        ("", "host", r"(\[[0-9a-fA-F:]+\]|[^:\s/]+):\d+|unix:.+"),
    ):
        if spec.startswith(prefix):
            value = spec[len(prefix) :]
            if not re.fullmatch(pattern, value):
                break
            return kind, value
    raise ValueError(
        f"{spec!r}: expected HOST:PORT, dns:NAME:PORT, @FILE or kube:NAMESPACE/SERVICE:PORT"
    )


def _resolve(host: str, port: int) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return set()  # no ready pod right now: the caller keeps waiting
    return {str(info[4][0]) for info in infos}


def _join(address: str, port: str) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
