"""`sd-bench`: side-by-side benchmarks of sd-onnx against diffusers (PyTorch) and Optimum (onnxruntime)."""
