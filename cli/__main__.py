"""``python -m sfp_onnx.cli``: the ``sfp-onnx`` command, for ``torchrun -m sfp_onnx.cli``."""

from sfp_onnx.cli.main import main

main(prog_name="sfp-onnx")
