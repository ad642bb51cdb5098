"""What a quantization run is asked to do, what it reports while running, and what it made."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantizeSettings:
    """AWQ (or round-to-nearest) settings; `key()` names the result in caches and resumes."""

    method: Literal["awq", "rtn"] = "awq"  # rtn = round-to-nearest, the baseline
    group_size: int = 128  # 32 / 64 / 128
    w_bit: int = 4
    zero_point: bool = True
    calib: Path | None = None  # None = the calibration set shipped with the package
    n_samples: int = 128  # calibration blocks of seq_len tokens (AutoAWQ's default count)
    seq_len: int = 512

    def validate(self) -> None:
        """Raise `QuantizeError` for settings the AutoAWQ GEMM format cannot hold."""
        from hubdeploy.quantize.errors import MissingFiles, QuantizeError

        if self.method not in ("awq", "rtn"):
            raise QuantizeError(f"unknown method {self.method!r}: use 'awq' or 'rtn'")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise QuantizeError(f"group size {self.group_size} is not supported: use 32, 64 or 128")
        if self.w_bit != 4 or not self.zero_point:
            raise QuantizeError("only 4-bit with zero point (AutoAWQ GEMM) is written; keep w_bit=4, zero_point=True")
        if self.n_samples < 1 or self.seq_len < 8:
            raise QuantizeError("calibration needs n_samples >= 1 and seq_len >= 8")
        if self.calib is not None and not Path(self.calib).is_file():
            raise MissingFiles(f"calibration file {self.calib} not found: pass an existing .txt or .jsonl file")

    def key(self) -> str:
        """Stable 12-hex-digit hash of the settings and the calibration text's content.

        Round-to-nearest ignores calibration, so its key does not depend on it.
        """
        fields = asdict(self)
        if self.method == "rtn":
            fields.update(calib=None, n_samples=0, seq_len=0)
        else:
            from hubdeploy.quantize.calibration import calibration_digest

            fields["calib"] = calibration_digest(self.calib)
        blob = json.dumps(fields, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class QuantizeProgress:
    """One progress report: `stage` is "calibrating", "layer", "writing" or "done"."""

    layers_done: int
    layers_total: int
    bytes_written: int
    stage: str


@dataclass
class QuantizeResult:
    """A finished checkpoint; `calibration` names the set used (shipped name, or file name + hash)."""

    out_dir: Path
    calibration: str
    layers: int
    seconds: float
    bytes_written: int


__all__ = ["QuantizeProgress", "QuantizeResult", "QuantizeSettings", "SUPPORTED_GROUP_SIZES"]
