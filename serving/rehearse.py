"""``make rehearse``: the production flow on this machine, with real processes.

Several replicas of the embedded server start with the container args of the rendered
production Deployment (``kubectl kustomize k8s/overlays/production``), paths mapped as the pod's
volumes map them (``/config`` → each replica's own copy of the ConfigMap, ``/models`` → one shared
model store). A "kubelet" per replica delivers every change of the published ``models.config``
after its own random delay, and only the newest content (a kubelet that syncs late skips
intermediate versions), as Kubernetes does with a mounted ConfigMap. An "endpoints controller"
runs the Deployment's readiness probe on each replica. A load generator sends Predict requests
by label to the ready replicas throughout.

Then, as CI and an operator would: train a small model → export v1 → promote it (stable) →
train and export v2 → promote it as canary → start one more replica (scale-out) → finalize →
roll back, each step with ``python -m serving.promote`` against every replica
(``--server @ENDPOINTS --servers-poll``). One line per phase, then a summary; the exit status is
0 only with 0 failed requests and every replica serving the expected version per label.

Time is compressed: the config poll and the kubelet delay are seconds, not minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.promote import free_port

ROOT = Path(__file__).resolve().parent.parent
MOUNTS = ("/config", "/models")
# Deployment flags whose production values are scaled down for a rehearsal that takes minutes.
COMPRESSED = {"model_config_file_poll_wait_seconds": "1", "file_system_poll_wait_seconds": "1"}


class RehearsalError(Exception):
    pass


# --- the rendered production Deployment --------------------------------------------------------


@dataclass
class Rendered:
    args: list[str]  # the server container's args
    readiness_path: str  # the readiness probe's HTTP path
    config_files: dict[str, str]  # the ConfigMap mounted at /config


def render(overlay: Path, kubectl: str) -> Rendered:
    """The production overlay as Kubernetes would receive it."""
    import yaml

    out = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=300
    )
    if out.returncode:
        raise RehearsalError(f"kubectl kustomize {overlay}: {out.stderr.strip()}")
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/config")
    cm_name = volumes[mount["name"]]["configMap"]["name"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
    return Rendered(
        list(container["args"]), container["readinessProbe"]["httpGet"]["path"], cm["data"]
    )


def map_paths(text: str, mounts: dict[str, Path]) -> str:
    """A pod path (/config/…, /models/…) → this machine's path for one replica."""
    for pod_path, local in mounts.items():
        text = re.sub(rf"(?<![\w/]){re.escape(pod_path)}(?=/|\"|$)", str(local), text)
    return text


def replica_args(rendered: Rendered, mounts: dict[str, Path], port: int, rest: int) -> list[str]:
    args = []
    for arg in rendered.args:
        name, _, value = arg.lstrip("-").partition("=")
        if name == "port":
            value = str(port)
        elif name == "rest_api_port":
            value = str(rest)
        elif name in COMPRESSED:
            value = COMPRESSED[name]
        args.append(f"--{name}={map_paths(value, mounts)}" if value or "=" in arg else arg)
    return args


# --- replicas, kubelets, endpoints ---------------------------------------------------------------


@dataclass
class Replica:
    name: str
    config_dir: Path
    port: int
    rest_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    delivered: str = ""
    ready: bool = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


