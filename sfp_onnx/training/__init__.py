"""The torch side: import into PyTorch, soft pruning during training, the loop, checkpoints.

Modules: :mod:`~sfp_onnx.training.import_torch` (onnx2torch and the weight links, with the
extra converters of :mod:`~sfp_onnx.training.converters`), :mod:`~sfp_onnx.training.sfp` (the
SFP step), :mod:`~sfp_onnx.training.train` (the fine-tuning loop),
:mod:`~sfp_onnx.training.checkpoint` (the state on disk) and :mod:`~sfp_onnx.training.zoo`
(CIFAR ResNets for examples and tests).
"""
