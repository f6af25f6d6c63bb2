"""Command-line flags (tensorflow_model_server's names) and the text-format files they name.

``--model_config_file`` is a ``ModelServerConfig`` parsed with the official
``tensorflow_serving.config`` protos. The batching, monitoring and SSL files use TF Serving's
``BatchingParameters``, ``MonitoringConfig`` and ``SSLConfig`` text formats; tensorflow-serving-api
does not ship those three messages, so they are declared here (same field names, which is all
text format looks at).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from tensorflow_serving.config import model_server_config_pb2

log = logging.getLogger(__name__)


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
class LoadOptions:
    """How versions are loaded (tensorflow_model_server's flags of the same names)."""

    saved_model_tags: tuple[str, ...] = ("serve",)
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 1
    max_num_load_retries: int = 5
    load_retry_interval_seconds: float = 60.0
    enable_signature_method_name_check: bool = False
    session_config: Any = None  # tf.compat.v1.ConfigProto


@dataclass(frozen=True)
class TLS:
    server_key: str
    server_cert: str
    custom_ca: str
    client_verify: bool


# (ours) Elements one request tensor may declare: 2^26 (256 MiB of float32), checked before
# anything is allocated, so a 30-byte request cannot ask for gigabytes.
DEFAULT_MAX_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8500
    grpc_socket_path: str = ""
    grpc_channel_arguments: tuple[tuple[str, int | str], ...] = ()
    rest_api_port: int = 0
    rest_api_num_threads: int = 8
    rest_api_timeout_in_ms: int = 30000
    rest_api_enable_cors_support: bool = False
    model_config: Any = None  # ModelServerConfig
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: float = 0
    file_system_poll_wait_seconds: float = 1
    batching: Batching | None = None
    metrics_path: str = ""
    tls: TLS | None = None
    grpc_max_threads: int = 16
    max_request_size_bytes: int = 256 << 20
    max_request_elements: int = DEFAULT_MAX_ELEMENTS
    drain_grace_seconds: float = 20.0
    allow_version_labels_for_unavailable_models: bool = False
    enable_grpc_healthcheck_service: bool = False
    tensor_content: bool = False  # Predict outputs as tensor_content (default: typed fields)
    load: LoadOptions = LoadOptions()


def parse_text(path: str, message: Any, flag: str) -> Any:
    """A text-format proto file; errors say what TF Serving says (``ParseProtoTextFile``)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise OptionsError(f"{flag}: NOT_FOUND: {path}; {e.strerror}") from e
    return parse_text_proto(text, message, path)


def parse_text_proto(text: str, message: Any, path: str) -> Any:
    """``text`` (the contents of ``path``) into ``message``, with TF Serving's error."""
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as e:
        # protobuf's own log line, then the status TF Serving returns.
        where = f"{e.GetLine()}:{e.GetColumn()}: " if e.GetLine() else ""
        detail = str(e).split(" : ", 1)[-1]
        raise OptionsError(
            f"Error parsing text-format {message.DESCRIPTOR.full_name}: {where}{detail}\n"
            f"INVALID_ARGUMENT: Invalid protobuf file: '{path}'"
        ) from e


def read_model_config(path: str) -> Any:
    config = parse_text(path, model_server_config_pb2.ModelServerConfig(), "--model_config_file")
    check_model_config(config)
    return config


def check_model_config(config: Any) -> None:
    """Reject what ``ServerCore::ReloadConfig`` rejects, with its messages."""
    kind = config.WhichOneof("config")
    if kind is None:
        return  # TF Serving takes no action for an empty config
    if kind != "model_config_list":
        raise OptionsError("ModelServer does not yet support custom model config.")
    seen = set()
    for model in config.model_config_list.config:
        if model.name in seen:
            raise OptionsError(f"Illegal to list model {model.name} multiple times in config list")
        seen.add(model.name)
        if not _is_absolute(model.base_path):
            raise OptionsError(
                f"Expected model {model.name} to have an absolute path or URI; got "
                f"base_path()={model.base_path}"
            )
        if model.model_platform not in ("", "tensorflow"):
            raise OptionsError(
                f"Model {model.name}: platform {model.model_platform} is not served here "
                "(only tensorflow)"
            )


def _is_absolute(path: str) -> bool:
    """TF Serving's ``UriIsRelativePath`` negated: an absolute path or a URI (gs://...)."""
    return path.startswith("/") or "://" in path


def single_model_config(name: str, base_path: str) -> Any:
    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = name
    # TF Serving takes the path as given; a relative one is resolved against the working
    # directory here so that the version poller does not depend on it later.
    model.base_path = base_path if "://" in base_path else str(Path(base_path).resolve())
    model.model_platform = "tensorflow"
    return config


# --- flags ----------------------------------------------------------------------------------
# tensorflow_model_server's complete flag list (model_servers/main.cc and the defaults of
# server.h's Options, TF Serving 2.20/2.21): name, type, default, effect here.
#   "yes"   implemented as TF Serving does;
#   "noop"  accepted, nothing to do in this server (documented in docs/tf-serving-parity.md);
#   "warn"  accepted; a non-default value cannot apply here and logs one warning.
_CPUS = os.cpu_count() or 1
TF_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("port", "int32", 8500, "yes"),
    ("grpc_socket_path", "string", "", "yes"),
    ("rest_api_port", "int32", 0, "yes"),
    ("rest_api_num_threads", "int32", 4 * _CPUS, "yes"),
    ("rest_api_timeout_in_ms", "int32", 30000, "yes"),
    ("rest_api_enable_cors_support", "bool", False, "yes"),
    ("enable_batching", "bool", False, "yes"),
    ("allow_version_labels_for_unavailable_models", "bool", False, "yes"),
    ("batching_parameters_file", "string", "", "yes"),
    ("enable_per_model_batching_parameters", "bool", False, "warn"),
    ("model_config_file", "string", "", "yes"),
    ("model_config_file_poll_wait_seconds", "int32", 0, "yes"),
    ("model_name", "string", "default", "yes"),
    ("model_base_path", "string", "", "yes"),
    ("num_load_threads", "int32", 0, "noop"),
    ("num_unload_threads", "int32", 0, "noop"),
    ("max_num_load_retries", "int32", 5, "yes"),
    ("load_retry_interval_micros", "int64", 60_000_000, "yes"),
    ("file_system_poll_wait_seconds", "int32", 1, "yes"),
    ("flush_filesystem_caches", "bool", True, "noop"),
    ("tensorflow_session_parallelism", "int64", 0, "yes"),
    ("tensorflow_session_config_file", "string", "", "yes"),
    ("tensorflow_intra_op_parallelism", "int64", 0, "yes"),
    ("tensorflow_inter_op_parallelism", "int64", 0, "yes"),
    ("use_alts_credentials", "bool", False, "warn"),
    ("ssl_config_file", "string", "", "yes"),
    ("platform_config_file", "string", "", "warn"),
    ("per_process_gpu_memory_fraction", "float", 0.0, "warn"),
    ("saved_model_tags", "string", "serve", "yes"),
    ("grpc_channel_arguments", "string", "", "yes"),
    ("grpc_max_threads", "int32", 4 * _CPUS, "yes"),
    ("enable_model_warmup", "bool", True, "yes"),
    ("num_request_iterations_for_warmup", "int32", 0, "yes"),
    ("version", "bool", False, "yes"),
    ("monitoring_config_file", "string", "", "yes"),
    ("remove_unused_fields_from_bundle_metagraph", "bool", True, "noop"),
    ("prefer_tflite_model", "bool", False, "warn"),
    ("num_tflite_pools", "int32", _CPUS, "noop"),
    ("num_tflite_interpreters_per_pool", "int32", 1, "noop"),
    ("enable_signature_method_name_check", "bool", False, "yes"),
    ("xla_cpu_compilation_enabled", "bool", False, "warn"),
    ("xla_gpu_compilation_enabled", "bool", False, "warn"),
    ("enable_profiler", "bool", True, "noop"),
    ("thread_pool_factory_config_file", "string", "", "warn"),
    ("mixed_precision", "string", "", "warn"),
    ("skip_initialize_tpu", "bool", False, "noop"),
    ("enable_grpc_healthcheck_service", "bool", False, "yes"),
    ("enable_serialization_as_tensor_content", "bool", False, "yes"),
)
TF_FLAG_NAMES = frozenset(name for name, *_ in TF_FLAGS)
# Ours alone (the real binary has no such flags): where to bind, and a request size cap. The
# two poll intervals also take fractions of a second here (whole seconds in the real binary).
EXTRA_FLAGS = ("host", "max_request_size_bytes", "max_request_elements", "drain_grace_seconds")
_INT_RANGE = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def parse_bool(text: str) -> bool:
    """TensorFlow's bool flag values (command_line_flags.cc): true/false/1/0."""
    value = text.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false, 1 or 0, got {text!r}")


