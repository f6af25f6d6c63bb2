"""Gated promotion to production, canary, rollback and an audit trail.

    python -m serving.promote MODEL VERSION --from models --to production [--approve
        --approver NAME --reason TEXT] [--dry-run] [--canary] [--server SPEC]…
        [--runtime embedded|docker] [--allow-signature-break]
    python -m serving.promote {rollback,finalize} MODEL --to production --approver N --reason R
    python -m serving.promote status MODEL --to production [--server …]
    python -m serving.promote verify-audit --to production

Gates run first and change nothing, all on one staged copy of the candidate: integrity
(manifest, optional signature), quality (thresholds, and no regression against production's
``stable`` with both evaluated now on the same data), compatibility (production's signatures
still accepted), infra validation (a fresh server loads the candidate, replays its warmup,
answers real examples over gRPC matching in-process predictions, within the latency budget) and
approval. Only then the push: rename the staged copy to ``production/MODEL/VERSION``, write
``models.config`` with both versions, wait until *every* serving replica has the candidate
AVAILABLE, then move the label (TF Serving refuses a label on a version that is not AVAILABLE)
and wait until every replica resolves it, apply retention. Every file is replaced atomically; a
lock file keeps two promotions from interleaving; every attempt is recorded, before and after,
in the hash-chained ``production/audit.jsonl`` (serving/audit.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import artifacts as A
from pipeline.artifacts import PipelineError
from pipeline.config import Config, ConfigError, PromoteConfig, load_config
from serving import audit as trail

log = logging.getLogger(__name__)

CONFIG_FILE = "models.config"
STATE_FILE = "promotion.json"
LOCK_FILE = ".promote.lock"
STABLE, CANARY = "stable", "canary"
# Metrics where lower is better; every other metric is better when higher.
LOWER_IS_BETTER = {"rmse", "mae", "loss"}


class PromotionError(PipelineError):
    """The promotion cannot go on; production is untouched (or consistent, see the message)."""


class LockBusy(PromotionError):
    """Another promotion holds the production directory's lock."""


@dataclass
class Gate:
    name: str
    passed: bool
    summary: str
    numbers: dict[str, Any] = field(default_factory=dict)
    needed: str = ""

    def line(self) -> str:
        mark = "PASS" if self.passed else ("SKIP" if self.numbers.get("skipped") else "FAIL")
        text = f"[{mark}] {self.name}: {self.summary}"
        return text + (
            f"\n         needed: {self.needed}" if self.needed and not self.passed else ""
        )


