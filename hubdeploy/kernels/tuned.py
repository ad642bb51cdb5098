"""Tuned Triton launch configs, one JSON per GPU kind (as vLLM ships `device_name=….json`).

`configs/<device name>.json` (spaces as underscores) is written by `benchmarks/tune_kernels.py`
on that GPU and committed. Layout:

    {"device": "NVIDIA H200", "source": "...", "<kernel>": {"<shape key>": {"<M>": {config}}}}

A launcher asks `tuned_config(kernel, shape_key, M, device)` and gets the config tuned for the
nearest M (the one whose M is closest, as vLLM picks), or None: then its own rules apply. The
file is read once per device name; a missing or malformed file means "no tuned configs".
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
log = logging.getLogger(__name__)


def device_file_name(device_name: str) -> str:
    """`NVIDIA H200` -> `NVIDIA_H200.json`."""
    return device_name.replace(" ", "_").replace("/", "_") + ".json"


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def load_table(device_name: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The tuned table for `device_name` ({} when none is committed or it cannot be read)."""
    path = config_dir / device_file_name(device_name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a broken file must not stop the engine: rules still work
        log.warning("ignoring tuned kernel configs %s: %s", path, e)
        return {}


def tuned_config(kernel: str, shape_key: str, M: int, device: torch.device) -> dict[str, int] | None:
    """The config tuned for `kernel` at `shape_key` and the M nearest to `M`, or None."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return nearest_config(load_table(_device_name(index)).get(kernel, {}).get(shape_key), M)


def nearest_config(by_m: dict[str, dict[str, int]] | None, M: int) -> dict[str, int] | None:
    """The config of the tuned M closest to `M` (the smaller on a tie), or None."""
    if not by_m:
        return None
    nearest = min(by_m, key=lambda m: (abs(int(m) - M), int(m)))
    return dict(by_m[nearest])
