"""Quantize one decoder layer: AWQ (scale search, folding, clipping) or round-to-nearest.

Works on the layer's tensor dict (float32, names relative to the layer). AWQ's groups, as
AutoAWQ's `get_layers_for_scaling` for Mixtral / Qwen3-MoE / Llama:
- q/k/v share the input norm's output: scales folded into `input_layernorm`;
- o_proj, when v_proj's shape equals o_proj's (no GQA): scales folded into v_proj's rows;
- every expert's gate/up (w1/w3) share the post-attention norm's output: folded into
  `post_attention_layernorm`, and (unlike AutoAWQ) the router gate's columns are multiplied
  by the same scales, so routing is exactly unchanged;
- each expert's down (w2) on the tokens the router sends it: folded into its up (w3) rows.
Searches run on the original weights; then all scales are applied, then clipping is searched
on the scaled weights and inputs (not for q/k, whose error the q.k product amplifies).
"""
from __future__ import annotations

from typing import Callable

import torch

from hubdeploy.kernels.awq_format import awq_quantize
from hubdeploy.quantize import awq_search as S
from hubdeploy.quantize.decoder import LayerTrace, Weights, attention, expert_act, mlp
from hubdeploy.quantize.source import MlpNames
from hubdeploy.serving.config import ModelConfig

NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


def pack_layer(w: Weights, linears: list[str], group_size: int) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors for `linears`, every other tensor float16.

    As AutoAWQ, which quantizes a model loaded in float16: the (scaled, clipped) weight is
    cast to float16 first, so the integers are those of the fp16 weight it stores scales for.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in w.items():
        base = name[: -len(".weight")]
        if name.endswith(".weight") and base in linears:
            wq = to_float16(t)
            out[base + ".qweight"], out[base + ".qzeros"], out[base + ".scales"] = awq_quantize(wq, group_size)
        else:
            out[name] = to_float16(t)
    return out


def to_float16(t: torch.Tensor) -> torch.Tensor:
    """float16, saturating (a bf16 value beyond fp16's range becomes +-65504, not inf)."""
    return t.float().clamp(-65504, 65504).half() if t.is_floating_point() else t


class AwqLayer:
    """AWQ for one layer: `run()` changes `w` in place (scales folded, weights clipped)."""

    def __init__(self, w: Weights, trace: LayerTrace, cfg: ModelConfig, names: MlpNames,
                 cos_sin: torch.Tensor, group_size: int) -> None:
        self.w, self.t, self.cfg, self.names, self.cos_sin, self.g = w, trace, cfg, names, cos_sin, group_size

    def _search(self, x: torch.Tensor, linears: list[str], forward: Callable[[Weights], torch.Tensor]) -> torch.Tensor:
        weights = [self.w[n + ".weight"] for n in linears]

        def run(s: torch.Tensor | None) -> torch.Tensor:
            if s is None:
                return forward(self.w)
            trial = dict(self.w)
            for n, wt in zip(linears, weights):
                trial[n + ".weight"] = S.scaled_fake_quant(wt, s, self.g)
            return forward(trial)

        return S.search_scales(S.channel_mean_abs(x), S.weight_mean_normalised(weights, self.g), run)

    def run(self) -> None:
        w, t, names = self.w, self.t, self.names
        qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        plans: list[tuple[str, str, list[str], torch.Tensor]] = []  # (kind, prev, linears, scales)
        plans.append(("norm", "input_layernorm", qkv,
                      self._search(t.h, qkv, lambda ww: attention(t.h, ww, self.cfg, self.cos_sin)[0])))
        if w["self_attn.v_proj.weight"].shape == w["self_attn.o_proj.weight"].shape:
            o = ["self_attn.o_proj"]
            plans.append(("fc", "self_attn.v_proj", o,
                          self._search(t.o_in, o, lambda ww: torch.nn.functional.linear(t.o_in, ww["self_attn.o_proj.weight"]))))
        gate_up = [n for g, u, _ in names.experts for n in (g, u)]
        plans.append(("norm", "post_attention_layernorm", gate_up,
                      self._search(t.h2, gate_up, lambda ww: mlp(t.h2, ww, names, t.routing))))
        acts: dict[str, torch.Tensor] = {}
        for (g, u, d), rows in zip(names.experts, t.routing.rows):
            if not rows.numel():
                continue  # an expert no calibration token reached: plain rounding (AutoAWQ stops here)
            act = expert_act(t.h2[rows], w, g, u)
            acts[d] = act
            plans.append(("fc", u, [d], self._search(act, [d], lambda ww, d=d, act=act: torch.nn.functional.linear(act, ww[d + ".weight"]))))
        inputs: dict[str, torch.Tensor] = {n: t.h for n in qkv}
        inputs["self_attn.o_proj"] = t.o_in
        for (g, u, d), rows in zip(names.experts, t.routing.rows):
            if rows.numel():
                inputs[g] = inputs[u] = t.h2[rows]
                inputs[d] = acts[d]
        for kind, prev, linears, s in plans:
            self._apply(kind, prev, linears, s)
            for n in linears:
                if n in inputs:
                    inputs[n] = inputs[n] / s
        for n, x in inputs.items():
            if n not in NO_CLIP:
                key = n + ".weight"
                w[key] = S.apply_clip(w[key], S.search_clip(w[key], x, self.g), self.g)

    def _apply(self, kind: str, prev: str, linears: list[str], s: torch.Tensor) -> None:
        w = self.w
        if kind == "norm":
            w[prev + ".weight"] = w[prev + ".weight"] / s
            if prev == "post_attention_layernorm" and self.names.router is not None:
                key = self.names.router + ".weight"
                w[key] = w[key] * s.view(1, -1)
        else:  # a linear's output rows feed the scaled input channels
            w[prev + ".weight"] = w[prev + ".weight"] / s.view(-1, 1)
            if prev + ".bias" in w:
                w[prev + ".bias"] = w[prev + ".bias"] / s
        for n in linears:
            w[n + ".weight"] = w[n + ".weight"] * s.view(1, -1)


__all__ = ["AwqLayer", "NO_CLIP", "pack_layer", "to_float16"]