class Cluster:
    """Replicas of one Deployment, each with its kubelet, behind an endpoints list."""

    def __init__(self, work: Path, rendered: Rendered, store: Path, max_delay: float, seed: int):
        self.work, self.rendered, self.store = work, rendered, store
        self.published = store / "production" / "models.config"
        self.max_delay = max_delay
        self.random = random.Random(seed)
        self.replicas: list[Replica] = []
        self.endpoints = work / "endpoints"  # every running pod (publishNotReadyAddresses)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def mounts(self, config_dir: Path) -> dict[str, Path]:
        return {"/config": config_dir, "/models": self.store / "production"}

    def start_replica(self) -> Replica:
        name = f"tfserving-{len(self.replicas)}"
        config_dir = self.work / name / "config"
        config_dir.mkdir(parents=True)
        mounts = self.mounts(config_dir)
        # The pod starts with the ConfigMap as it is now.
        for fname, text in self.rendered.config_files.items():
            (config_dir / fname).write_text(map_paths(text, mounts))
        if self.published.exists():
            self._deliver_text(config_dir, self.published.read_text())
        port, rest = free_port(), free_port()
        args = replica_args(self.rendered, mounts, port, rest)
        log_path = self.work / name / "server.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.server", *args],
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        )
        replica = Replica(name, config_dir, port, rest, proc, log_path)
        replica.delivered = self.published.read_text() if self.published.exists() else ""
        with self._lock:
            self.replicas.append(replica)
            self._write_endpoints()
        self._spawn(self._kubelet, replica)
        self._spawn(self._probe, replica)
        return replica

    def _spawn(self, fn: Callable[[Replica], None], replica: Replica) -> None:
        thread = threading.Thread(target=fn, args=(replica,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _write_endpoints(self) -> None:
        tmp = self.endpoints.with_suffix(".tmp")
        tmp.write_text("".join(f"{r.target}\n" for r in self.replicas if r.proc.poll() is None))
        os.replace(tmp, self.endpoints)

    def _deliver_text(self, config_dir: Path, text: str) -> None:
        # kubelet swaps a symlink: the server reads the old file or the new, never half.
        target = config_dir / "models.config"
        tmp = config_dir / ".models.config.tmp"
        tmp.write_text(map_paths(text, self.mounts(config_dir)))
        os.replace(tmp, target)

    def _kubelet(self, replica: Replica) -> None:
        """Deliver the newest published config after this replica's own random delay."""
        while not self._stop.is_set():
            current = self.published.read_text() if self.published.exists() else ""
            if current and current != replica.delivered:
                with self._lock:
                    delay = self.random.uniform(0, self.max_delay)
                if self._stop.wait(delay):
                    return
                newest = self.published.read_text()  # whatever is current after the delay
                self._deliver_text(replica.config_dir, newest)
                replica.delivered = newest
            self._stop.wait(0.1)

    def _probe(self, replica: Replica) -> None:
        """The readiness probe, as the endpoints controller sees it."""
        url = f"http://127.0.0.1:{replica.rest_port}{self.rendered.readiness_path}"
        while not self._stop.is_set() and replica.proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=3) as r:
                    replica.ready = r.status == 200
            except OSError:
                replica.ready = False
            self._stop.wait(0.5)
        replica.ready = False

    def ready(self) -> list[Replica]:
        return [r for r in self.replicas if r.ready]

    def stop(self) -> None:
        self._stop.set()
        for r in self.replicas:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in self.replicas:
            try:
                r.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                r.proc.kill()


# --- load --------------------------------------------------------------------------------------


@dataclass
class Load:
    """Predict by label, round-robin over the ready replicas, from a few client threads."""

    cluster: Cluster
    model: str
    inputs: dict[str, np.ndarray]
    labels: list[str] = field(default_factory=lambda: ["stable"])
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, threads: int = 2) -> None:
        for i in range(threads):
            threading.Thread(target=self._run, args=(i,), daemon=True).start()

    def _run(self, seed: int) -> None:
        from serving.client import ServingClient

        clients: dict[str, ServingClient] = {}
        counter = itertools.count(seed)
        while not self._stop.is_set():
            ready = self.cluster.ready()
            if not ready:
                time.sleep(0.05)
                continue
            n = next(counter)
            replica = ready[n % len(ready)]
            label = self.labels[n % len(self.labels)]
            if replica.target not in clients:
                clients[replica.target] = ServingClient(replica.target, model=self.model)
            try:
                clients[replica.target].predict(self.inputs, label=label, timeout=10)
            except Exception as e:  # noqa: BLE001 - every failure a client would see counts
                with self._lock:
                    self.failed += 1
                    if len(self.errors) < 10:
                        self.errors.append(f"{replica.name} label={label}: {e}"[:300])
            else:
                with self._lock:
                    self.ok += 1
            time.sleep(0.01)
        for client in clients.values():
            client.close()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.ok, self.failed

    def stop(self) -> None:
        self._stop.set()


# --- the flow ----------------------------------------------------------------------------------


