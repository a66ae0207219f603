"""Image data for training and evaluation: datasets, transforms, balanced subsets, loaders.

Its own package because both sides read it: the training loop (torch) and the accuracy of
ONNX files in onnxruntime. Modules: :mod:`~sfp_onnx.data.datasets`.
"""
