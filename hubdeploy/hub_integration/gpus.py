"""The GPU catalog (data in gpus.json): memory, bandwidth and compute of single GPUs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from hubdeploy.hub_integration.errors import UnknownGPUError

_CATALOG = Path(__file__).with_name("gpus.json")


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: int  # marketed size
    memory_mib: int  # as nvidia-smi reports it
    bandwidth_gbs: float
    bf16_tflops: float
    bf16: bool = True
    compute_capability: str = ""
    aliases: tuple[str, ...] = field(default=())
    ray_accelerator_type: str = ""  # the `accelerator_type:<X>` resource of Ray nodes with this GPU

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 2**20


@lru_cache(maxsize=1)
def catalog() -> tuple[GPU, ...]:
    """All GPUs, smallest memory first."""
    data = json.loads(_CATALOG.read_text())["gpus"]
    return tuple(GPU(**{**g, "aliases": tuple(g.get("aliases", ()))}) for g in data)


def _norm(s: str) -> str:
    return s.lower().replace("_", "-").replace(" ", "-")


def get_gpu(name: str | GPU) -> GPU:
    """Look a GPU up by name or alias, case-insensitively (`H100`, `a100-80gb`, `A100`)."""
    if isinstance(name, GPU):
        return name
    key = _norm(name)
    for g in catalog():
        if key == _norm(g.name) or key in (_norm(a) for a in g.aliases):
            return g
    raise UnknownGPUError(f"unknown GPU {name!r}; known: {', '.join(g.name for g in catalog())}")