def _run(cmd: list[str], log: Path, what: str) -> None:
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
        f.write(out.stdout + out.stderr)
    if out.returncode:
        raise RehearsalError(
            f"{what} failed (exit {out.returncode}); see {log}\n{(out.stdout + out.stderr)[-1500:]}"
        )


def replica_labels(replica: Replica, model: str, labels: list[str]) -> dict[str, Any]:
    from serving.client import ServingClient

    got: dict[str, Any] = {}
    with ServingClient(replica.target, model=model, timeout=5) as client:
        for label in labels:
            try:
                got[label] = client.metadata(label=label, refresh=True).version
            except Exception as e:  # noqa: BLE001 - reported as the replica's state
                got[label] = type(e).__name__
    return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serving.rehearse",
        description=__doc__.split("\n\n")[0],
        epilog="One line per phase and a summary; exit 0 only with 0 failed requests and every "
        "replica correct after every phase.",
    )
    p.add_argument("--workdir", default="artifacts/rehearsal", help="wiped and rebuilt")
    p.add_argument("--overlay", default="k8s/overlays/production")
    p.add_argument("--kubectl", default=str(ROOT / ".venv-tools/bin/kubectl"))
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--max-delay", type=float, default=3.0, help="kubelet sync delay bound (s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    work = (ROOT / args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "store" / "production").mkdir(parents=True)
    log = work / "commands.log"
    kubectl = args.kubectl if Path(args.kubectl).exists() else shutil.which("kubectl")
    if not kubectl:
        print("rehearse: kubectl not found; run `make check-deploy` once (it installs it)")
        return 2
    rendered = render(ROOT / args.overlay, kubectl)
    config = work / "rehearsal.toml"
    config.write_text("")
    model = _served_model(rendered)
    data = work / "data" / "digits"
    sets = [
        f'artifacts="{work / "artifacts"}"',
        f'export.model_base_path="{work / "store" / "candidates"}"',
        f'data.source="{data}"',
        f"model.name={model}",
        "data.image_size=[8,8]",
        "train.patience=40",  # all 40 epochs: early stopping on 8x8 digits can stop on a bad start
        "export.warmup_records=5",
        "run_id=rehearsal",
    ]
    pipeline = [sys.executable, "-m", "pipeline"]
    common = ["--config", str(config), *itertools.chain(*(("--set", s) for s in sets))]
    promote_sets = [
        "--set",
        f'artifacts="{work / "artifacts"}"',
        "--set",
        "promote.min_metrics={accuracy=0.2}",  # twice the 10-class trivial baseline
        "--set",
        "promote.max_regression=1.0",
        "--set",
        "promote.latency_p99_ms=5000",
        "--set",
        "promote.latency_requests=10",
    ]
    promote = [sys.executable, "-m", "serving.promote"]
    to = ["--to", str(work / "store" / "production")]
    replicas = ["--server", f"@{work / 'endpoints'}", "--servers-poll", "--replica-deadline", "120"]
    approve = ["--approve", "--approver", "rehearsal", "--reason", "make rehearse"]
    serving_base = ["--serving-base-path", "/models"]

    cluster = Cluster(work, rendered, work / "store", args.max_delay, args.seed)
    load: Load | None = None
    phases: list[tuple[str, bool, str]] = []
    expected: dict[str, int] = {}
    t0 = time.monotonic()

    def phase(name: str, step: Callable[[], None]) -> None:
        start = time.monotonic()
        before = load.counts() if load else (0, 0)
        step()
        after = load.counts() if load else (0, 0)
        states = {
            r.name: replica_labels(r, model, sorted(expected))
            for r in cluster.replicas
            if r.proc.poll() is None
        }
        wrong = {n: s for n, s in states.items() if s != expected}
        ok_n, fail_n = after[0] - before[0], after[1] - before[1]
        good = not wrong and fail_n == 0
        detail = (
            f"{time.monotonic() - start:5.1f}s  requests {ok_n + fail_n:5d} failed {fail_n}  "
            f"replicas {len(states)} labels {expected or '-'}"
            + (f"  WRONG {wrong}" if wrong else "")
        )
        phases.append((name, good, detail))
        print(f"[{'ok' if good else 'FAIL'}] {name:<22} {detail}", flush=True)

    try:
        _run([*pipeline, "sample-data", "--dataset", "digits", "--out", str(data)], log, "data")
        for _ in range(args.replicas):
            cluster.start_replica()

        def train_v(seed: int, stages: str) -> Callable[[], None]:
            argv = [*pipeline, "run", "--skip-tune", "--stages", stages, *common]
            return lambda: _run([*argv, "--set", f"train.seed={seed}"], log, "training")

        def promote_step(*argv: str) -> Callable[[], None]:
            return lambda: _run([*promote, *argv], log, " ".join(argv[:2]))

        phase("train+export v1", train_v(1, "ingest,train,evaluate,export"))
        expected = {"stable": 1}
        phase(
            "promote v1 (stable)",
            promote_step(
                model, "1", "--from", str(work / "store" / "candidates"), *to,
                "--config", str(config), *promote_sets, *replicas, *approve, *serving_base,
            ),
        )  # fmt: skip
        load = Load(cluster, model, _inputs(work, model))
        load.start()
        time.sleep(2)
        phase("train+export v2", train_v(2, "train,evaluate,export"))
        expected = {"stable": 1, "canary": 2}
        phase(
            "promote v2 (canary)",
            promote_step(
                model, "2", "--from", str(work / "store" / "candidates"), *to, "--canary",
                "--config", str(config), *promote_sets, *replicas, *approve, *serving_base,
            ),
        )  # fmt: skip
        load.labels = ["stable", "canary"]  # clients send canary traffic once it is announced

        def scale_out() -> None:
            replica = cluster.start_replica()
            deadline = time.monotonic() + 120
            while not replica.ready:
                if time.monotonic() > deadline or replica.proc.poll() is not None:
                    raise RehearsalError(f"{replica.name} never became ready; see its log")
                time.sleep(0.2)

        phase("scale-out (+1 replica)", scale_out)
        load.labels = ["stable"]  # canary traffic stops before the canary label goes away
        time.sleep(1)
        expected = {"stable": 2}
        phase(
            "finalize (canary→stable)",
            promote_step("finalize", model, *to, *replicas, *approve[1:], *serving_base),
        )
        expected = {"stable": 1}
        phase(
            "rollback (stable→v1)",
            promote_step("rollback", model, *to, *replicas, *approve[1:], *serving_base),
        )
        time.sleep(2)
    except RehearsalError as e:
        print(f"[FAIL] {e}", flush=True)
        phases.append(("error", False, str(e)))
    finally:
        if load:
            load.stop()
        time.sleep(0.2)
        ok_n, fail_n = load.counts() if load else (0, 0)
        states = {r.name: replica_labels(r, model, sorted(expected)) for r in cluster.replicas}
        cluster.stop()
    good = all(p[1] for p in phases) and fail_n == 0 and len(phases) >= 7
    print(
        f"rehearsal {'PASSED' if good else 'FAILED'} in {time.monotonic() - t0:.0f}s: "
        f"{len(cluster.replicas)} replicas, {ok_n + fail_n} requests, {fail_n} failed; "
        f"labels per replica {json.dumps(states)}"
    )
    for err in load.errors if load else []:
        print(f"  failed request: {err}")
    print(f"  logs: {work}/commands.log and {work}/tfserving-*/server.log")
    return 0 if good else 1


def _served_model(rendered: Rendered) -> str:
    """The model the production config serves and the readiness probe watches."""
    match = re.search(r'name:\s*"([^"]+)"', rendered.config_files["models.config"])
    if not match:
        raise RehearsalError("the production models.config names no model")
    name = match.group(1)
    if f"/v1/models/{name}/" not in rendered.readiness_path + "/":
        raise RehearsalError(
            f"readiness probe {rendered.readiness_path} does not watch model {name!r}"
        )
    return name


def _inputs(work: Path, model: str) -> dict[str, np.ndarray]:
    """One test example, shaped as the served signature expects."""
    from pipeline.datasets import load_spec, make_dataset, to_numpy

    spec = load_spec(work / "artifacts" / model / "rehearsal")
    x, _ = to_numpy(make_dataset(spec, "test", batch_size=8, cache=False))
    return {k: v[:1] for k, v in x.items()}


if __name__ == "__main__":
    sys.exit(main())
