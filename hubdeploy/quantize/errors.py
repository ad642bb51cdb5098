"""Errors of `quantize_model`: one base class, each message says what to do next."""
from __future__ import annotations


class QuantizeError(Exception):
    """A model that cannot be quantized as asked; the message says what to do instead."""


class UnsupportedArchitecture(QuantizeError):
    """The architecture (or a layout detail of it) has no decoder layer we can calibrate."""


class AlreadyQuantized(QuantizeError):
    """The source checkpoint is quantized already (AWQ, GPTQ, FP8, ...)."""


class MissingFiles(QuantizeError):
    """config.json, a safetensors shard, a tensor or the tokenizer is missing from the source."""


class NoSpace(QuantizeError):
    """The output filesystem has less free space than the checkpoint will take."""


__all__ = ["AlreadyQuantized", "MissingFiles", "NoSpace", "QuantizeError", "UnsupportedArchitecture"]
