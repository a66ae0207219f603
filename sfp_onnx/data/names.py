"""The names of the data sets sfp-onnx reads, importable without torch (for the CLI)."""

__all__ = ["DATASETS"]

DATASETS = ("cifar10", "cifar100", "imagefolder")
