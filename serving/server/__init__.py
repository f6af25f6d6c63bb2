"""An embedded, TensorFlow-Serving-compatible model server (gRPC + REST)."""
