"""Run the real ``tensorflow/serving`` image with the docker SDK.

    python -m serving.docker --model_name digits --model_base_path models/digits
    python -m serving.docker --model_config_file production/models.config

The model repository (or the production directory) is bind-mounted read-only at the same
absolute path inside the container, so the base paths in a models.config stay valid. The
container uses host networking (loopback, no bridge needed) and takes the same flags as our
embedded server; ``start()`` waits until the model is AVAILABLE, puts the container's logs in
the error when it does not get there, and the container is always removed (context manager,
Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The serving image matching this project's TensorFlow (2.21). Pin a digest in production.
DEFAULT_IMAGE = "tensorflow/serving:2.21.0"


class DockerLaunchError(RuntimeError):
    """The container could not be started or never served the model; includes its logs."""


class TFServingContainer:
    def __init__(
        self,
        *,
        image: str = DEFAULT_IMAGE,
        model_name: str = "",
        model_base_path: str | Path | None = None,
        model_config_file: str | Path | None = None,
        port: int = 8500,
        rest_api_port: int = 8501,
        extra_flags: Sequence[str] = (),
        start_timeout: float = 180.0,
        network_mode: str = "host",
        entrypoint: str = "tensorflow_model_server",
        extra_volumes: Sequence[str | Path] = (),
        client: Any = None,
    ):
        if bool(model_base_path) == bool(model_config_file):
            raise ValueError("give model_base_path (with model_name) or model_config_file")
        self.image = image
        self.model_name = model_name or (Path(model_base_path).name if model_base_path else "")
        self.model_base_path = Path(model_base_path).resolve() if model_base_path else None
        self.model_config_file = Path(model_config_file).resolve() if model_config_file else None
        self.port = port
        self.rest_api_port = rest_api_port
        self.extra_flags = list(extra_flags)
        self.start_timeout = start_timeout
        self.network_mode = network_mode
        self.entrypoint = entrypoint
        self.extra_volumes = [Path(p).resolve() for p in extra_volumes]
        self._client = client
        self.container: Any = None

    def flags(self) -> list[str]:
        flags = [f"--port={self.port}", f"--rest_api_port={self.rest_api_port}"]
        if self.model_config_file:
            flags.append(f"--model_config_file={self.model_config_file}")
        else:
            flags += [
                f"--model_name={self.model_name}",
                f"--model_base_path={self.model_base_path}",
            ]
        return flags + self.extra_flags

    def volumes(self) -> dict[str, dict[str, str]]:
        paths = []
        if self.model_base_path:
            paths.append(self.model_base_path)
        if self.model_config_file:
            paths.append(self.model_config_file.parent)
            paths += _config_base_paths(self.model_config_file)
        paths += self.extra_volumes
        mounts = {}
        for path in paths:
            # Same absolute path inside and out: models.config base paths keep working.
            mounts[str(path)] = {"bind": str(path), "mode": "ro"}
        return mounts

    def start(self) -> str:
        """Start the container and wait until the model is AVAILABLE; return the gRPC target."""
        import docker
        from docker.errors import DockerException

        try:
            client = self._client or docker.from_env()
            self.container = client.containers.run(
                self.image,
                command=self.flags(),
                entrypoint=[self.entrypoint],
                detach=True,
                network_mode=self.network_mode,
                volumes=self.volumes(),
                name=f"tfserving-{uuid.uuid4().hex[:8]}",
                labels={"tfserving-pipeline": "1"},
            )
        except DockerException as e:
            raise DockerLaunchError(f"cannot start {self.image}: {e}") from e
        target = f"127.0.0.1:{self.port}"
        try:
            self._wait_available(target)
        except BaseException:
            self.stop()
            raise
        return target

    def _wait_available(self, target: str) -> None:
        from serving.client import ServingClient
        from serving.errors import ServingClientError

        names = [self.model_name] if self.model_name else _config_models(self.model_config_file)
        deadline = time.monotonic() + self.start_timeout
        with contextlib.ExitStack() as stack:
            clients = [
                stack.enter_context(ServingClient(target, model=n, timeout=2, retries=0))
                for n in names
            ]
            pending = list(clients)
            while pending:
                self.container.reload()
                if self.container.status in ("exited", "dead"):
                    raise DockerLaunchError(
                        f"{self.image} exited with status "
                        f"{self.container.attrs['State'].get('ExitCode')}:\n{self.logs()}"
                    )
                for c in list(pending):
                    try:
                        if any(s.state == "AVAILABLE" for s in c.status()):
                            pending.remove(c)
                    except ServingClientError:
                        pass  # not listening yet, or the model not loaded yet
                if pending and time.monotonic() > deadline:
                    raise DockerLaunchError(
                        f"{self.image}: {[c.model for c in pending]} not AVAILABLE after "
                        f"{self.start_timeout:g}s:\n{self.logs()}"
                    )
                if pending:
                    time.sleep(0.5)

    def logs(self, tail: int = 60) -> str:
        try:
            return self.container.logs(tail=tail).decode(errors="replace")
        except Exception as e:  # noqa: BLE001 - logs are best effort inside an error message
            return f"(no logs: {e})"

    def stop(self) -> None:
        if self.container is None:
            return
        with contextlib.suppress(Exception):
            self.container.remove(force=True)
        self.container = None

    def __enter__(self) -> TFServingContainer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _read_config(config_file: Path) -> Any:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    try:
        return text_format.Parse(
            config_file.read_text(), model_server_config_pb2.ModelServerConfig()
        )
    except (OSError, text_format.ParseError) as e:
        raise DockerLaunchError(f"{config_file}: not a readable ModelServerConfig: {e}") from e


def _config_base_paths(config_file: Path) -> list[Path]:
    return [Path(m.base_path) for m in _read_config(config_file).model_config_list.config]


def _config_models(config_file: Path | None) -> list[str]:
    assert config_file is not None
    return [m.name for m in _read_config(config_file).model_config_list.config]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serving.docker",
        description="Serve models with the tensorflow/serving image.",
    )
    p.add_argument("--image", default=DEFAULT_IMAGE)
    p.add_argument("--model_name", default="")
    p.add_argument("--model_base_path", default="")
    p.add_argument("--model_config_file", default="")
    p.add_argument("--port", type=int, default=8500)
    p.add_argument("--rest_api_port", type=int, default=8501)
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for AVAILABLE")
    args, extra = p.parse_known_args(argv)
    try:
        container = TFServingContainer(
            image=args.image,
            model_name=args.model_name,
            model_base_path=args.model_base_path or None,
            model_config_file=args.model_config_file or None,
            port=args.port,
            rest_api_port=args.rest_api_port,
            extra_flags=extra,
            start_timeout=args.timeout,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # SIGTERM (e.g. from make or CI) becomes KeyboardInterrupt so the container is removed.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with container:
            print(
                f"serving on 127.0.0.1:{args.port} (gRPC) / :{args.rest_api_port} (REST); "
                "Ctrl-C stops and removes the container",
                flush=True,
            )
            while True:
                time.sleep(3600)
    except DockerLaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
