"""Command-line flags (tensorflow_model_server's names) and the text-format files they name.

``--model_config_file`` is a ``ModelServerConfig`` parsed with the official
``tensorflow_serving.config`` protos. The batching, monitoring and SSL files use TF Serving's
``BatchingParameters``, ``MonitoringConfig`` and ``SSLConfig`` text formats; tensorflow-serving-api
does not ship those three messages, so they are declared here (same field names, which is all
text format looks at).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from tensorflow_serving.config import model_server_config_pb2


class OptionsError(ValueError):
    """A flag or a file it names is invalid; the message says which and why."""


def _build_config_messages() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="tfserving_pipeline/server_config.proto",
        package="tfserving_pipeline",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    T = descriptor_pb2.FieldDescriptorProto
    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED

    def message(name: str, fields: list[tuple[str, int, int, str]]) -> None:
        msg = fdp.message_type.add(name=name)
        for number, (fname, ftype, label, type_name) in enumerate(fields, 1):
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name

    i64 = ".google.protobuf.Int64Value"
    message(
        "BatchingParameters",
        [
            ("max_batch_size", T.TYPE_MESSAGE, opt, i64),
            ("batch_timeout_micros", T.TYPE_MESSAGE, opt, i64),
            ("max_enqueued_batches", T.TYPE_MESSAGE, opt, i64),
            ("num_batch_threads", T.TYPE_MESSAGE, opt, i64),
            ("thread_pool_name", T.TYPE_MESSAGE, opt, ".google.protobuf.StringValue"),
            ("allowed_batch_sizes", T.TYPE_INT64, rep, ""),
            ("pad_variable_length_inputs", T.TYPE_BOOL, opt, ""),
            ("enable_large_batch_splitting", T.TYPE_MESSAGE, opt, ".google.protobuf.BoolValue"),
            ("max_execution_batch_size", T.TYPE_MESSAGE, opt, i64),
        ],
    )
    message(
        "PrometheusConfig", [("enable", T.TYPE_BOOL, opt, ""), ("path", T.TYPE_STRING, opt, "")]
    )
    message(
        "MonitoringConfig",
        [("prometheus_config", T.TYPE_MESSAGE, opt, ".tfserving_pipeline.PrometheusConfig")],
    )
    message(
        "SSLConfig",
        [
            ("server_key", T.TYPE_STRING, opt, ""),
            ("server_cert", T.TYPE_STRING, opt, ""),
            ("custom_ca", T.TYPE_STRING, opt, ""),
            ("client_verify", T.TYPE_BOOL, opt, ""),
        ],
    )
    from google.protobuf import wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(
            pool.FindMessageTypeByName(f"tfserving_pipeline.{name}")
        )
        for name in ("BatchingParameters", "MonitoringConfig", "SSLConfig")
    }


MESSAGES = _build_config_messages()


@dataclass(frozen=True)
class Batching:
    """Batching parameters with TF Serving's defaults for the fields left out."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 4
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False


@dataclass(frozen=True)
class TLS:
    server_key: str
    server_cert: str
    custom_ca: str
    client_verify: bool


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8500
    rest_api_port: int = 8501
    model_config: Any = None  # ModelServerConfig
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: float = 0
    file_system_poll_wait_seconds: float = 1
    batching: Batching | None = None
    metrics_path: str = ""
    tls: TLS | None = None
    grpc_max_threads: int = 16
    max_request_size_bytes: int = 256 << 20
    allow_version_labels_for_unavailable_models: bool = False
    tensor_content: bool = False  # Predict outputs as tensor_content (default: typed fields)


def parse_text(path: str, message: Any, flag: str) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise OptionsError(f"{flag}: cannot read {path}: {e.strerror}") from e
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise OptionsError(f"{flag}: {path}: {e}") from e


def read_model_config(path: str) -> Any:
    config = parse_text(path, model_server_config_pb2.ModelServerConfig(), "--model_config_file")
    check_model_config(config, f"--model_config_file {path}")
    return config


def check_model_config(config: Any, where: str) -> None:
    """Reject what TF Serving rejects: no list, duplicate names, missing base paths."""
    if config.WhichOneof("config") != "model_config_list":
        raise OptionsError(f"{where}: expected a model_config_list")
    seen = set()
    for model in config.model_config_list.config:
        if not model.name:
            raise OptionsError(f"{where}: a model config has no name")
        if model.name in seen:
            raise OptionsError(f"{where}: model {model.name!r} is configured twice")
        seen.add(model.name)
        if not model.base_path:
            raise OptionsError(f"{where}: model {model.name!r} has no base_path")
        if model.model_platform not in ("", "tensorflow"):
            raise OptionsError(
                f"{where}: model {model.name!r}: platform {model.model_platform!r} is not "
                "supported (only tensorflow)"
            )


