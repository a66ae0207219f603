"""The ONNX side: load and normalise, channel analysis, exact zeros, scoring, surgery, costs.

Modules: :mod:`~sfp_onnx.graph.load` (read, check, normalise, save),
:mod:`~sfp_onnx.graph.groups` (the channel-group records), :mod:`~sfp_onnx.graph.analyze`
(builds them, with :mod:`~sfp_onnx.graph.context` and the op rules of
:mod:`~sfp_onnx.graph._channel_rules` and :mod:`~sfp_onnx.graph._axis_rules`),
:mod:`~sfp_onnx.graph.zeros` (which channels are exactly zero),
:mod:`~sfp_onnx.graph.soft_prune` (scores, choices, zeroing initializers),
:mod:`~sfp_onnx.graph.rewrite` (the surgery), :mod:`~sfp_onnx.graph.measure` (MACs, params,
bytes), :mod:`~sfp_onnx.graph.allocate` (per-group widths for a MACs budget) and
:mod:`~sfp_onnx.graph.passes` (rewrites of the copies that are imported or
measured). Nothing here imports torch or onnxruntime.
"""
