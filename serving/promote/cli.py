"""``python -m serving.promote``: the commands (promote, rollback, finalize, status,
verify-audit) over the store, the gates and the publisher."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from pipeline import artifacts as A
from pipeline import console
from pipeline.artifacts import PipelineError
from pipeline.config import Config, ConfigError, load_config
from serving import audit as trail
from serving.promote.approval import _approved_by, _operator
from serving.promote.evaluation import freeze_eval_data
from serving.promote.gates import run_gates
from serving.promote.publish import _publisher, push
from serving.promote.store import (
    CANARY,
    STABLE,
    STATE_FILE,
    LockBusy,
    Paths,
    PromotionError,
    attempt,
    fault_point,
    manifest_digest,
    model_entry,
    read_server_config,
    read_state,
    set_versions,
    stage,
)

log = logging.getLogger(__name__)


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
            gates, data = run_gates(paths, staged, args.version, cfg, args)
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
            if data is not None and data.freeze_from:
                frozen = freeze_eval_data(paths.prod, args.model, data)
                result["eval_set"] = str(frozen.relative_to(paths.prod))
                print(f"froze the evaluation set of later promotions: {frozen}")
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
    from serving.promote import __doc__ as package_doc

    p = argparse.ArgumentParser(
        prog=f"python -m serving.promote{'' if command == 'promote' else ' ' + command}",
        description=(
            (package_doc or "").split("\n\n")[2] if command == "promote" else COMMANDS[command]
        ),
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
            console.quiet_tensorflow()  # the gates load models: no C++ start-up notices
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
