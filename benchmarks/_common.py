"""What the benchmark scripts share: the import path and the full-size shapes they measure.

Run as `python benchmarks/X.py`, Python puts `benchmarks/` first on `sys.path`, where
`benchmarks/kernels.py` would shadow the `kernels` package: `use_source_tree()` swaps it for
the repository root so the scripts run from the source tree without an install.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# Mixtral-8x7B's published config (the shapes the roofline figures are for).
MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2,
                    vocab_size=32000)


def use_source_tree() -> None:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    root = os.path.dirname(HERE)
    if root not in sys.path:
        sys.path.insert(0, root)
