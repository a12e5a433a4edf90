"""ONNX export of the dense blocks for inspection (export issue)."""
