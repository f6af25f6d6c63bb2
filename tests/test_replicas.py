"""Naming and watching every serving replica (serving/replicas.py), and the rehearsal's mapping of
the production Deployment onto local processes (serving/rehearse.py)."""

from __future__ import annotations

import json
import sys

import pytest

from serving.rehearse import Rendered, map_paths, replica_args
from serving.replicas import ReplicaError, Replicas

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "spec", ["localhost", "dns:svc", "kube:ns/svc", "kube:NS/svc:1", "host:port", ""]
)
def test_malformed_specs_fail_before_anything_changes(spec):
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        Replicas([spec or " "], "m")


def test_file_and_dns_specs_are_resolved_at_each_check(tmp_path):
    endpoints = tmp_path / "endpoints"
    replicas = Replicas([f"@{endpoints}", "dns:localhost:8500", "10.0.0.1:9"], "m")
    assert "127.0.0.1:8500" in replicas.targets() and "10.0.0.1:9" in replicas.targets()
    endpoints.write_text("127.0.0.1:1\n127.0.0.1:2\n")
    assert {"127.0.0.1:1", "127.0.0.1:2"} <= set(replicas.targets())
    endpoints.write_text("127.0.0.1:2\n")  # a pod went away
    assert "127.0.0.1:1" not in replicas.targets()


def test_kube_spec_forwards_to_each_pod_that_is_not_terminating(tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "kubectl"
    slices = {
        "items": [
            {
                "endpoints": [
                    {"targetRef": {"name": "tfs-a"}, "conditions": {"ready": False}},
                    {"targetRef": {"name": "tfs-b"}, "conditions": {"terminating": True}},
                    {"targetRef": {"name": "tfs-c"}, "conditions": {"ready": True}},
                ]
            }
        ]
    }
    # A kubectl stand-in: endpointslices as the API returns them; port-forward prints its line.
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys, time\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if 'endpointslices' in sys.argv:\n"
        f"    print(json.dumps({slices!r}))\n"
        "else:\n"
        "    port = {'pod/tfs-a': 41001, 'pod/tfs-c': 41003}[sys.argv[4]]\n"
        "    print(f'Forwarding from 127.0.0.1:{port} -> 8500', flush=True)\n"
        "    time.sleep(60)\n"
    )
    fake.chmod(0o755)
    replicas = Replicas(["kube:tfserving/tfserving-replicas:8500"], "m", kubectl=str(fake))
    try:
        assert replicas.targets() == ["127.0.0.1:41001", "127.0.0.1:41003"]
        assert replicas.targets() == ["127.0.0.1:41001", "127.0.0.1:41003"]  # forwards reused
        argv = [json.loads(line) for line in calls.read_text().splitlines()]
        assert argv[0][:4] == ["-n", "tfserving", "get", "endpointslices"]
        assert "kubernetes.io/service-name=tfserving-replicas" in argv[0]
        forwards = [a for a in argv if "port-forward" in a]
        assert sorted(a[3] for a in forwards) == ["pod/tfs-a", "pod/tfs-c"]  # once each
    finally:
        replicas.close()


def test_waits_name_the_replica_that_is_behind(serve, library, tmp_path):
    base = tmp_path / "tiny"
    library.copy(base, 1)
    server = serve("--model_name", "tiny", "--model_base_path", str(base))
    missing = "127.0.0.1:1"  # a replica that never answers
    good = Replicas([f"127.0.0.1:{server.port}"], "tiny")
    try:
        assert good.wait_available(1, deadline=30) == [f"127.0.0.1:{server.port}"]
        assert good.wait_unloaded({2}, deadline=5)
        with pytest.raises(ReplicaError, match=r"labels \{'stable': 1\}.*Unrecognized"):
            good.wait_labels({"stable": 1}, deadline=1)
    finally:
        good.close()
    both = Replicas([f"127.0.0.1:{server.port}", missing], "tiny")
    try:
        with pytest.raises(ReplicaError, match=f"version 1 AVAILABLE after 1s: {missing}"):
            both.wait_available(1, deadline=1)
    finally:
        both.close()


def test_rehearsal_maps_the_pod_onto_this_machine(tmp_path):
    mounts = {"/config": tmp_path / "r0" / "config", "/models": tmp_path / "store"}
    text = 'base_path: "/models/digits"\nother: "/modelsx/a" "/data/models/b"'
    mapped = map_paths(text, mounts)
    assert f'base_path: "{tmp_path}/store/digits"' in mapped
    assert '"/modelsx/a"' in mapped and '"/data/models/b"' in mapped  # only whole mount paths
    rendered = Rendered(
        [
            "--port=8500",
            "--rest_api_port=8501",
            "--model_config_file=/config/models.config",
            "--model_config_file_poll_wait_seconds=30",
            "--allow_version_labels_for_unavailable_models=true",
        ],
        "/v1/models/digits/metadata",
        {},
    )
    assert replica_args(rendered, mounts, 1234, 1235) == [
        "--port=1234",
        "--rest_api_port=1235",
        f"--model_config_file={tmp_path}/r0/config/models.config",
        "--model_config_file_poll_wait_seconds=1",
        "--allow_version_labels_for_unavailable_models=true",
    ]
