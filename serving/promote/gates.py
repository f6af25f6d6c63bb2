"""The gates, each on the staged copy of the candidate: integrity, quality, compatibility,
infra (a fresh server, embedded or docker) and approval; :func:`run_gates` runs them all."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import artifacts as A
from pipeline.config import Config, PromoteConfig
from serving.promote.approval import approval_record
from serving.promote.evaluation import (
    LOWER_IS_BETTER,
    EvalData,
    class_recalls,
    load_eval_data,
    predict_local,
    score,
)
from serving.promote.store import STABLE, Paths, PromotionError, current_labels, manifest_digest

log = logging.getLogger(__name__)


@dataclass
class Gate:
    name: str
    passed: bool
    summary: str
    numbers: dict[str, Any] = field(default_factory=dict)
    needed: str = ""
    seconds: float | None = None

    def line(self) -> str:
        mark = "PASS" if self.passed else ("SKIP" if self.numbers.get("skipped") else "FAIL")
        took = f" ({self.seconds:.1f}s)" if self.seconds is not None else ""
        text = f"[{mark}] {self.name}{took}: {self.summary}"
        return text + (
            f"\n         needed: {self.needed}" if self.needed and not self.passed else ""
        )


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
    recalls = class_recalls(candidate, data)
    if recalls:
        numbers["class_recall"] = recalls
        low = {c: r for c, r in recalls.items() if r < cfg.min_class_recall}
        if low:
            failures.append(
                "recall below promote.min_class_recall "
                f"{cfg.min_class_recall} for class(es) "
                + ", ".join(f"{c!r} ({r:.3f})" for c, r in sorted(low.items()))
            )
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
            "; ".join(failures) + f" (on {data.source})",
            numbers,
            "thresholds "
            + json.dumps({"min": cfg.min_metrics, "max": cfg.max_metrics})
            + f", every class's recall >= {cfg.min_class_recall}"
            + f" and no regression beyond {cfg.max_regression}",
        )
    return Gate("quality", True, f"{headline} on {data.source}; {comparison}", numbers)


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


def _timed(gate: Any, *args: Any) -> Gate:
    start = time.monotonic()
    result: Gate = gate(*args)
    result.seconds = round(time.monotonic() - start, 2)
    return result


def run_gates(
    paths: Paths, candidate: Path, version: int, cfg: Config, args: argparse.Namespace
) -> tuple[list[Gate], EvalData | None]:
    """Every gate, on ``candidate`` (the staged copy, see :func:`stage`); and the evaluation
    data they scored on (to be frozen into the store when this is the first promotion)."""
    labels = current_labels(paths)
    stable = paths.model_dir / str(labels[STABLE]) if STABLE in labels else None
    if stable is not None and not stable.is_dir():
        raise PromotionError(f"{stable}: production's stable version is missing on disk")
    gates = [_timed(gate_integrity, candidate, cfg.promote)]
    data = None
    if not gates[0].passed:
        # A SavedModel is a program: never load one whose files do not verify.
        for name in ("quality", "compatibility", "infra"):
            gates.append(Gate(name, False, "skipped: integrity failed", {"skipped": True}))
    else:
        data = load_eval_data(
            cfg.promote, candidate, Path(cfg.artifacts) / paths.model, paths.prod, paths.model
        )
        gates.append(_timed(gate_quality, candidate, stable, data, cfg.promote))
        gates.append(_timed(gate_compatibility, candidate, stable, args.allow_signature_break))
        gates.append(
            _timed(gate_infra, candidate, paths.model, version, data, cfg.promote, args.runtime)
        )
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
    return gates, data