# --- production state ----------------------------------------------------------------------------


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


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def fault_point(step: str) -> None:
    """Fault injection for the kill-at-each-step tests: PROMOTE_KILL_AT=step."""
    if os.environ.get("PROMOTE_KILL_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


# --- evaluation ----------------------------------------------------------------------------------


@dataclass
class EvalData:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray  # class names (classification) or values (regression)
    task: str
    source: str


def load_eval_data(cfg: PromoteConfig, candidate: Path, artifacts: str) -> EvalData:
    from pipeline.datasets import load_spec, make_dataset, to_numpy

    card_path = candidate / A.MODEL_CARD
    if not card_path.exists():
        raise PromotionError(f"{card_path}: missing; was this version exported by the pipeline?")
    card = A.read_json(card_path)
    run_dir = Path(cfg.eval_data) if cfg.eval_data else Path(artifacts) / card["data"]["run_id"]
    if not (run_dir / A.SHARDS).is_dir():
        raise PromotionError(
            f"{run_dir}: no shards to evaluate on; set promote.eval_data to a run directory "
            "(its test split is the golden set)"
        )
    spec = load_spec(run_dir)
    x, y = to_numpy(make_dataset(spec, "test", batch_size=256, cache=False))
    n = min(cfg.eval_examples, len(y))
    x = {k: v[:n] for k, v in x.items()}
    y = y[:n]
    labels = np.array([spec.classes[int(i)] for i in y]) if spec.classes else y.astype(float)
    return EvalData(x, labels, spec.task, f"{run_dir} (test split, {n} examples)")


@functools.lru_cache(maxsize=4)
def _serving_fn(version_dir: Path) -> Any:
    """The version's serving_default, loaded once: the quality and infra gates both call it."""
    import tensorflow as tf

    return tf.saved_model.load(str(version_dir)).signatures["serving_default"]


def predict_local(version_dir: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    fn = _serving_fn(version_dir)
    outs: dict[str, list[np.ndarray]] = {}
    n = len(next(iter(inputs.values())))
    for start in range(0, n, 256):
        batch = {k: tf.constant(v[start : start + 256]) for k, v in inputs.items()}
        for k, v in fn(**batch).items():
            outs.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def model_classes(version_dir: Path) -> list[str]:
    path = version_dir / A.LABELS_FILE
    return path.read_text().splitlines() if path.exists() else []


def score(version_dir: Path, data: EvalData) -> dict[str, float]:
    """Metrics of one version on the evaluation data, computed now."""
    from sklearn.metrics import roc_auc_score

    out = predict_local(version_dir, data.inputs)
    if data.task == "regression":
        pred = out["predictions"].reshape(-1)
        err = pred - data.labels
        ss_tot = float(((data.labels - data.labels.mean()) ** 2).sum())
        return {
            "rmse": float(np.sqrt((err**2).mean())),
            "mae": float(np.abs(err).mean()),
            "r2": 1 - float((err**2).sum()) / ss_tot if ss_tot else 0.0,
        }
    classes = model_classes(version_dir)
    predicted = np.array([c.decode() if isinstance(c, bytes) else str(c) for c in out["classes"]])
    metrics = {"accuracy": float((predicted == data.labels).mean())}
    probs = out["probabilities"]
    truth = np.array([classes.index(c) if c in classes else -1 for c in data.labels])
    if len(set(truth.tolist())) == len(classes) and (truth >= 0).all() and len(classes) > 1:
        if len(classes) == 2:
            metrics["auc"] = float(roc_auc_score(truth, probs[:, 1]))
        else:
            metrics["auc"] = float(roc_auc_score(truth, probs, multi_class="ovr"))
    return metrics


# --- the gates -----------------------------------------------------------------------------------


def gate_integrity(candidate: Path, cfg: PromoteConfig) -> Gate:
    from pipeline.export import verify_manifest

    if not (candidate / "saved_model.pb").is_file():
        return Gate(
            "integrity",
            False,
            f"{candidate} is not a SavedModel version",
            needed="a directory exported by `python -m pipeline export`",
        )
    problems = verify_manifest(candidate)
    numbers: dict[str, Any] = {
        "manifest_sha256": manifest_digest(candidate),
        "problems": problems[:20],
    }
    if cfg.public_key:
        from pipeline.signing import verify_signature

        bad = verify_signature(candidate, cfg.public_key)
        numbers["signature"] = bad or "verified"
        if bad:
            problems.append(f"signature: {bad}")
    if problems:
        return Gate(
            "integrity",
            False,
            f"{len(problems)} problems: " + "; ".join(problems[:5]),
            numbers,
            "every file matching assets.extra/MANIFEST.sha256"
            + (" and a valid signature" if cfg.public_key else ""),
        )
    files = len((candidate / A.MANIFEST).read_text().splitlines())
    return Gate(
        "integrity",
        True,
        f"{files} files match the manifest" + (", signature verified" if cfg.public_key else ""),
        numbers,
    )


def gate_quality(candidate: Path, stable: Path | None, data: EvalData, cfg: PromoteConfig) -> Gate:
    cand = score(candidate, data)
    numbers: dict[str, Any] = {"candidate": cand, "data": data.source}
    failures = []
    for name, bound in cfg.min_metrics.items():
        if name not in cand:
            failures.append(f"{name} not computed for this task")
        elif cand[name] < bound:
            failures.append(f"{name} {cand[name]:.4f} < {bound}")
    for name, bound in cfg.max_metrics.items():
        if name not in cand:
            failures.append(f"{name} not computed for this task")
        elif cand[name] > bound:
            failures.append(f"{name} {cand[name]:.4f} > {bound}")
    compared = sorted(set(cfg.min_metrics) | set(cfg.max_metrics)) or (
        ["rmse"] if data.task == "regression" else ["accuracy"]
    )
    if stable is None:
        comparison = "first promotion: nothing in production to compare with"
    else:
        prod = score(stable, data)
        numbers["stable"] = prod
        numbers["stable_version"] = int(stable.name)
        diffs = []
        for name in compared:
            if name not in cand or name not in prod:
                continue
            worse = (
                (cand[name] - prod[name]) if name in LOWER_IS_BETTER else (prod[name] - cand[name])
            )
            diffs.append(f"{name} {cand[name]:.4f} vs {prod[name]:.4f}")
            if worse > cfg.max_regression:
                failures.append(
                    f"{name} regressed by {worse:.4f} vs stable "
                    f"v{stable.name} (tolerance {cfg.max_regression})"
                )
        comparison = f"vs stable v{stable.name}: " + ", ".join(diffs)
    headline = ", ".join(f"{k}={v:.4f}" for k, v in cand.items())
    if failures:
        return Gate(
            "quality",
            False,
            "; ".join(failures),
            numbers,
            "thresholds "
            + json.dumps({"min": cfg.min_metrics, "max": cfg.max_metrics})
            + f" and no regression beyond {cfg.max_regression}",
        )
    return Gate("quality", True, f"{headline}; {comparison}", numbers)


def _signatures(version_dir: Path) -> dict[str, Any]:
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel.FromString((version_dir / "saved_model.pb").read_bytes())
    graph = next(g for g in sm.meta_graphs if "serve" in g.meta_info_def.tags)
    return {k: v for k, v in graph.signature_def.items() if not k.startswith("__")}


def signature_breaks(candidate: Path, stable: Path) -> list[str]:
    """What a client of ``stable`` would find broken in ``candidate``."""
    new, old = _signatures(candidate), _signatures(stable)
    problems = []
    for name, sig in old.items():
        if name not in new:
            problems.append(f"signature '{name}' removed")
            continue
        cand = new[name]
        for key, info in sig.inputs.items():
            if key not in cand.inputs:
                problems.append(f"{name}: input '{key}' removed")
                continue
            c = cand.inputs[key]
            if c.dtype != info.dtype:
                problems.append(f"{name}: input '{key}' dtype {info.dtype} -> {c.dtype}")
            elif not _shape_accepts(c.tensor_shape, info.tensor_shape):
                problems.append(
                    f"{name}: input '{key}' shape {_dims(info.tensor_shape)} -> "
                    f"{_dims(c.tensor_shape)}"
                )
        for key in set(cand.inputs) - set(sig.inputs):
            problems.append(f"{name}: new required input '{key}'")
        for key, info in sig.outputs.items():
            if key not in cand.outputs:
                problems.append(f"{name}: output '{key}' removed")
            elif cand.outputs[key].dtype != info.dtype:
                problems.append(f"{name}: output '{key}' dtype changed")
        if cand.method_name != sig.method_name:
            problems.append(f"{name}: method {sig.method_name} -> {cand.method_name}")
    return problems


def _dims(shape: Any) -> list[int] | str:
    return "unknown" if shape.unknown_rank else [d.size for d in shape.dim]


def _shape_accepts(new: Any, old: Any) -> bool:
    """True when every tensor ``old`` accepts is accepted by ``new``."""
    if new.unknown_rank:
        return True
    if old.unknown_rank or len(new.dim) != len(old.dim):
        return False
    return all(n.size == -1 or n.size == o.size for n, o in zip(new.dim, old.dim))


def gate_compatibility(candidate: Path, stable: Path | None, allow_break: bool) -> Gate:
    if stable is None:
        return Gate("compatibility", True, "first promotion: no production signatures to keep")
    problems = signature_breaks(candidate, stable)
    numbers = {"breaks": problems, "stable_version": int(stable.name)}
    if problems and allow_break:
        return Gate(
            "compatibility",
            True,
            "deliberate break allowed (--allow-signature-break): " + "; ".join(problems),
            numbers | {"allowed_break": True},
        )
    if problems:
        return Gate(
            "compatibility",
            False,
            "; ".join(problems),
            numbers,
            f"the signatures of stable v{stable.name} (or --allow-signature-break)",
        )
    return Gate(
        "compatibility", True, f"accepts every request stable v{stable.name} accepts", numbers
    )


def gate_infra(
    candidate: Path, model: str, version: int, data: EvalData, cfg: PromoteConfig, runtime: str
) -> Gate:
    """Load the candidate in a fresh server, replay warmup, serve real examples over gRPC."""
    from serving.client import ServingClient

    with tempfile.TemporaryDirectory(prefix="infra-") as tmp:
        base = Path(tmp) / model
        base.mkdir()
        # A copy, not a symlink: a container sees only what is mounted.
        shutil.copytree(candidate, base / str(version))
        try:
            with FreshServer(runtime, model, base) as target:
                client = ServingClient(target, model=model, timeout=30)
                status = client.wait_until_available(version, deadline=120)
                n = min(64, len(data.labels))
                batch = {k: v[:n] for k, v in data.inputs.items()}
                served = client.predict(batch)
                local = predict_local(candidate, batch)
                diffs = [
                    float(np.max(np.abs(np.asarray(served[k], np.float64) - v)))
                    for k, v in local.items()
                    if v.dtype.kind == "f" and k in served
                ]
                max_diff = max(diffs, default=0.0)
                times = []
                for i in range(cfg.latency_requests):
                    one = {k: v[i % n : i % n + 1] for k, v in data.inputs.items()}
                    start = time.perf_counter()
                    client.predict(one)
                    times.append((time.perf_counter() - start) * 1000)
                client.close()
        except Exception as e:  # noqa: BLE001 - any failure to serve is the gate's verdict
            return Gate(
                "infra",
                False,
                f"{runtime} server could not serve the candidate: {e}",
                {"runtime": runtime},
                "a clean load, warmup and answers over gRPC",
            )
    p50, p99 = float(np.percentile(times, 50)), float(np.percentile(times, 99))
    numbers = {
        "runtime": runtime,
        "state": status.state,
        "examples": n,
        "max_abs_diff": max_diff,
        "p50_ms": p50,
        "p99_ms": p99,
    }
    failures = []
    if max_diff > cfg.parity_atol:
        failures.append(f"served vs in-process differ by {max_diff:.3g} > {cfg.parity_atol}")
    if p99 > cfg.latency_p99_ms:
        failures.append(f"p99 {p99:.1f} ms > budget {cfg.latency_p99_ms} ms")
    summary = (
        f"loaded + warmed up on {runtime}, {n} examples match in-process "
        f"(max |diff| {max_diff:.2g}), batch-1 p50 {p50:.1f} ms p99 {p99:.1f} ms "
        f"over {len(times)} requests"
    )
    if failures:
        return Gate(
            "infra",
            False,
            "; ".join(failures),
            numbers,
            f"|diff| <= {cfg.parity_atol} and p99 <= {cfg.latency_p99_ms} ms",
        )
    return Gate("infra", True, summary, numbers)


class FreshServer:
    """A server that has never seen the candidate, for the infra gate (embedded or docker)."""

    def __init__(self, runtime: str, model: str, base: Path):
        self.runtime, self.model, self.base = runtime, model, base
        self._stop: Any = None

    def __enter__(self) -> str:
        if self.runtime == "docker":
            from serving.docker import TFServingContainer

            container = TFServingContainer(
                model_name=self.model,
                model_base_path=self.base,
                port=free_port(),
                rest_api_port=free_port(),
            )
            target = container.start()
            self._stop = container.stop
            return target
        from serving.server.options import options_from_args
        from serving.server.server import ModelServer

        server = ModelServer(
            options_from_args(
                [
                    "--port",
                    str(free_port()),
                    "--rest_api_port",
                    "0",
                    "--model_name",
                    self.model,
                    "--model_base_path",
                    str(self.base),
                ]
            )
        )
        server.start()
        self._stop = lambda: server.stop(grace=0)
        return f"127.0.0.1:{server.port}"

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._stop()


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (for servers this process starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def approval_record(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str]:
    """(record, problem): who approved, from the GitHub environment's reviewers or the CLI.

    Under ``--approval-from-github ENV`` the record is a review that approved this workflow run's
    deployment to ENV, read from the GitHub API (``/actions/runs/RUN/approvals``): the person who
    clicked Approve, never whoever started the run. With no such review (the environment has no
    required reviewers) there is no record and the approval gate fails.
    """
    if args.approval_from_github:
        return github_approval(args.approval_from_github)
    if args.approve and args.approver and args.reason:
        return {"approver": args.approver, "reason": args.reason, "via": "cli"}, ""
    return None, "--approve with --approver NAME and --reason TEXT, or --approval-from-github ENV"


def github_approval(environment: str) -> tuple[dict[str, Any] | None, str]:
    import urllib.error
    import urllib.request

    env = os.environ
    missing = [k for k in ("GITHUB_REPOSITORY", "GITHUB_RUN_ID", "GITHUB_TOKEN") if not env.get(k)]
    if missing:
        return None, f"--approval-from-github needs {', '.join(missing)} (a GitHub Actions job)"
    api = env.get("GITHUB_API_URL", "https://api.github.com").rstrip("/")
    run = f"{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
    request = urllib.request.Request(
        f"{api}/repos/{run}/approvals",
        headers={
            "Authorization": f"Bearer {env['GITHUB_TOKEN']}",
            "Accept": "application/vnd.github+json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            reviews = json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as e:
        return None, f"reading this run's environment approvals from {api}: {e}"
    approved = [
        r
        for r in reviews
        if r.get("state") == "approved"
        and any(e.get("name") == environment for e in r.get("environments", []))
    ]
    if not approved:
        return None, (
            f"an approval of this run by a required reviewer of the '{environment}' environment "
            "(Settings → Environments → required reviewers; see docs/production.md)"
        )
    review = approved[-1]
    url = f"{env.get('GITHUB_SERVER_URL', 'https://github.com')}/{run}"
    return {
        "approver": review["user"]["login"],
        "reason": review.get("comment") or f"approved the '{environment}' deployment of {url}",
        "via": f"github-environment:{environment}",
        "run_url": url,
    }, ""


# --- promotion -----------------------------------------------------------------------------------


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


def run_gates(
    paths: Paths, candidate: Path, version: int, cfg: Config, args: argparse.Namespace
) -> list[Gate]:
    """Every gate, on ``candidate`` (the staged copy, see :func:`stage`)."""
    labels = current_labels(paths)
    stable = paths.model_dir / str(labels[STABLE]) if STABLE in labels else None
    if stable is not None and not stable.is_dir():
        raise PromotionError(f"{stable}: production's stable version is missing on disk")
    gates = [gate_integrity(candidate, cfg.promote)]
    if not gates[0].passed:
        # A SavedModel is a program: never load one whose files do not verify.
        for name in ("quality", "compatibility", "infra"):
            gates.append(Gate(name, False, "skipped: integrity failed", {"skipped": True}))
    else:
        data = load_eval_data(cfg.promote, candidate, cfg.artifacts)
        gates.append(gate_quality(candidate, stable, data, cfg.promote))
        gates.append(gate_compatibility(candidate, stable, args.allow_signature_break))
        gates.append(gate_infra(candidate, paths.model, version, data, cfg.promote, args.runtime))
    record, problem = approval_record(args)
    if args.dry_run:
        gates.append(
            Gate(
                "approval",
                True,
                "dry run: approval not needed, nothing will change",
                {"record": record},
            )
        )
    elif record is None:
        gates.append(Gate("approval", False, "no approval record", {}, problem))
    else:
        gates.append(
            Gate(
                "approval",
                True,
                f"approved by {record['approver']}: {record['reason']}",
                {"record": record},
            )
        )
    return gates


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


@contextlib.contextmanager
def attempt(prod: Path, wait_lock: float, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One audited attempt under the production lock.

    A ``started`` record goes into the trail before anything changes, the outcome record after,
    whatever happens: refused, done, a PipelineError, any other exception (``crashed``), or the
    lock held by someone else (``lock busy``, recorded without the lock). A kill leaves the
    ``started`` record alone, which ``verify-audit`` reports as unfinished.
    """
    record = dict(record, attempt=uuid.uuid4().hex, git_commit=git_commit())
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


def promote(args: argparse.Namespace, cfg: Config) -> int:
    paths = Paths(Path(args.source), Path(args.to), args.model)
    label = CANARY if args.canary else STABLE
    base = {
        "action": "promote",
        "model": args.model,
        "version": args.version,
        "label": label,
        "dry_run": args.dry_run,
    }
    staged: Path | None = None
    with attempt(paths.prod, args.wait_lock, base) as record:
        try:
            staged = stage(paths, args.version)
            record["manifest_sha256"] = manifest_digest(staged)
            gates = run_gates(paths, staged, args.version, cfg, args)
            record["gates"] = [asdict(g) for g in gates]
            approval = next(g for g in gates if g.name == "approval")
            record["approval"] = approval.numbers.get("record")
            print(f"promotion of {args.model} v{args.version} → {label}")
            for g in gates:
                print("  " + g.line())
            if not all(g.passed for g in gates):
                failed = [g.name for g in gates if not g.passed]
                record["outcome"] = "refused"
                print(f"REFUSED by gate(s) {', '.join(failed)}; production is untouched")
                return 1
            if args.dry_run:
                record["outcome"] = "dry-run passed"
                print("DRY RUN: every gate passed; nothing was changed")
                return 0
            pub = _publisher(args, paths)
            try:
                result = push(paths, staged, args.version, label, pub, cfg.promote)
            finally:
                pub.close()
            record.update(outcome="promoted", result=result)
            print(
                f"PROMOTED {args.model} v{args.version} as {label} (previous: "
                f"{result['previous']}); removed by retention: {result['removed'] or 'none'}"
            )
            return 0
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)  # refused, dry run, failed: not published


def move_label(args: argparse.Namespace, action: str) -> int:
    """rollback (stable → previous) and finalize (canary → stable), approved like a promotion.

    The move is recorded as ``pending`` in promotion.json before any label changes, so a rerun
    after a kill at any step completes the same move (same target, same rollback target).
    """
    paths = Paths(Path(args.to), Path(args.to), args.model)
    if args.emergency:
        approval = {"emergency": True, "operator": _operator(), "reason": args.emergency}
    elif args.approver and args.reason:
        approval = {"approver": args.approver, "reason": args.reason, "via": "cli"}
    else:
        raise ConfigError(
            f"{action} needs --approver NAME --reason TEXT (or --emergency REASON, recorded "
            "as an emergency with the operating system user)"
        )
    base = {"action": action, "model": args.model, "approval": approval}
    with attempt(paths.prod, args.wait_lock, base) as record:
        pub = _publisher(args, paths)
        try:
            config = read_server_config(paths.config)
            mc = model_entry(config, args.model, pub.base_path())
            labels = dict(mc.version_labels)
            state = read_state(paths.prod, args.model)
            pending = state.get("pending") or {}
            if pending.get("action") == action:  # a rerun after a kill: the same move
                target, previous = pending["to"], pending["from"]
            elif action == "rollback":
                target, previous = state.get("previous"), labels.get(STABLE)
                if not target or not (paths.model_dir / str(target)).is_dir():
                    raise PromotionError(f"{args.model}: no previous version to roll back to")
            else:
                if CANARY not in labels:
                    raise PromotionError(f"{args.model}: no canary label to finalize")
                target, previous = labels[CANARY], labels.get(STABLE)
            state["pending"] = {"action": action, "from": previous, "to": target}
            A.write_json(paths.model_dir / STATE_FILE, state)
            fault_point(f"{action}_pending")
            new_labels = {k: v for k, v in labels.items() if k != CANARY or action != "finalize"}
            new_labels[STABLE] = target
            loaded = set(mc.model_version_policy.specific.versions) | {target}
            loaded = {v for v in loaded if (paths.model_dir / str(v)).is_dir()}
            # Load the target everywhere first (a rollback after retention, say).
            set_versions(mc, loaded, labels)
            pub.publish(config)
            pub.wait_available(target)
            set_versions(mc, loaded, new_labels)
            pub.publish(config)
            fault_point(f"{action}_labels")
            pub.verify(new_labels)
            state.pop("pending")
            A.write_json(paths.model_dir / STATE_FILE, dict(state, previous=previous))
            record.update(outcome="done", version=target, labels=new_labels)
            print(f"{action}: {args.model} stable → v{target} (labels {new_labels})")
            return 0
        finally:
            pub.close()


def _operator() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _approved_by(approval: dict[str, Any] | None) -> str:
    if not approval:
        return ""
    if approval.get("emergency"):
        return f" EMERGENCY by {approval.get('operator')} ({approval.get('reason')})"
    return f" by {approval.get('approver')}"


def verify_audit(args: argparse.Namespace) -> int:
    problems, unfinished = trail.verify(Path(args.to))
    for line in problems:
        print(f"TAMPERED {line}")
    for line in unfinished:
        print(f"unfinished {line}")
    records = len(trail.read(Path(args.to))) if (Path(args.to) / trail.AUDIT_FILE).exists() else 0
    print(f"{Path(args.to) / trail.AUDIT_FILE}: {records} records, chain "
          + ("BROKEN" if problems else "intact"))  # fmt: skip
    return 1 if problems else 0


def status(args: argparse.Namespace) -> int:
    paths = Paths(Path(args.to), Path(args.to), args.model)
    config = read_server_config(paths.config)
    mc = next((m for m in config.model_config_list.config if m.name == args.model), None)
    if mc is None:
        print(f"{args.model}: not in {paths.config}")
        return 1
    state = read_state(paths.prod, args.model)
    on_disk = sorted(int(p.name) for p in paths.model_dir.iterdir() if p.name.isdigit())
    print(
        f"{args.model}: configured versions {list(mc.model_version_policy.specific.versions)},"
        f" on disk {on_disk}, labels {dict(mc.version_labels)}, "
        f"rollback target {state.get('previous')}"
    )
    pub = _publisher(args, paths)
    try:
        for target in pub.replicas.targets():
            client = pub.replicas.client(target)
            for s in client.status():
                print(
                    f"  {target}: version {s.version} {s.state}"
                    + (f" ({s.error_message})" if s.error_message else "")
                )
    finally:
        pub.close()
    if (paths.prod / trail.AUDIT_FILE).exists():
        lines = [r for r in trail.read(paths.prod) if r.get("event") != "started"]
        for rec in [r for r in lines if r.get("model") == args.model][-5:]:
            print(
                f"  {rec['time']} {rec['action']} v{rec.get('version')} → {rec.get('outcome')}"
                + _approved_by(rec.get("approval"))
            )
    return 0


# --- command line --------------------------------------------------------------------------------

COMMANDS = {
    "rollback": "Move 'stable' back to the previous promoted version (loaded first if needed).",
    "finalize": "Make the 'canary' version 'stable' and drop the canary label.",
    "status": "Versions, labels, the rollback target and the last promotions of a model.",
    "verify-audit": "Check audit.jsonl's hash chain (edits, deletions, reorders) and list "
    "attempts that started with no outcome. Exit 1 when the chain is broken.",
}
EPILOG = """\
commands: python -m serving.promote MODEL VERSION … (promote),
          python -m serving.promote {rollback,finalize} MODEL --to DIR --approver NAME --reason TEXT
          python -m serving.promote status MODEL --to DIR [--server SPEC]
          python -m serving.promote verify-audit --to DIR
exit codes: 0 done, 1 refused by a gate or failed (production untouched), 2 invalid arguments or
configuration, 3 another promotion holds the lock."""


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m serving.promote{'' if command == 'promote' else ' ' + command}",
        description=__doc__.split("\n\n")[2] if command == "promote" else COMMANDS[command],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command == "verify-audit":
        p.add_argument("--to", default="production", help="production directory")
        return p
    p.add_argument("model")
    if command in ("rollback", "finalize"):
        p.add_argument(
            "--emergency",
            default="",
            metavar="REASON",
            help="move without an approver; recorded as an emergency with the OS user",
        )
    if command == "promote":
        p.add_argument("version", type=int)
        p.add_argument("--from", dest="source", default="models", help="model repository")
        p.add_argument("--dry-run", action="store_true", help="run every gate, change nothing")
        p.add_argument("--canary", action="store_true", help="move 'canary', not 'stable'")
        p.add_argument(
            "--runtime",
            choices=["embedded", "docker"],
            default="embedded",
            help="server for the infra gate (docker: the tensorflow/serving image)",
        )
        p.add_argument(
            "--allow-signature-break",
            action="store_true",
            help="promote even if production clients' requests would break",
        )
        p.add_argument("--config", help="pipeline TOML with a [promote] section")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="config override, e.g. promote.keep_versions=5",
        )
    p.add_argument("--to", default="production", help="production directory")
    p.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="SPEC",
        help="a serving replica to reload (unless they poll a file) and wait for; repeatable. "
        "HOST:PORT, dns:NAME:PORT (every address of a headless Service), @FILE (one "
        "HOST:PORT per line) or kube:NAMESPACE/SERVICE:PORT (its ready pods through "
        "kubectl port-forward); resolved again at every check",
    )
    p.add_argument(
        "--servers-poll",
        action="store_true",
        help="the servers read models.config themselves (--model_config_file_poll_wait_seconds): "
        "publish the file only, then wait for every replica",
    )
    p.add_argument(
        "--replica-deadline",
        type=float,
        default=600.0,
        help="seconds every replica gets to reach each step (default 600: a kubelet's "
        "ConfigMap sync plus TF Serving's poll plus the load)",
    )
    p.add_argument(
        "--serving-base-path",
        default="",
        help="where servers read production from (e.g. gs://bucket/production, "
        "/models); default: the --to directory itself",
    )
    p.add_argument(
        "--sync-cmd",
        default="",
        help="shell command copying --to where servers read it, run after files "
        "change and before a config references them",
    )
    p.add_argument(
        "--kube-configmap",
        default="",
        metavar="NAMESPACE/NAME",
        help="publish models.config by patching this ConfigMap (TF Serving polls it)",
    )
    p.add_argument("--approve", action="store_true", help="record an approval")
    if command == "promote":
        p.add_argument(
            "--approval-from-github",
            default="",
            metavar="ENV",
            help="in GitHub Actions: the approval is the review that approved this run's "
            "deployment to environment ENV (its required reviewers), read from the API",
        )
    p.add_argument("--approver", default="", help="who approves")
    p.add_argument("--reason", default="", help="why")
    p.add_argument(
        "--wait-lock",
        type=float,
        default=0.0,
        help="wait this long for another promotion to finish (default: fail at once)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    command = argv[0] if argv and argv[0] in COMMANDS else "promote"
    args = _parser(command).parse_args(argv[1:] if command != "promote" else argv)
    try:
        if command == "promote":
            cfg = load_config(args.config, args.overrides)
            return promote(args, cfg)
        if command == "status":
            return status(args)
        if command == "verify-audit":
            return verify_audit(args)
        return move_label(args, command)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LockBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
