"""AutoAWQ GEMM format reference: packing order, round trips, quantization error bounds."""
from __future__ import annotations

import json

import pytest
import torch

from hubdeploy.kernels.awq_format import (
    AWQ_ORDER,
    awq_dequantize,
    awq_pack_int4,
    awq_quantize,
    awq_unpack,
    awq_unpack_int4,
    read_legacy_quant_config,
)


def test_nibble_order_matches_autoawq_description() -> None:
    # Row of output columns 0..7 with value == column index: nibble i must hold column AWQ_ORDER[i].
    packed = awq_pack_int4(torch.arange(8, dtype=torch.int32)[None, :])
    word = int(packed[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == AWQ_ORDER == [0, 2, 4, 6, 1, 3, 5, 7]
    # Hand-computed word: 0x75316420
    assert word == 0x75316420


def test_pack_unpack_roundtrip_incl_sign_bit() -> None:
    g = torch.Generator().manual_seed(0)
    vals = torch.randint(0, 16, (5, 24), generator=g, dtype=torch.int32)
    vals[0, :] = 15  # every nibble set: int32 is negative
    packed = awq_pack_int4(vals)
    assert packed.dtype == torch.int32 and packed.shape == (5, 3)
    assert int(packed[0, 0]) == -1
    assert torch.equal(awq_unpack_int4(packed).to(torch.int32), vals)


def test_pack_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="0..15"):
        awq_pack_int4(torch.full((1, 8), 16, dtype=torch.int32))


@pytest.mark.parametrize("out_f,in_f,group", [(16, 64, 32), (64, 128, 32), (24, 256, 128)])
def test_quantize_shapes_and_error_bound(out_f: int, in_f: int, group: int) -> None:
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * 0.05).to(torch.float16)
    qweight, qzeros, scales = awq_quantize(w, group)
    assert qweight.shape == (in_f, out_f // 8) and qweight.dtype == torch.int32
    assert qzeros.shape == (in_f // group, out_f // 8) and qzeros.dtype == torch.int32
    assert scales.shape == (in_f // group, out_f) and scales.dtype == torch.float16
    iw, iz = awq_unpack(qweight, qzeros)
    assert iw.shape == (in_f, out_f) and iz.shape == (in_f // group, out_f)
    assert int(iz.max()) <= 15 and int(iw.max()) <= 15
    deq = awq_dequantize(qweight, qzeros, scales, group)
    assert deq.shape == (in_f, out_f) and deq.dtype == torch.float16
    # Error of round-to-nearest is at most half a step (plus fp16 rounding of the output).
    step = scales.to(torch.float64).repeat_interleave(group, dim=0)
    err = (deq.to(torch.float64) - w.t().to(torch.float64)).abs()
    assert bool((err <= 0.5 * step + 1e-3).all()), float((err / step).max())


def test_dequantize_matches_float64_formula() -> None:
    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (64, 16), generator=g, dtype=torch.int32)
    z = torch.randint(0, 16, (2, 16), generator=g, dtype=torch.int32)
    s = (torch.rand(2, 16, generator=g, dtype=torch.float64) * 0.01 + 1e-3).to(torch.float16)
    deq = awq_dequantize(awq_pack_int4(q), awq_pack_int4(z), s, 32)
    ref = (q.double() - z.double().repeat_interleave(32, 0)) * s.double().repeat_interleave(32, 0)
    torch.testing.assert_close(deq.double(), ref, atol=1e-4, rtol=1e-3)


def test_group_size_must_divide() -> None:
    with pytest.raises(ValueError, match="group_size"):
        awq_quantize(torch.zeros(8, 48), 32)


def test_zero_is_exact_when_group_spans_zero() -> None:
    # The zero point exists so that 0.0 is representable: a weight of exactly 0 in a group
    # whose range spans 0 dequantizes to exactly 0.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 32, generator=g) * 0.1
    w[:, 5] = 0.0
    qweight, qzeros, scales = awq_quantize(w, 32)
    deq = awq_dequantize(qweight, qzeros, scales, 32)
    assert torch.equal(deq[5].float(), torch.zeros(8))


def test_legacy_quant_config(tmp_path) -> None:
    assert read_legacy_quant_config(tmp_path) is None
    (tmp_path / "quant_config.json").write_text(
        json.dumps({"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"})
    )
    q = read_legacy_quant_config(tmp_path)
    assert q == {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": [],
    }
