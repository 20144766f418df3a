"""Model execution (ONNX Runtime). Only the worker imports this package."""
