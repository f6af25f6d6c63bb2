"""The model server: gRPC (PredictionService, ModelService, Health) + REST + pollers.

gRPC (``grpc.aio``) and REST (aiohttp) share one asyncio event loop on a thread of its own;
request parsing, lookups and replies run on the loop, the model runs on a thread pool
(``--grpc_max_threads``) or the batcher's threads, and TensorFlow releases the GIL while it
computes. Loading and unloading happen on the version and config pollers' threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf import message, message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

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
T = TypeVar("T")
# What TF Serving registers under --enable_grpc_healthcheck_service: the server ("") and the
# two services by their short names.
HEALTH_NAMES = ("", "PredictionService", "ModelService")


class ModelServer:
    """Ports are bound by the constructor (``port``/``rest_port``; pass 0 to let the OS pick,
    as tests do); :meth:`start` loads the models, then serves; :meth:`stop` drains."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = Metrics()
        self.manager = ModelManager(
            self.metrics,
            allow_unavailable_labels=options.allow_version_labels_for_unavailable_models,
            poll_seconds=options.file_system_poll_wait_seconds,
            load=options.load,
        )
        self.pool = ThreadPoolExecutor(options.grpc_max_threads, thread_name_prefix="model")
        self.rest_pool = ThreadPoolExecutor(options.rest_api_num_threads, thread_name_prefix="rest")
        self.batcher = Batcher(options.batching) if options.batching else None
        self.core = Core(
            self.manager,
            self.metrics,
            self.pool,
            self.batcher,
            options.tensor_content,
            options.max_request_elements,
        )
        self._config_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.loop = asyncio.new_event_loop()
        loop_thread = threading.Thread(target=self.loop.run_forever, name="serving", daemon=True)
        loop_thread.start()
        self._threads.append(loop_thread)
        self.health: Any = None
        self.rest: RestServer | None = None
        self.port = 0
        try:
            self._on_loop(self._bind())
        except BaseException:
            self._close()
            raise
        self.rest_port = self.rest.port if self.rest else 0

    def _on_loop(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _bind(self) -> None:
        options = self.options
        limit = options.max_request_size_bytes
        self.grpc_server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                *options.grpc_channel_arguments,
            ],
        )
        _add_service(
            self.grpc_server, prediction_service_pb2.DESCRIPTOR, PredictionService(self.core)
        )
        _add_service(
            self.grpc_server, model_service_pb2.DESCRIPTOR, ModelService(self.core, self._reload)
        )
        if options.enable_grpc_healthcheck_service:
            self.health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        credentials = None
        if options.tls is not None:
            tls = options.tls
            credentials = grpc.ssl_server_credentials(
                [(tls.server_key.encode(), tls.server_cert.encode())],
                root_certificates=tls.custom_ca.encode() if tls.custom_ca else None,
                require_client_auth=tls.client_verify,
            )
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
        if options.rest_api_port:
            try:
                family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
                sock = socket.create_server(
                    (options.host, options.rest_api_port), family=family, backlog=1024
                )
            except OSError as e:
                raise OptionsError(
                    f"--rest_api_port: cannot bind {options.host}:{options.rest_api_port}: "
                    f"{e.strerror}"
                ) from e
            self.rest = RestServer(
                self.core,
                sock,
                pool=self.rest_pool,
                metrics_path=options.metrics_path,
                max_request_bytes=options.max_request_size_bytes,
                timeout_seconds=options.rest_api_timeout_in_ms / 1000,
                cors=options.rest_api_enable_cors_support,
            )

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
        self._on_loop(self._listen())
        log.info(
            "serving gRPC on %s:%d, REST on %s",
            self.options.host,
            self.port,
            f"{self.options.host}:{self.rest_port}" if self.rest else "(off)",
        )

    async def _listen(self) -> None:
        await self.grpc_server.start()
        if self.rest:
            await self.rest.start()
        if self.health is not None:
            for name in HEALTH_NAMES:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def reload(self, config: Any) -> None:
        """Replace the whole config (HandleReloadConfigRequest or a changed config file)."""
        try:
            check_model_config(config)
        except OptionsError as e:
            raise invalid(str(e)) from e
        with self._config_lock:
            self.manager.apply_config(config)

    async def _reload(self, config: Any) -> None:
        # Loading takes seconds: off the loop, on a thread of its own.
        await asyncio.get_running_loop().run_in_executor(None, self.reload, config)

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

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: health turns NOT_SERVING, both listeners stop accepting, calls and
        requests in flight get up to ``grace`` seconds (``--drain_grace_seconds``) to finish."""
        grace = self.options.drain_grace_seconds if grace is None else grace
        self._stop.set()
        if self.loop.is_running():
            try:
                self._on_loop(self._drain(grace), timeout=grace + 30)
            except Exception:
                log.exception("drain failed")
        self._close()

    async def _drain(self, grace: float) -> None:
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        await asyncio.gather(
            self.grpc_server.stop(grace),
            self.rest.stop(grace) if self.rest else asyncio.sleep(0),
        )

    def _close(self) -> None:
        if self.loop.is_closed():
            return
        self._stop.set()
        self.manager.stop()
        if self.batcher:
            self.batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.rest_pool.shutdown(wait=False, cancel_futures=True)
        if self.loop.is_running():
            with contextlib.suppress(Exception):
                self._on_loop(_cancel_tasks(), timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._threads[0].join(timeout=10)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()

    def request_stop(self) -> None:
        """Make :meth:`wait` return (from a signal handler)."""
        self._stop.set()

    def wait(self) -> None:
        self._stop.wait()


async def _cancel_tasks() -> None:
    """Cancel what the drain left running (connections past the grace) and let it unwind."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _add_service(server: grpc.aio.Server, file: Any, servicer: Any) -> None:
    """Register ``servicer``'s methods for the file's one service, parsing requests ourselves:
    bytes that are no valid request get INTERNAL with protobuf's reason, as gRPC C++ answers
    for TF Serving (``GenericDeserialize`` in proto_utils.h); grpc.aio's own parser would
    answer UNKNOWN."""
    (service,) = file.services_by_name.values()
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _parsing(getattr(servicer, method.name), request_cls),
            response_serializer=_serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def _serialize(response: Any) -> bytes:
    """A response message's bytes; a servicer on the hot path returns bytes it encoded."""
    return response if type(response) is bytes else response.SerializeToString()  # type: ignore[no-any-return]


def _parsing(method: Any, request_cls: Any) -> Any:
    async def call(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        request = request_cls()
        try:
            request.ParseFromString(data)
        except message.DecodeError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        return await method(request, context)

    return call
