"""kernels/tuned.py: the per-GPU tuned launch configs the launchers read (nearest M, safe fallbacks)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hubdeploy.kernels.awq import awq_config
from hubdeploy.kernels.fused_moe import moe_direct_config
from hubdeploy.kernels.tuned import CONFIG_DIR, device_file_name, load_table, nearest_config


def test_nearest_config_picks_the_closest_tuned_m() -> None:
    by_m = {"1": {"BLOCK_N": 32}, "8": {"BLOCK_N": 64}, "16": {"BLOCK_N": 128}}
    assert nearest_config(by_m, 1) == {"BLOCK_N": 32}
    assert nearest_config(by_m, 3) == {"BLOCK_N": 32}
    assert nearest_config(by_m, 6) == {"BLOCK_N": 64}
    assert nearest_config(by_m, 12) == {"BLOCK_N": 64}  # a tie goes to the smaller M
    assert nearest_config(by_m, 500) == {"BLOCK_N": 128}
    assert nearest_config({}, 4) is None and nearest_config(None, 4) is None
    got = nearest_config(by_m, 1)
    got["BLOCK_N"] = 0  # a copy: callers may update it
    assert by_m["1"] == {"BLOCK_N": 32}


def test_load_table_reads_the_device_file_and_survives_a_broken_one(tmp_path: Path) -> None:
    (tmp_path / device_file_name("Fake GPU/X")).write_text(json.dumps({"awq": {"N=1,K=2,G=3": {"1": {"a": 1}}}}))
    assert load_table("Fake GPU/X", tmp_path)["awq"]["N=1,K=2,G=3"]["1"] == {"a": 1}
    (tmp_path / device_file_name("Broken")).write_text("{not json")
    assert load_table("Broken", tmp_path) == {}
    assert load_table("Absent", tmp_path) == {}


def test_committed_tables_are_well_formed() -> None:
    """Every committed table names its device and source, and each config has the launch keys."""
    for path in sorted(CONFIG_DIR.glob("*.json")):
        table = json.loads(path.read_text())
        assert path.name == device_file_name(table["device"]) and table["source"]
        for kernel in ("awq", "moe_direct", "moe_aligned"):
            for shape, by_m in table.get(kernel, {}).items():
                for m, cfg in by_m.items():
                    assert int(m) > 0 and {"BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps"} <= cfg.keys(), (path, shape, m)
                    assert cfg["BLOCK_K"] % 8 == 0 and cfg["BLOCK_N"] & (cfg["BLOCK_N"] - 1) == 0


def test_cpu_launches_never_read_tuned_tables() -> None:
    """Tables are per CUDA device: the interpreter/CPU path keeps the rules."""
    cpu = torch.device("cpu")
    for m in (1, 5, 16):
        cfg = moe_direct_config(m, 8, 28672, 4096, 128, cpu)
        assert cfg["BLOCK_M"] == 16 and cfg["SPLIT_K"] == 0 and cfg["num_warps"] == 1  # the interpreter's rule
    assert awq_config(1, 6144, 4096, 128, cpu)["BLOCK_M"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_launches_use_the_committed_table_when_there_is_one() -> None:
    name = torch.cuda.get_device_name()
    table = load_table(name)
    by_m = table.get("moe_direct", {}).get("E=8,N=28672,K=4096,G=128")
    if not by_m:
        pytest.skip(f"no tuned moe_direct table committed for {name}")
    assert moe_direct_config(1, 8, 28672, 4096, 128, torch.device("cuda")) == nearest_config(by_m, 1)
