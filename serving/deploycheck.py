"""``python -m serving.deploycheck RENDERED.yaml…``: what the real tensorflow/serving would reject.

Schema validators accept a Deployment whose server would exit at start or never serve. This
checks the rendered manifests (``kubectl kustomize k8s/overlays/ENV``) against what TF Serving
itself does with them:

- every argument of the server container is a ``tensorflow_model_server`` flag of the pinned
  release (``serving.server.options.TF_FLAGS``) with a value of its type;
- the image is ``tensorflow/serving`` at the version of the pinned tensorflow-serving-api;
- every file the flags name is a key of a mounted ConfigMap and parses with the official
  protos (models.config, batching, monitoring), with ServerCore's checks;
- base paths are object-store URIs or under a volume mounted in the container, never a host
  path; labels name versions the config loads; the probes watch a model the config serves;
- ``--allow_version_labels_for_unavailable_models`` is on (promotions add labels; without it a
  new pod exits at start), and no HPA-scaled Deployment sets ``replicas``.

Exit status 1 with one line per problem, 0 when there is none.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SERVER_BINARY = "tensorflow_model_server"
CONFIG_FLAGS = {
    "model_config_file": "ModelServerConfig",
    "batching_parameters_file": "BatchingParameters",
    "monitoring_config_file": "MonitoringConfig",
}
OBJECT_STORES = ("gs://", "s3://", "hdfs://", "az://", "abfs://")


def check_value(kind: str, value: str) -> str:
    """'' when ``value`` parses as TensorFlow's flag parser reads ``kind``, else why not."""
    from serving.server.options import _int, parse_bool

    try:
        if kind == "bool":
            parse_bool(value)
        elif kind in ("int32", "int64"):
            _int(kind)(value)
        elif kind == "float":
            float(value)
    except (argparse.ArgumentTypeError, ValueError) as e:
        return str(e)
    return ""


def check(docs: list[dict[str, Any]], source: str = "") -> list[str]:
    """Problems in one rendered environment (every document of ``kubectl kustomize``)."""
    problems: list[str] = []
    where = f"{source}: " if source else ""
    hpa_targets = {
        d["spec"]["scaleTargetRef"]["name"]
        for d in docs
        if d.get("kind") == "HorizontalPodAutoscaler"
        and d["spec"]["scaleTargetRef"].get("kind") == "Deployment"
    }
    configmaps = {
        d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
    }
    for deploy in (d for d in docs if d.get("kind") == "Deployment"):
        name = deploy["metadata"]["name"]
        here = f"{where}Deployment/{name}"
        if name in hpa_targets and "replicas" in deploy["spec"]:
            problems.append(
                f"{here}: sets replicas while a HorizontalPodAutoscaler scales it (every apply "
                "resets the scale); remove spec.replicas"
            )
        pod = deploy["spec"]["template"]["spec"]
        for container in pod["containers"]:
            command = " ".join(container.get("command", []))
            if SERVER_BINARY in command or "tensorflow/serving" in container.get("image", ""):
                problems += [f"{here}: {p}" for p in _check_server(container, pod, configmaps)]
    return problems


