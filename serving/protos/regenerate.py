"""Regenerate ``descriptors.binpb`` from the official tensorflow-serving-api package.

    python -m serving.protos.regenerate      (or: make protos)

The file is a ``FileDescriptorSet``: every .proto file the TF Serving APIs use, with its
dependencies (TensorFlow's tensor, example and meta_graph protos, Google's well-known types).
``serving.protos`` loads it into a private descriptor pool at import time, so the client gets
wire-identical message classes without importing TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2

OUT = Path(__file__).with_name("descriptors.binpb")


def collect() -> descriptor_pb2.FileDescriptorSet:
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        inference_pb2,
        model_management_pb2,
        predict_pb2,
        prediction_log_pb2,
        regression_pb2,
    )
    from tensorflow_serving.config import model_server_config_pb2

    roots = [
        classification_pb2, get_model_metadata_pb2, get_model_status_pb2, inference_pb2,
        model_management_pb2, predict_pb2, prediction_log_pb2, regression_pb2,
        model_server_config_pb2,
    ]
    ordered: list = []
    seen: set[str] = set()

    def visit(fd) -> None:  # dependencies first, as a descriptor pool needs them
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            visit(dep)
        ordered.append(fd)

    for module in roots:
        visit(module.DESCRIPTOR)
    out = descriptor_pb2.FileDescriptorSet()
    for fd in ordered:
        out.file.add().MergeFromString(fd.serialized_pb)
    return out


def main() -> None:
    data = collect().SerializeToString(deterministic=True)
    OUT.write_bytes(data)
    print(f"wrote {OUT} ({len(data)} bytes)")


if __name__ == "__main__":
    main()
