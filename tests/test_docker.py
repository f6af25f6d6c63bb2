"""The docker launcher against a real Docker engine.

No image registry is reachable, so the test imports a tiny local image (a root filesystem of
symlinks) and bind-mounts this machine's Python environment into it; its
``tensorflow_model_server`` is a script that runs our embedded server with the same flags. The
launcher code under test is the one that runs ``tensorflow/serving`` in production.
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from serving.docker import DockerLaunchError, TFServingContainer
from tests.conftest import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "tfserving-pipeline-test:local"


def _engine():
    try:
        import docker

        client = docker.from_env()
        client.ping()
        return client
    except Exception as e:  # noqa: BLE001 - any failure means: no engine here
        pytest.skip(
            f"no Docker engine reachable ({type(e).__name__}: {e}); .ci/run starts one "
            "with `dockerd --bridge=none --iptables=false`"
        )


@pytest.fixture(scope="module")
def engine():
    client = _engine()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("usr", "etc", "tmp", "proc", "sys", "dev", "root", "work"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        for link in ("bin", "lib", "lib64", "sbin"):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, f"usr/{link}"
            tar.addfile(info)
    repository, tag = IMAGE.split(":")
    client.api.import_image_from_data(buf.getvalue(), repository=repository, tag=tag)
    return client


@pytest.fixture
def entrypoint(tmp_path):
    """A tensorflow_model_server stand-in: our embedded server, same flags."""
    script = tmp_path / "bin" / "tensorflow_model_server"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        f"cd {ROOT}\n"
        f"export PYTHONPATH={ROOT} TF_CPP_MIN_LOG_LEVEL=2 HOME=/tmp\n"
        f'exec {sys.executable} -m serving.server "$@"\n'
    )
    script.chmod(0o755)
    return script


def _mounts(entrypoint: Path) -> list[Path]:
    """This machine's Python (interpreter, virtualenv, project) seen at the same paths inside."""
    paths = {Path("/usr"), Path(sys.prefix), ROOT, entrypoint.parent}
    base = Path(sys.base_prefix)
    if not base.is_relative_to("/usr"):
        paths.add(base)
    return sorted(paths)


def _container(base: Path, entrypoint: Path, **kwargs) -> TFServingContainer:
    """The launcher on the test image, serving `tiny` from ``base`` on free loopback ports."""
    return TFServingContainer(
        image=IMAGE,
        model_name="tiny",
        model_base_path=base,
        port=free_port(),
        rest_api_port=free_port(),
        entrypoint=str(entrypoint),
        extra_volumes=_mounts(entrypoint),
        **kwargs,
    )


def _ours(client, tmp_path: Path) -> set[str]:
    """Containers of the launcher that mount something under this test's ``tmp_path`` (another
    test run may share the Docker engine)."""
    return {
        c.id
        for c in client.containers.list(all=True, filters={"label": "tfserving-pipeline=1"})
        if any(
            str(m.get("Source", "")).startswith(str(tmp_path)) for m in c.attrs.get("Mounts", [])
        )
    }


@pytest.fixture
def no_leftovers(engine, tmp_path):
    """Asserts that the test removed every container it started (others may run meanwhile)."""
    before = _ours(engine, tmp_path)
    yield lambda: _ours(engine, tmp_path) - before


def test_start_predict_and_cleanup(engine, entrypoint, tmp_path, library, no_leftovers):
    from serving.client import ServingClient

    base = tmp_path / "tiny"
    library.copy(base, 1)
    container = _container(base, entrypoint, start_timeout=120)
    with container:
        assert container.container.attrs["HostConfig"]["NetworkMode"] == "host"
        mounts = {m["Destination"]: m for m in container.container.attrs["Mounts"]}
        assert mounts[str(base.resolve())]["RW"] is False  # the model repository is read-only
        with ServingClient(f"127.0.0.1:{container.port}", model="tiny") as client:
            out = client.predict({"x": np.ones((1, 2), np.float32)})
            assert out.version == 1
    assert not no_leftovers()


def test_failing_start_reports_the_logs_and_cleans_up(
    engine, entrypoint, tmp_path, library, no_leftovers
):
    base = tmp_path / "tiny"
    library.copy(base, 1)
    # A malformed value stops tensorflow_model_server with its usage and `return -1` (an
    # unknown flag would only be reported and ignored).
    container = _container(
        base, entrypoint, start_timeout=60, extra_flags=["--rest_api_timeout_in_ms=soon"]
    )
    with pytest.raises(DockerLaunchError, match="exited with status 255") as e:
        container.start()
    assert "--rest_api_timeout_in_ms" in str(e.value)  # the server's own words
    assert not no_leftovers()
    (tmp_path / "bad.config").write_text("this is not a text proto")
    with pytest.raises(DockerLaunchError, match="not a readable ModelServerConfig"):
        TFServingContainer(image=IMAGE, model_config_file=tmp_path / "bad.config").start()


def test_interrupt_still_removes_the_container(engine, entrypoint, tmp_path, library, no_leftovers):
    base = tmp_path / "tiny"
    library.copy(base, 1)
    container = _container(base, entrypoint, start_timeout=120)
    with pytest.raises(KeyboardInterrupt), container:
        raise KeyboardInterrupt
    assert not no_leftovers()


def test_flags_match_the_embedded_server():
    c = TFServingContainer(
        model_config_file="/p/models.config",
        port=9000,
        rest_api_port=9001,
        extra_flags=["--enable_batching"],
    )
    assert c.flags() == [
        "--port=9000",
        "--rest_api_port=9001",
        "--model_config_file=/p/models.config",
        "--enable_batching",
    ]
    with pytest.raises(ValueError):
        TFServingContainer(model_name="m")
