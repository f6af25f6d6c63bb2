"""The model server: gRPC (PredictionService, ModelService, Health) + REST + pollers."""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.server.batching import Batcher
from serving.server.errors import invalid
from serving.server.manager import ModelManager
from serving.server.metrics import Metrics
from serving.server.options import (
    OptionsError,
    ServerOptions,
    check_model_config,
    read_model_config,
)
from serving.server.rest import RestServer
from serving.server.service import Core, ModelService, PredictionService

log = logging.getLogger(__name__)


class ModelServer:
    """Start with :meth:`start`, stop with :meth:`stop`; ``port``/``rest_port`` are the bound
    ports (pass 0 to let the OS pick, as tests do)."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = Metrics()
        self.manager = ModelManager(
            self.metrics,
            allow_unavailable_labels=options.allow_version_labels_for_unavailable_models,
            poll_seconds=options.file_system_poll_wait_seconds,
            load=options.load,
        )
        self.batcher = Batcher(options.batching) if options.batching else None
        self.core = Core(self.manager, self.metrics, self.batcher, options.tensor_content)
        self._config_lock = threading.Lock()
        self._stop = threading.Event()
        limit = options.max_request_size_bytes
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=options.grpc_max_threads, thread_name_prefix="grpc"
            ),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                *options.grpc_channel_arguments,
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(self.core), self.grpc_server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelService(self.core, self.reload), self.grpc_server
        )
        self.health: health.HealthServicer | None = None
        if options.enable_grpc_healthcheck_service:
            self.health = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        credentials = None
        if options.tls is not None:
            tls = options.tls
            credentials = grpc.ssl_server_credentials(
                [(tls.server_key.encode(), tls.server_cert.encode())],
                root_certificates=tls.custom_ca.encode() if tls.custom_ca else None,
                require_client_auth=tls.client_verify,
            )
        self.port = 0
        addresses = []
        if options.port:
            addresses.append(f"{options.host}:{options.port}")
        if options.grpc_socket_path:
            addresses.append(f"unix:{options.grpc_socket_path}")
        for address in addresses:
            try:
                bound = (
                    self.grpc_server.add_secure_port(address, credentials)
                    if credentials is not None
                    else self.grpc_server.add_insecure_port(address)
                )
            except RuntimeError:
                bound = 0
            if not bound:
                raise OptionsError(f"cannot listen on {address}")
            if not address.startswith("unix:"):
                self.port = bound
        self.rest: RestServer | None = None
        if options.rest_api_port:
            try:
                self.rest = RestServer(
                    self.core,
                    options.host,
                    options.rest_api_port,
                    metrics_path=options.metrics_path,
                    max_request_bytes=options.max_request_size_bytes,
                    num_threads=options.rest_api_num_threads,
                    timeout_seconds=options.rest_api_timeout_in_ms / 1000,
                    cors=options.rest_api_enable_cors_support,
                )
            except OSError as e:
                raise OptionsError(
                    f"--rest_api_port: cannot bind {options.host}:{options.rest_api_port}: "
                    f"{e.strerror}"
                ) from e
        self.rest_port = self.rest.port if self.rest else 0
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Load the configured models (like TF Serving, before serving), then open the ports."""
        self.manager.apply_config(self.options.model_config)
        # file_system_poll_wait_seconds: > 0 polls, 0 looked once (above), < 0 never polls.
        if self.options.file_system_poll_wait_seconds > 0:
            self.manager.start()
        if self.options.model_config_file and self.options.model_config_file_poll_wait_seconds > 0:
            t = threading.Thread(target=self._poll_config, name="config-poller", daemon=True)
            t.start()
            self._threads.append(t)
        self.grpc_server.start()
        if self.rest:
            self.rest.start()
        if self.health is not None:
            # What TF Serving registers under --enable_grpc_healthcheck_service: the server
            # ("") and the two services by their short names.
            for name in ("", "PredictionService", "ModelService"):
                self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving gRPC on %s:%d, REST on %s",
            self.options.host,
            self.port,
            f"{self.options.host}:{self.rest_port}" if self.rest else "(off)",
        )

    def reload(self, config: Any) -> None:
        """Replace the whole config (HandleReloadConfigRequest or a changed config file)."""
        try:
            check_model_config(config)
        except OptionsError as e:
            raise invalid(str(e)) from e
        with self._config_lock:
            self.manager.apply_config(config)

    def _poll_config(self) -> None:
        last = self.options.model_config.SerializeToString()
        while not self._stop.wait(self.options.model_config_file_poll_wait_seconds):
            try:
                config = read_model_config(self.options.model_config_file)
            except OptionsError as e:
                log.error("Failed to read ModelServerConfig file: %s", e)
                continue
            current = config.SerializeToString()
            if current == last:
                continue
            try:
                self.reload(config)
                last = current
                log.info("applied the new %s", self.options.model_config_file)
            except Exception as e:  # noqa: BLE001 - keep serving the old config
                log.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s", e)

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        if self.rest:
            self.rest.stop()
        self.grpc_server.stop(grace).wait()
        self.manager.stop()
        if self.batcher:
            self.batcher.stop()

    def request_stop(self) -> None:
        """Make :meth:`wait` return (from a signal handler)."""
        self._stop.set()

    def wait(self) -> None:
        self._stop.wait()