def _int(kind: str) -> Any:
    low, high = _INT_RANGE[kind]

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} does not fit in {kind}")
        return value

    return parse


class _FlagParser(argparse.ArgumentParser):
    """A malformed flag value ends the process as tensorflow_model_server's does: the usage,
    then ``return -1`` from main (exit status 255)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(255, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _FlagParser(
        prog="python -m serving.server",
        description=(
            "A TensorFlow-Serving-compatible model server (gRPC PredictionService/ModelService "
            "and the REST API). Takes every tensorflow_model_server flag with its type and "
            "default; flags written --name=value (or --name value). See "
            "docs/tf-serving-parity.md for what each does here."
        ),
        allow_abbrev=False,  # TensorFlow's flag parser matches whole names only
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="(ours) address to bind (default 127.0.0.1; 0.0.0.0 as tensorflow_model_server)",
    )
    p.add_argument(
        "--max_request_size_bytes",
        type=_int("int32"),
        default=256 << 20,
        help="(ours) largest accepted gRPC message or REST body (default 256 MiB)",
    )
    p.add_argument(
        "--max_request_elements",
        type=_int("int64"),
        default=DEFAULT_MAX_ELEMENTS,
        help=(
            "(ours) most elements one request tensor may declare, checked before allocating "
            f"(default {DEFAULT_MAX_ELEMENTS}); more is INVALID_ARGUMENT"
        ),
    )
    p.add_argument(
        "--drain_grace_seconds",
        type=float,
        default=20.0,
        help=(
            "(ours) on SIGTERM: stop accepting, let in-flight gRPC and REST requests finish for "
            "up to this long, then exit (default 20; keep it below the pod's "
            "terminationGracePeriodSeconds minus its preStop sleep)"
        ),
    )
    fractional = {"file_system_poll_wait_seconds", "model_config_file_poll_wait_seconds"}
    for name, kind, default, effect in TF_FLAGS:
        note = {"noop": " [accepted, no effect here]", "warn": " [cannot apply here]"}.get(
            effect, ""
        )
        help_text = f"{kind}, default {default!r}{note}"
        if kind == "bool":
            p.add_argument(
                f"--{name}",
                nargs="?",
                const=True,
                default=default,
                type=parse_bool,
                metavar="BOOL",
                help=help_text,
            )
        elif name in fractional:
            p.add_argument(f"--{name}", type=float, default=default, help=help_text)
        elif kind in _INT_RANGE:
            p.add_argument(f"--{name}", type=_int(kind), default=default, help=help_text)
        elif kind == "float":
            p.add_argument(f"--{name}", type=float, default=default, help=help_text)
        else:
            p.add_argument(f"--{name}", default=default, help=help_text)
    return p


def parse_channel_arguments(text: str) -> tuple[tuple[str, int | str], ...]:
    """``--grpc_channel_arguments``: ``key=value,...``; integer values pass as integers."""
    out: list[tuple[str, int | str]] = []
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OptionsError(f"--grpc_channel_arguments: {item!r} is not key=value")
        try:
            out.append((key, int(value)))
        except ValueError:
            out.append((key, value))
    return tuple(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags as tensorflow_model_server reads them: an unknown argument is reported and ignored
    (main.cc prints it with the usage and goes on); a bad value stops with the usage."""
    args, unknown = parser().parse_known_args(argv)
    for arg in unknown:
        log.warning("unknown argument: %s (ignored, as tensorflow_model_server does)", arg)
    return args


