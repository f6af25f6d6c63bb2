"""Promotion: every gate passing and failing on real exported models, approval, dry run, the
two-step label move on a live server, canary/finalize, rollback, retention, kills at each step,
the lock, and the audit trail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import artifacts as A
from pipeline.evaluate import evaluate
from pipeline.export import export, write_manifest
from pipeline.ingest import ingest
from pipeline.train import train
from serving.promote import gate_compatibility, main, read_server_config
from tests.conftest import config, make_images

pytestmark = pytest.mark.integration

APPROVE = ["--approve", "--approver", "alice", "--reason", "better model"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """models/shapes/{1,2} good; 3 trained on swapped labels (bad on the real test split)."""
    from dataclasses import replace

    tmp = tmp_path_factory.mktemp("promote")
    root = make_images(tmp / "imgs", per_class=30)
    cfg = config(
        tmp,
        f'data.source="{root}"',
        "model.name=shapes",
        "train.epochs=6",
        "export.warmup_records=5",
        "run_id=good",
    )
    run_dir = ingest(cfg).run_dir
    for seed in (1, 2):
        train(replace(cfg, train=replace(cfg.train, seed=seed)))
        evaluate(cfg)
        export(cfg)
    swapped = tmp / "swapped"
    shutil.copytree(root / "a", swapped / "b")
    shutil.copytree(root / "b", swapped / "a")
    bad = replace(cfg, run_id="swapped", data=replace(cfg.data, source=str(swapped)))
    ingest(bad)
    train(bad)
    evaluate(bad)
    export(bad)
    # v4: a retrain on data that lost class "b", forced past ingest's absent_class block and
    # export's baseline check (it scores 1.0 on its own one-class test split).
    one_class = tmp / "one-class"
    shutil.copytree(root / "a", one_class / "a")
    lost = replace(
        cfg,
        run_id="one-class",
        data=replace(cfg.data, source=str(one_class)),
        validation=replace(cfg.validation, blocking=("missing_column",)),
        export=replace(cfg.export, allow_below_baseline=True),
    )
    ingest(lost)
    train(lost)
    evaluate(lost)
    export(lost)
    return tmp, cfg, run_dir


@pytest.fixture
def env(repo, tmp_path):
    """A fresh production directory and the argv pieces to promote into it."""
    tmp, cfg, run_dir = repo
    (tmp_path / "p.toml").write_text("")
    prod = tmp_path / "production"
    base = [
        "--from",
        str(Path(cfg.export.model_base_path)),
        "--to",
        str(prod),
        "--config",
        str(tmp_path / "p.toml"),
        "--set",
        f'artifacts="{cfg.artifacts}"',
        "--set",
        f'promote.eval_data="{run_dir}"',  # the golden set: the good run's test split
        "--set",
        "promote.min_metrics={accuracy=0.8}",
        "--set",
        "promote.latency_p99_ms=2000",
        "--set",
        "promote.latency_requests=20",
    ]
    return prod, base, Path(cfg.export.model_base_path) / "shapes"


def labels(prod: Path) -> dict[str, int]:
    config = read_server_config(prod / "models.config")
    return dict(config.model_config_list.config[0].version_labels)


def audit_lines(prod: Path) -> list[dict]:
    """The outcome record of every attempt (each also has a "started" record before it)."""
    lines = [json.loads(line) for line in (prod / "audit.jsonl").read_text().splitlines()]
    return [r for r in lines if r["event"] == "outcome"]


def test_first_promotion_and_audit(env, capsys):
    prod, base, _ = env
    assert main(["shapes", "1", *base, *APPROVE]) == 0
    out = capsys.readouterr().out
    assert "first promotion: nothing in production to compare with" in out
    for gate in ("integrity", "quality", "compatibility", "infra", "approval"):
        assert f"[PASS] {gate}" in out
    assert labels(prod) == {"stable": 1}
    assert (prod / "shapes" / "1" / "saved_model.pb").exists()
    record = audit_lines(prod)[-1]
    assert record["outcome"] == "promoted" and record["approval"]["approver"] == "alice"
    assert len(record["manifest_sha256"]) == 64 and record["git_commit"] is not None
    quality = next(g for g in record["gates"] if g["name"] == "quality")
    assert quality["numbers"]["candidate"]["accuracy"] >= 0.8
    infra = next(g for g in record["gates"] if g["name"] == "infra")
    assert infra["numbers"]["max_abs_diff"] <= 1e-4 and infra["numbers"]["p99_ms"] > 0


def test_approval_is_required_and_dry_run_changes_nothing(env, capsys):
    prod, base, _ = env
    assert main(["shapes", "1", *base]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] approval" in out and "needed: --approve" in out
    assert not (prod / "models.config").exists() and not (prod / "shapes").exists()
    assert main(["shapes", "1", *base, "--dry-run"]) == 0
    assert "DRY RUN" in capsys.readouterr().out
    assert not (prod / "models.config").exists() and not (prod / "shapes").exists()
    assert [r["outcome"] for r in audit_lines(prod)] == ["refused", "dry-run passed"]


def test_worse_model_fails_quality(env, capsys):
    prod, base, _ = env
    assert main(["shapes", "1", *base, *APPROVE]) == 0
    capsys.readouterr()
    assert main(["shapes", "3", *base, *APPROVE]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] quality" in out and "accuracy" in out
    assert labels(prod) == {"stable": 1} and not (prod / "shapes" / "3").exists()
    # The regression check alone catches it too, with the thresholds out of the way.
    assert main(["shapes", "3", *base, "--set", "promote.min_metrics={}", *APPROVE]) == 1
    assert "regressed by" in capsys.readouterr().out


def test_tampered_version_fails_integrity_and_is_never_loaded(env, tmp_path, capsys):
    prod, base, versions = env
    bad_repo = tmp_path / "bad-models" / "shapes"
    shutil.copytree(versions / "1", bad_repo / "7")
    with open(bad_repo / "7" / "variables" / "variables.index", "ab") as f:
        f.write(b"x")
    argv = ["shapes", "7", *base, *APPROVE]
    argv[argv.index("--from") + 1] = str(tmp_path / "bad-models")
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "[FAIL] integrity" in out and "checksum mismatch" in out
    assert "[SKIP] infra: skipped: integrity failed" in out


def test_failing_warmup_fails_infra(env, tmp_path, capsys):
    prod, base, versions = env
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    bad_repo = tmp_path / "warm" / "shapes"
    shutil.copytree(versions / "1", bad_repo / "8")
    warmup = bad_repo / "8" / A.WARMUP_FILE
    with tf.io.TFRecordWriter(str(warmup)) as w:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "shapes"
        req.inputs["wrong"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 8, 8, 1), np.float32)))
        w.write(
            prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=req)
            ).SerializeToString()
        )
    write_manifest(bad_repo / "8")  # a consistent manifest: only the warmup is broken
    argv = ["shapes", "8", *base, *APPROVE]
    argv[argv.index("--from") + 1] = str(tmp_path / "warm")
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "[PASS] integrity" in out and "[FAIL] infra" in out


def test_signature_compatibility(tmp_path, library):
    old = library.copy(tmp_path / "a", 1)
    from tests.servables import build

    renamed = build(tmp_path / "b" / "2", 2, input_name="features")
    same = library.copy(tmp_path / "c", 3)
    gate = gate_compatibility(renamed, old, allow_break=False)
    assert not gate.passed and "input 'x' removed" in gate.summary
    assert "new required input 'features'" in gate.summary
    assert gate_compatibility(same, old, allow_break=False).passed
    allowed = gate_compatibility(renamed, old, allow_break=True)
    assert allowed.passed and allowed.numbers["allowed_break"]


def test_signed_versions(env, tmp_path, capsys):
    """Signing end to end: `python -m pipeline keygen`, a signed manifest verifies in the
    integrity gate; unsigned, or signed with another key, is refused."""
    from pipeline.__main__ import main as pipeline_main
    from pipeline.signing import sign_manifest

    prod, base, versions = env
    key = tmp_path / "keys" / "signing.pem"
    assert pipeline_main(["keygen", "--out", str(key)]) == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert pipeline_main(["keygen", "--out", str(key)]) == 1  # never overwritten
    other = tmp_path / "other.pem"
    assert pipeline_main(["keygen", "--out", str(other)]) == 0
    capsys.readouterr()
    signed = tmp_path / "signed" / "shapes"
    shutil.copytree(versions / "1", signed / "1")
    public = f'promote.public_key="{key}.pub"'
    argv = ["shapes", "1", *base, *APPROVE, "--set", public]
    argv[argv.index("--from") + 1] = str(tmp_path / "signed")
    assert main(argv) == 1
    assert "was not signed" in capsys.readouterr().out
    sign_manifest(signed / "1", other)
    assert main(argv) == 1
    assert "made with another key" in capsys.readouterr().out
    sign_manifest(signed / "1", key)
    assert main(argv) == 0
    assert "signature verified" in capsys.readouterr().out


def test_canary_finalize_rollback_and_retention(env, capsys):
    prod, base, _ = env
    keep1 = [*base, "--set", "promote.keep_versions=1"]
    assert main(["shapes", "1", *keep1, *APPROVE]) == 0
    assert main(["shapes", "2", *keep1, *APPROVE, "--canary"]) == 0
    assert labels(prod) == {"stable": 1, "canary": 2}
    assert main(["finalize", "shapes", "--to", str(prod)]) == 2  # needs an approval
    assert main(["finalize", "shapes", "--to", str(prod), *APPROVE[1:]]) == 0
    assert labels(prod) == {"stable": 2}
    assert main(["rollback", "shapes", "--to", str(prod), "--emergency", "pager 1234"]) == 0
    assert labels(prod) == {"stable": 1}
    emergency = audit_lines(prod)[-1]["approval"]
    assert emergency["emergency"] is True and emergency["reason"] == "pager 1234"
    state = json.loads((prod / "shapes" / "promotion.json").read_text())
    assert state["previous"] == 2
    # Retention keeps labelled versions and the rollback target; nothing else is kept here.
    versions = read_server_config(prod / "models.config").model_config_list.config[0]
    assert set(versions.model_version_policy.specific.versions) == {1, 2}
    assert main(["status", "shapes", "--to", str(prod)]) == 0
    out = capsys.readouterr().out
    assert "labels {'stable': 1}" in out and "rollback" in out
    actions = [r["action"] for r in audit_lines(prod)]
    assert actions == ["promote", "promote", "finalize", "rollback"]


def test_rollback_works_when_the_newest_files_are_damaged(env):
    prod, base, _ = env
    assert main(["shapes", "1", *base, *APPROVE]) == 0
    assert main(["shapes", "2", *base, *APPROVE]) == 0
    (prod / "shapes" / "2" / "saved_model.pb").write_bytes(b"damaged")
    assert main(["rollback", "shapes", "--to", str(prod), *APPROVE[1:]]) == 0
    assert labels(prod) == {"stable": 1}


def test_lock_makes_a_second_promotion_fail_clearly(env, capsys):
    prod, base, _ = env
    from filelock import FileLock

    prod.mkdir(parents=True)
    held = FileLock(str(prod / ".promote.lock"))
    held.acquire()
    try:
        assert main(["shapes", "1", *base, *APPROVE]) == 3
        assert "another promotion is running" in capsys.readouterr().err
    finally:
        held.release()
    assert audit_lines(prod)[-1]["outcome"] == "lock busy"  # a refused attempt is recorded
    assert main(["shapes", "1", *base, *APPROVE]) == 0


def _live_server(serve, prod):
    # As the production Deployment runs it: a restart with labels in the config must start.
    return serve(
        "--model_config_file",
        str(prod / "models.config"),
        "--allow_version_labels_for_unavailable_models",
    )


def test_two_step_label_move_on_a_live_server(env, serve):
    prod, base, _ = env
    from serving.client import ServingClient

    assert main(["shapes", "1", *base, *APPROVE]) == 0
    server = _live_server(serve, prod)
    target = f"127.0.0.1:{server.port}"
    seen, failures = [], []
    stop = threading.Event()

    def poll():
        with ServingClient(target, model="shapes", label="stable") as client:
            x = {"image": np.zeros((1, 8, 8, 1), np.float32)}
            while not stop.is_set():
                try:
                    seen.append(client.predict(x).version)
                except Exception as e:  # noqa: BLE001 - every failure fails the test
                    failures.append(e)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        time.sleep(0.5)
        assert main(["shapes", "2", *base, *APPROVE, "--server", target]) == 0
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert not failures
    assert seen[0] == 1 and seen[-1] == 2
    assert seen[seen.index(2) :] == [2] * (len(seen) - seen.index(2))


STEPS = ["copied", "config_both", "available", "label_moved", "retention", "audit"]


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_killed_at_any_step_keeps_production_consistent(env, serve, step):
    prod, base, _ = env
    from serving.client import ServingClient

    assert main(["shapes", "1", *base, *APPROVE]) == 0
    server = _live_server(serve, prod)
    target = f"127.0.0.1:{server.port}"
    old_config = (prod / "models.config").read_text()
    argv = [
        sys.executable,
        "-m",
        "serving.promote",
        "shapes",
        "2",
        *base,
        *APPROVE,
        "--server",
        target,
    ]
    proc = subprocess.run(
        argv,
        env=dict(os.environ, PROMOTE_KILL_AT=step),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not list(prod.glob("*.tmp*")) and not list(prod.glob(".models.config.*"))
    config_now = (prod / "models.config").read_text()
    assert labels(prod)["stable"] in (1, 2)  # old or new: parses, never a mix
    with ServingClient(target, model="shapes", label="stable") as client:
        assert client.predict({"image": np.zeros((1, 8, 8, 1), np.float32)}).version in (1, 2)
    if step in ("copied", "config_both"):
        assert labels(prod) == {"stable": 1} and config_now != "" and old_config
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert labels(prod)["stable"] == 2
    state = json.loads((prod / "shapes" / "promotion.json").read_text())
    assert state["previous"] == 1


def test_publishing_to_a_configmap_and_a_synced_store(env, tmp_path, monkeypatch):
    prod, base, _ = env
    calls = tmp_path / "kubectl-calls.jsonl"
    fake = tmp_path / "bin" / "kubectl"
    fake.parent.mkdir()
    # A stand-in for the kubectl CLI that records its arguments.
    fake.write_text(
        "#!/usr/bin/env python3\nimport json, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    mirror = tmp_path / "bucket"
    argv = [
        "shapes",
        "1",
        *base,
        *APPROVE,
        "--serving-base-path",
        "gs://bucket/production",
        "--sync-cmd",
        f"mkdir -p {mirror} && cp -r {prod}/. {mirror}/",
        "--kube-configmap",
        "tfserving/tfserving-config",
    ]
    assert main(argv) == 0
    assert (mirror / "shapes" / "1" / "saved_model.pb").exists()
    patches = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(patches) == 2  # step 1 (load next to the labelled), step 2 (move the label)
    assert patches[0][:5] == ["-n", "tfserving", "patch", "configmap", "tfserving-config"]
    first = json.loads(patches[0][-1])["data"]["models.config"]
    second = json.loads(patches[1][-1])["data"]["models.config"]
    assert 'base_path: "gs://bucket/production/shapes"' in first and "stable" not in first
    assert 'key: "stable"' in second


def test_ci_approval_is_the_environment_reviewer(monkeypatch):
    """--approval-from-github reads this run's environment reviews from the API (here a local
    stand-in): the reviewer who approved 'production' is the record, the actor never is."""
    import argparse
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from serving.promote import approval_record

    reviews: list[dict] = []
    seen: list[str] = []

    class Api(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(f"{self.path} {self.headers['Authorization']}")
            body = json.dumps(reviews).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for k, v in {
        "GITHUB_API_URL": f"http://127.0.0.1:{server.server_port}",
        "GITHUB_REPOSITORY": "acme/models",
        "GITHUB_RUN_ID": "77",
        "GITHUB_TOKEN": "t0ken",
        "GITHUB_ACTOR": "mallory",  # started the run; must never become the approver
    }.items():
        monkeypatch.setenv(k, v)
    args = argparse.Namespace(
        approval_from_github="production", approve=True, approver="", reason=""
    )
    try:
        record, problem = approval_record(args)
        assert record is None and "required reviewer of the 'production'" in problem
        assert seen == ["/repos/acme/models/actions/runs/77/approvals Bearer t0ken"]
        reviews.append(
            {"state": "approved", "user": {"login": "bob"}, "comment": "staging looked fine",
             "environments": [{"name": "staging"}]}
        )  # fmt: skip
        assert approval_record(args)[0] is None  # an approval of another environment
        reviews.append(
            {"state": "rejected", "user": {"login": "carol"}, "comment": "",
             "environments": [{"name": "production"}]}
        )  # fmt: skip
        assert approval_record(args)[0] is None
        reviews.append(
            {"state": "approved", "user": {"login": "alice"}, "comment": "ship it",
             "environments": [{"name": "production"}]}
        )  # fmt: skip
        record, _ = approval_record(args)
        assert record is not None
        assert record["approver"] == "alice" and record["reason"] == "ship it"
        assert record["via"] == "github-environment:production"
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "gate", ["gate_integrity", "gate_quality", "gate_compatibility", "gate_infra"]
)
def test_production_gets_exactly_the_gated_bytes(env, tmp_path, monkeypatch, gate):
    """The source's weights are swapped for another model's right after one gate ran: production
    still receives the copy every gate checked, and its manifest verifies."""
    import serving.promote as P
    import serving.promote.gates as G
    from pipeline.export import verify_manifest

    prod, base, models = env
    source = tmp_path / "source"
    for v in (1, 3):
        shutil.copytree(models / str(v), source / "shapes" / str(v))
    argv = ["shapes", "1", "--from", str(source), *base[2:], *APPROVE]
    weights = sorted((source / "shapes" / "1" / "variables").glob("variables.data-*"))[0]
    gated = weights.read_bytes()
    real = getattr(G, gate)

    def gate_then_swap(*args, **kwargs):
        result = real(*args, **kwargs)
        other = source / "shapes" / "3" / "variables" / weights.name
        shutil.copy(other, weights)  # the attacker's model, in the source
        return result

    monkeypatch.setattr(G, gate, gate_then_swap)
    assert main(argv) == 0
    assert weights.read_bytes() != gated  # the swap happened
    published = prod / "shapes" / "1"
    assert (published / "variables" / weights.name).read_bytes() == gated
    assert verify_manifest(published) == []
    (record,) = audit_lines(prod)
    assert record["manifest_sha256"] == P.manifest_digest(published)
    assert not list(prod.glob(".staged-*"))


def test_audit_trail_records_every_attempt_and_detects_tampering(env, monkeypatch, capsys):
    import serving.promote.gates as G

    prod, base, _ = env
    assert main(["shapes", "1", *base, *APPROVE]) == 0

    def broken(*args, **kwargs):
        raise RuntimeError("checksum mismatch in variables")  # not a PipelineError

    monkeypatch.setattr(G, "gate_quality", broken)
    with pytest.raises(RuntimeError):
        main(["shapes", "2", *base, *APPROVE])
    crashed = audit_lines(prod)[-1]
    assert crashed["outcome"] == "crashed" and "checksum mismatch" in crashed["error"]
    assert main(["verify-audit", "--to", str(prod)]) == 0
    assert "4 records, chain intact" in capsys.readouterr().out

    path = prod / "audit.jsonl"
    original = path.read_text().splitlines(keepends=True)
    tampered = {
        "edited": [original[0], original[1].replace('"alice"', '"mallory"'), *original[2:]],
        "deleted": [original[0], *original[2:]],
        "reordered": [original[1], original[0], *original[2:]],
        "truncated": original[:-1],
    }
    for name, lines in tampered.items():
        path.write_text("".join(lines))
        assert main(["verify-audit", "--to", str(prod)]) == 1, name
        assert "TAMPERED" in capsys.readouterr().out
    path.write_text("".join(original))
    assert main(["verify-audit", "--to", str(prod)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("step", ["rollback_pending", "rollback_labels", "audit"])
def test_rollback_killed_at_any_step_completes_on_rerun(env, step, capsys):
    prod, base, _ = env
    assert main(["shapes", "1", *base, *APPROVE]) == 0
    assert main(["shapes", "2", *base, *APPROVE]) == 0
    argv = [sys.executable, "-m", "serving.promote", "rollback", "shapes", "--to", str(prod)]
    argv += APPROVE[1:]
    killed = subprocess.run(
        argv, env=dict(os.environ, PROMOTE_KILL_AT=step), capture_output=True, timeout=300
    )
    assert killed.returncode == -9
    assert labels(prod)["stable"] in (1, 2)
    assert main(["verify-audit", "--to", str(prod)]) == 0
    if step != "audit":  # killed mid-move: started, no outcome; a rerun completes the move
        assert "unfinished" in capsys.readouterr().out
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert labels(prod) == {"stable": 1}
    state = json.loads((prod / "shapes" / "promotion.json").read_text())
    assert state["previous"] == 2 and "pending" not in state


def test_a_one_class_retrain_fails_on_the_frozen_evaluation_set(env, capsys):
    """Without a golden set, the first promotion freezes its test split into production;
    later candidates are scored on that, never on their own split: v4 (trained without class
    "b", 1.0 on its own test split) fails the per-class recall floor. A changed frozen set is
    refused."""
    prod, base, _ = env
    i = next(k for k, arg in enumerate(base) if arg.startswith("promote.eval_data="))
    base = base[: i - 1] + base[i + 1 :]  # no golden set
    assert main(["shapes", "1", *base, *APPROVE]) == 0
    out = capsys.readouterr().out
    assert "frozen into production at this first promotion" in out
    frozen = prod / "evalsets" / "shapes" / "v1"
    assert (frozen / "data.npz").exists() and (frozen / "meta.json").exists()
    assert main(["shapes", "4", *base, *APPROVE]) == 1
    out = capsys.readouterr().out
    assert "frozen evaluation set evalsets/shapes/v1" in out
    assert "[FAIL] quality" in out and "recall below promote.min_class_recall" in out
    assert "'b' (0.000)" in out
    assert labels(prod) == {"stable": 1}
    # The frozen set is fingerprinted: an edit is refused, not silently used.
    data = frozen / "data.npz"
    data.write_bytes(data.read_bytes() + b"\0")
    assert main(["shapes", "2", *base, *APPROVE]) == 1
    assert "frozen evaluation set was changed" in capsys.readouterr().err


def test_a_frozen_evaluation_set_keeps_utf8_text_as_its_bytes(tmp_path):
    """String inputs (bytes, as the test split gives them) and class names outside ASCII are
    frozen and read back unchanged."""
    from serving.promote.evaluation import EvalData, freeze_eval_data, frozen_eval_data

    cities = np.array(["Zürich".encode(), "東京".encode(), b"plain"], dtype=object)
    data = EvalData({"city": cities}, np.array(["oui", "non", "peut-être"]), "multiclass", "x")
    data.freeze_from = str(tmp_path / "run-1")
    freeze_eval_data(tmp_path, "m", data)
    back = frozen_eval_data(tmp_path, "m")
    assert back is not None
    assert back.inputs["city"].tolist() == cities.tolist()
    assert back.labels.tolist() == ["oui", "non", "peut-être"]