def _check_server(container: dict[str, Any], pod: dict[str, Any], configmaps: dict) -> list[str]:
    from serving.server.options import TF_FLAGS

    problems = []
    image = container.get("image", "")
    match = re.fullmatch(r"tensorflow/serving:(\d+\.\d+)\.\d+(-\w+)?", image)
    pinned = _pinned_release()
    if not match:
        problems.append(f"image {image!r}: expected tensorflow/serving:X.Y.Z")
    elif pinned and match.group(1) != pinned:
        problems.append(
            f"image {image}: the pinned tensorflow-serving-api is {pinned}; the flags and "
            "protos checked here are that release's"
        )
    kinds = {name: kind for name, kind, _, _ in TF_FLAGS}
    flags: dict[str, str] = {}
    for arg in container.get("args", []):
        m = re.fullmatch(r"--?([A-Za-z0-9_]+)(?:=(.*))?", arg)
        if not m:
            problems.append(f"argument {arg!r}: {SERVER_BINARY} takes only --flag=value")
            continue
        flag, value = m.group(1), m.group(2)
        if flag not in kinds:
            problems.append(f"--{flag}: not a {SERVER_BINARY} flag (it would be ignored)")
            continue
        if value is None:
            if kinds[flag] != "bool":
                problems.append(f"--{flag}: needs a value ({kinds[flag]})")
            value = "true"
        bad = check_value(kinds[flag], value)
        if bad:
            problems.append(f"--{flag}={value}: {bad}; the server would exit at start")
        flags[flag] = value

    if flags.get("allow_version_labels_for_unavailable_models", "false").lower() not in (
        "true",
        "1",
    ):
        problems.append(
            "--allow_version_labels_for_unavailable_models=true is missing: after a promotion "
            "models.config carries labels, and a new pod would exit FAILED_PRECONDITION"
        )
    mounts = {m["mountPath"].rstrip("/"): m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    protos: dict[str, Any] = {}
    for flag, message in CONFIG_FLAGS.items():
        path = flags.get(flag)
        if not path:
            continue
        text, problem = _mounted_file(path, mounts, volumes, configmaps)
        if problem:
            problems.append(f"--{flag}={path}: {problem}")
            continue
        proto, parse_problem = _parse(text, message, path)
        if parse_problem:
            problems.append(f"--{flag}={path}: {parse_problem}")
        else:
            protos[flag] = proto
    if "model_config_file" not in flags:
        problems.append("--model_config_file is missing: promotions publish models.config")
    elif "model_config_file" in protos:
        problems += _check_models(protos["model_config_file"], container, mounts)
    return problems


def _mounted_file(
    path: str, mounts: dict[str, Any], volumes: dict[str, Any], configmaps: dict
) -> tuple[str, str]:
    directory, _, key = path.rpartition("/")
    mount = mounts.get(directory)
    if mount is None:
        return "", f"no volume is mounted at {directory}"
    cm = volumes.get(mount["name"], {}).get("configMap")
    if cm is None:
        return "", f"{directory} is not a ConfigMap volume"
    data = configmaps.get(cm["name"])
    if data is None:
        return "", f"ConfigMap {cm['name']} is not in the rendered manifests"
    if key not in data:
        return "", f"ConfigMap {cm['name']} has no key {key!r} (keys: {sorted(data)})"
    return str(data[key]), ""


def _parse(text: str, message: str, path: str) -> tuple[Any, str]:
    """(proto, problem): the file as the server reads it (serving.server.options)."""
    from tensorflow_serving.config import model_server_config_pb2

    from serving.server.options import MESSAGES, OptionsError, check_model_config, parse_text_proto

    is_models = message == "ModelServerConfig"
    proto = model_server_config_pb2.ModelServerConfig() if is_models else MESSAGES[message]()
    try:
        parse_text_proto(text, proto, path)
        if is_models:
            check_model_config(proto)
    except OptionsError as e:
        return None, str(e).replace("\n", "; ")
    return proto, ""


def _check_models(config: Any, container: dict[str, Any], mounts: dict[str, Any]) -> list[str]:
    problems = []
    served = set()
    for mc in config.model_config_list.config:
        served.add(mc.name)
        base = mc.base_path
        if not base.startswith(OBJECT_STORES) and not any(
            base == m or base.startswith(m + "/") for m in mounts
        ):
            problems.append(
                f"model {mc.name}: base_path {base!r} is neither an object-store URI nor under "
                f"a volume mounted in the container ({sorted(mounts)}); a host path?"
            )
        policy = mc.model_version_policy
        if policy.WhichOneof("policy_choice") == "specific":
            listed = set(policy.specific.versions)
            for label, v in mc.version_labels.items():
                if v not in listed:
                    problems.append(
                        f"model {mc.name}: label {label!r} → version {v}, which the "
                        f"specific policy {sorted(listed)} never loads"
                    )
        elif mc.version_labels:
            problems.append(
                f"model {mc.name}: version labels need a specific version policy "
                "(TF Serving loads only the latest otherwise)"
            )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container.get(probe, {}).get("httpGet", {}).get("path", "")
        m = re.match(r"/v1/models/([^/]+)", path)
        if m and m.group(1) not in served:
            problems.append(
                f"{probe} {path}: model {m.group(1)!r} is not in models.config "
                f"(serves {sorted(served)})"
            )
    return problems


def _pinned_release() -> str:
    try:
        return ".".join(version("tensorflow-serving-api").split(".")[:2])
    except PackageNotFoundError:
        return ""


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(
        prog="python -m serving.deploycheck",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )
    p.add_argument("rendered", nargs="+", help="output of kubectl kustomize (one file per env)")
    args = p.parse_args(argv)
    problems = []
    for path in args.rendered:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        problems += check(docs, path)
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