def options_from_args(argv: list[str] | None = None) -> ServerOptions:
    """Parse flags and every file they name, with ``Server::BuildAndStart``'s checks.

    Raises:
        OptionsError: an invalid combination of flags or an unreadable/invalid file; the
            message is TF Serving's where it has one.
    """
    args = parse_args(argv)
    for name, _, default, effect in TF_FLAGS:
        if effect == "warn" and getattr(args, name) != default:
            log.warning("--%s=%s cannot apply to this server: ignored", name, getattr(args, name))
    for flag in ("port", "rest_api_port"):
        value = getattr(args, flag)
        if not 0 <= value <= 65535:
            raise OptionsError(f"--{flag}: {value} is not a port number")
    if args.port == 0 and not args.grpc_socket_path:
        raise OptionsError(
            "INVALID_ARGUMENT: At least one of server_options.grpc_port or "
            "server_options.grpc_socket_path must be set."
        )
    if args.use_alts_credentials and args.ssl_config_file:
        raise OptionsError(
            "INVALID_ARGUMENT: Either use_alts_credentials must be false or "
            "ssl_config_file must be empty."
        )
    if not args.model_base_path and not args.model_config_file:
        raise OptionsError(
            "INVALID_ARGUMENT: Both server_options.model_base_path and "
            "server_options.model_config_file are empty!"
        )
    if args.grpc_max_threads < 1:
        raise OptionsError("--grpc_max_threads: must be >= 1")
    if args.rest_api_num_threads < 1:
        raise OptionsError("--rest_api_num_threads: must be >= 1")
    if args.max_request_size_bytes < 1024:
        raise OptionsError("--max_request_size_bytes: must be >= 1024")
    if args.max_request_elements < 1:
        raise OptionsError("--max_request_elements: must be >= 1")
    if not args.drain_grace_seconds >= 0:
        raise OptionsError("--drain_grace_seconds: must be >= 0")
    if args.model_config_file:
        config = read_model_config(args.model_config_file)
    else:
        config = single_model_config(args.model_name, args.model_base_path)
    batching = None
    if args.enable_batching:
        batching = Batching()
        if args.batching_parameters_file:
            batching = _batching(args.batching_parameters_file)
    elif args.batching_parameters_file:
        raise OptionsError(
            "INVALID_ARGUMENT: server_options.batching_parameters_file is set without setting "
            "server_options.enable_batching to true."
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
        grpc_socket_path=args.grpc_socket_path,
        grpc_channel_arguments=parse_channel_arguments(args.grpc_channel_arguments),
        rest_api_port=args.rest_api_port if args.rest_api_port != args.port else 0,
        rest_api_num_threads=args.rest_api_num_threads,
        rest_api_timeout_in_ms=args.rest_api_timeout_in_ms,
        rest_api_enable_cors_support=args.rest_api_enable_cors_support,
        model_config=config,
        model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        batching=batching,
        metrics_path=metrics_path,
        tls=tls,
        grpc_max_threads=args.grpc_max_threads,
        max_request_size_bytes=args.max_request_size_bytes,
        max_request_elements=args.max_request_elements,
        drain_grace_seconds=args.drain_grace_seconds,
        allow_version_labels_for_unavailable_models=(
            args.allow_version_labels_for_unavailable_models
        ),
        enable_grpc_healthcheck_service=args.enable_grpc_healthcheck_service,
        tensor_content=args.enable_serialization_as_tensor_content,
        load=LoadOptions(
            saved_model_tags=tuple(t for t in args.saved_model_tags.split(",") if t),
            enable_model_warmup=args.enable_model_warmup,
            num_request_iterations_for_warmup=max(1, args.num_request_iterations_for_warmup),
            max_num_load_retries=max(0, args.max_num_load_retries),
            load_retry_interval_seconds=max(0.0, args.load_retry_interval_micros / 1e6),
            enable_signature_method_name_check=args.enable_signature_method_name_check,
            session_config=_session_config(args),
        ),
    )


