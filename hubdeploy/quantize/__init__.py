"""Our own AWQ quantizer: a 16-bit Hub checkpoint becomes an AutoAWQ-GEMM checkpoint.

`quantize_model(src, out, settings, on_progress)` is the one entry point (the CLI's
`hubdeploy quantize` and the deploy flow's `quantizing` phase call it); docs/interfaces.md
describes the contract (settings key, progress, resume, errors).
"""
from __future__ import annotations

from hubdeploy.quantize.errors import AlreadyQuantized, MissingFiles, NoSpace, QuantizeError, UnsupportedArchitecture
from hubdeploy.quantize.quantizer import disk_free, quantization_config, quantize_model
from hubdeploy.quantize.settings import QuantizeProgress, QuantizeResult, QuantizeSettings

__all__ = [
    "AlreadyQuantized",
    "MissingFiles",
    "NoSpace",
    "QuantizeError",
    "QuantizeProgress",
    "QuantizeResult",
    "QuantizeSettings",
    "UnsupportedArchitecture",
    "disk_free",
    "quantization_config",
    "quantize_model",
]
