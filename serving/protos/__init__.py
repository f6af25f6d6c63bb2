"""TF Serving's messages without TensorFlow: classes built from ``descriptors.binpb``.

The descriptors are loaded into a private pool, so these classes never clash with the official
ones when both are imported in one process, and they are wire-identical to them (same full
names, fields and numbers). Regenerate the file with ``make protos``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_SET = descriptor_pb2.FileDescriptorSet.FromString(
    Path(__file__).with_name("descriptors.binpb").read_bytes()
)
POOL = descriptor_pool.DescriptorPool()
for _file in _SET.file:
    POOL.Add(_file)


def message(full_name: str) -> Any:
    """The message class for a full proto name, e.g. ``tensorflow.serving.PredictRequest``."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


TensorProto = message("tensorflow.TensorProto")
Example = message("tensorflow.Example")
ModelSpec = message("tensorflow.serving.ModelSpec")
PredictRequest = message("tensorflow.serving.PredictRequest")
PredictResponse = message("tensorflow.serving.PredictResponse")
ClassificationRequest = message("tensorflow.serving.ClassificationRequest")
ClassificationResponse = message("tensorflow.serving.ClassificationResponse")
RegressionRequest = message("tensorflow.serving.RegressionRequest")
RegressionResponse = message("tensorflow.serving.RegressionResponse")
GetModelMetadataRequest = message("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse = message("tensorflow.serving.GetModelMetadataResponse")
SignatureDefMap = message("tensorflow.serving.SignatureDefMap")
GetModelStatusRequest = message("tensorflow.serving.GetModelStatusRequest")
GetModelStatusResponse = message("tensorflow.serving.GetModelStatusResponse")
ModelVersionStatus = message("tensorflow.serving.ModelVersionStatus")
ReloadConfigRequest = message("tensorflow.serving.ReloadConfigRequest")
ReloadConfigResponse = message("tensorflow.serving.ReloadConfigResponse")
ModelServerConfig = message("tensorflow.serving.ModelServerConfig")
PredictionLog = message("tensorflow.serving.PredictionLog")

# Full method paths of the two services (prediction_service.proto, model_service.proto).
PREDICT = "/tensorflow.serving.PredictionService/Predict"
CLASSIFY = "/tensorflow.serving.PredictionService/Classify"
REGRESS = "/tensorflow.serving.PredictionService/Regress"
GET_MODEL_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
RELOAD_CONFIG = "/tensorflow.serving.ModelService/HandleReloadConfigRequest"