def _batching(path: str) -> Batching:
    b = parse_text(path, MESSAGES["BatchingParameters"](), "--batching_parameters_file")
    batching = Batching(
        max_batch_size=b.max_batch_size.value if b.HasField("max_batch_size") else 1000,
        batch_timeout_micros=b.batch_timeout_micros.value,
        max_enqueued_batches=(
            b.max_enqueued_batches.value if b.HasField("max_enqueued_batches") else 10
        ),
        num_batch_threads=b.num_batch_threads.value if b.HasField("num_batch_threads") else 4,
        allowed_batch_sizes=tuple(b.allowed_batch_sizes),
        pad_variable_length_inputs=b.pad_variable_length_inputs,
    )
    sizes = batching.allowed_batch_sizes
    if sizes and (list(sizes) != sorted(set(sizes)) or sizes[-1] != batching.max_batch_size):
        raise OptionsError(
            "--batching_parameters_file: allowed_batch_sizes must increase and end with "
            f"max_batch_size ({batching.max_batch_size}); got {list(sizes)}"
        )
    return batching


def _session_config(args: argparse.Namespace) -> Any:
    """The session ConfigProto as ``Server::BuildAndStart`` assembles it."""
    from tensorflow.core.protobuf import config_pb2

    config = config_pb2.ConfigProto()
    if args.tensorflow_session_config_file:
        parse_text(args.tensorflow_session_config_file, config, "--tensorflow_session_config_file")
    intra, inter = args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism
    both = args.tensorflow_session_parallelism
    if intra > 0 and inter > 0 and both > 0:
        raise OptionsError(
            "INVALID_ARGUMENT: Either configure server_options.tensorflow_session_parallelism "
            "or (server_options.tensorflow_intra_op_parallelism, "
            "server_options.tensorflow_inter_op_parallelism) separately. You cannot "
            "configure all."
        )
    if intra > 0 or inter > 0:
        config.intra_op_parallelism_threads, config.inter_op_parallelism_threads = intra, inter
    elif both > 0 or not args.tensorflow_session_config_file:
        config.intra_op_parallelism_threads = config.inter_op_parallelism_threads = both
    return config