def single_model_config(name: str, base_path: str) -> Any:
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = name
    model.base_path = str(Path(base_path).resolve())
    model.model_platform = "tensorflow"
    return config


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    """A boolean flag written --name, --name=true or --name=false (tensorflow_model_server's)."""
    p.add_argument(
        name, nargs="?", const=True, default=False, type=_bool, metavar="BOOL", help=help
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.server",
        description=(
            "A TensorFlow-Serving-compatible model server (gRPC PredictionService/ModelService "
            "and the REST API). Takes tensorflow_model_server's flags."
        ),
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)",
    )
    p.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500)")
    p.add_argument(
        "--rest_api_port",
        type=int,
        default=8501,
        help="HTTP/REST port (default 8501; 0 disables REST)",
    )
    p.add_argument("--model_name", default="", help="name of the single model to serve")
    p.add_argument(
        "--model_base_path", default="", help="directory of the single model's numbered versions"
    )
    p.add_argument(
        "--model_config_file",
        default="",
        help="ModelServerConfig text proto (overrides --model_name/--model_base_path)",
    )
    p.add_argument(
        "--model_config_file_poll_wait_seconds",
        type=float,
        default=0,
        help="re-read --model_config_file this often (0 = never)",
    )
    p.add_argument(
        "--file_system_poll_wait_seconds",
        type=float,
        default=1,
        help="look for new versions this often (default 1)",
    )
    _flag(p, "--enable_batching", "merge concurrent Predict calls into one model call")
    p.add_argument("--batching_parameters_file", default="", help="BatchingParameters text proto")
    p.add_argument(
        "--monitoring_config_file",
        default="",
        help="MonitoringConfig text proto (Prometheus endpoint)",
    )
    p.add_argument("--ssl_config_file", default="", help="SSLConfig text proto (PEM contents)")
    p.add_argument(
        "--grpc_max_threads",
        type=int,
        default=16,
        help="threads serving gRPC requests (default 16)",
    )
    p.add_argument(
        "--max_request_size_bytes",
        type=int,
        default=256 << 20,
        help="largest accepted request (default 256 MiB)",
    )
    _flag(
        p,
        "--allow_version_labels_for_unavailable_models",
        "allow a label to point to a version that is not AVAILABLE",
    )
    _flag(
        p,
        "--enable_grpc_healthcheck_service",
        "accepted for compatibility: the gRPC health service is always on",
    )
    _flag(
        p,
        "--enable_serialization_as_tensor_content",
        "send Predict outputs in tensor_content instead of the typed *_val fields",
    )
    return p


def options_from_args(argv: list[str] | None = None) -> ServerOptions:
    """Parse flags and every file they name.

    Raises:
        OptionsError: an invalid combination of flags or an unreadable/invalid file.
    """
    args = parser().parse_args(argv)
    for flag in ("port", "rest_api_port"):
        value = getattr(args, flag)
        if not 0 <= value <= 65535:
            raise OptionsError(f"--{flag}: {value} is not a port number")
    if args.grpc_max_threads < 1:
        raise OptionsError("--grpc_max_threads: must be >= 1")
    if args.max_request_size_bytes < 1024:
        raise OptionsError("--max_request_size_bytes: must be >= 1024")
    if args.model_config_file:
        config = read_model_config(args.model_config_file)
    elif args.model_name and args.model_base_path:
        config = single_model_config(args.model_name, args.model_base_path)
    elif args.model_base_path:
        config = single_model_config("default", args.model_base_path)
    else:
        raise OptionsError("give --model_config_file, or --model_name and --model_base_path")
    batching = None
    if args.enable_batching:
        batching = Batching()
        if args.batching_parameters_file:
            b = parse_text(
                args.batching_parameters_file,
                MESSAGES["BatchingParameters"](),
                "--batching_parameters_file",
            )
            batching = Batching(
                max_batch_size=b.max_batch_size.value if b.HasField("max_batch_size") else 1000,
                batch_timeout_micros=b.batch_timeout_micros.value,
                max_enqueued_batches=(
                    b.max_enqueued_batches.value if b.HasField("max_enqueued_batches") else 10
                ),
                num_batch_threads=(
                    b.num_batch_threads.value if b.HasField("num_batch_threads") else 4
                ),
                allowed_batch_sizes=tuple(b.allowed_batch_sizes),
                pad_variable_length_inputs=b.pad_variable_length_inputs,
            )
            sizes = batching.allowed_batch_sizes
            if sizes and (
                list(sizes) != sorted(set(sizes)) or sizes[-1] != batching.max_batch_size
            ):
                raise OptionsError(
                    "--batching_parameters_file: allowed_batch_sizes must increase and end with "
                    f"max_batch_size ({batching.max_batch_size}); got {list(sizes)}"
                )
    metrics_path = ""
    if args.monitoring_config_file:
        m = parse_text(
            args.monitoring_config_file, MESSAGES["MonitoringConfig"](), "--monitoring_config_file"
        )
        if m.prometheus_config.enable:
            metrics_path = m.prometheus_config.path or "/monitoring/prometheus/metrics"
    tls = None
    if args.ssl_config_file:
        s = parse_text(args.ssl_config_file, MESSAGES["SSLConfig"](), "--ssl_config_file")
        if not (s.server_key and s.server_cert):
            raise OptionsError("--ssl_config_file: server_key and server_cert are required")
        if s.client_verify and not s.custom_ca:
            raise OptionsError("--ssl_config_file: client_verify needs custom_ca")
        tls = TLS(s.server_key, s.server_cert, s.custom_ca, s.client_verify)
    return ServerOptions(
        host=args.host,
        port=args.port,
        rest_api_port=args.rest_api_port,
        model_config=config,
        model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        batching=batching,
        metrics_path=metrics_path,
        tls=tls,
        grpc_max_threads=args.grpc_max_threads,
        max_request_size_bytes=args.max_request_size_bytes,
        allow_version_labels_for_unavailable_models=(
            args.allow_version_labels_for_unavailable_models
        ),
        tensor_content=args.enable_serialization_as_tensor_content,
    )
