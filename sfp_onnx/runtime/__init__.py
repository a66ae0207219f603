"""The onnxruntime side: sessions, exactness checks, accuracy, latency, target preferences.

Modules: :mod:`~sfp_onnx.runtime.session` (providers and sessions),
:mod:`~sfp_onnx.runtime.verify` (rewritten model == reference), :mod:`~sfp_onnx.runtime.evaluate`
(top-1/top-5), :mod:`~sfp_onnx.runtime.bench` (interleaved latency) and
:mod:`~sfp_onnx.runtime.target` (what channel counts the target's kernels want).
"""
