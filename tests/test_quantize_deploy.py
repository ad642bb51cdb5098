"""Quantize on deploy (issue 19, the service side): the AWQ plan and offer, refusals at create,
and an fp16 model that becomes a running AWQ endpoint through the real service, the real
local Hub, the real quantizer in its worker process and the `openai` client."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hubdeploy.hub_integration.memory_plan import awq_on_deploy_bytes, plan, plan_all
from hubdeploy.hub_integration.quantize_offer import quantize_offer, quantize_refusal
from hubdeploy.hub_integration.report import ModelReport, inspect_model
from hubdeploy.hub_integration.service import build_service_app
from tests.fixtures.service import ADMIN, LiveService, chat, pid_alive, reap, wait_status

MIXTRAL_BF16 = "mistralai/Mixtral-8x7B-Instruct-v0.1"
MIXTRAL_AWQ = "TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ"


@pytest.fixture(scope="module")
def bf16(shape_only_hub: Any) -> ModelReport:
    return inspect_model(MIXTRAL_BF16, endpoint=shape_only_hub.endpoint)


@pytest.fixture(scope="module")
def awq(shape_only_hub: Any) -> ModelReport:
    return inspect_model(MIXTRAL_AWQ, endpoint=shape_only_hub.endpoint)


def test_awq_on_deploy_size_matches_a_real_awq_checkpoint(bf16: ModelReport, awq: ModelReport) -> None:
    # TheBloke's AutoAWQ checkpoint of the same model (group 128, gates and lm_head 16-bit):
    # the estimate from the bf16 headers alone is within 0.5 % of its real tensor bytes
    weights, decode = awq_on_deploy_bytes(bf16, 128)
    assert abs(weights - awq.weights.total_bytes) / awq.weights.total_bytes < 0.005, (weights, awq.weights.total_bytes)
    assert abs(decode - awq.weights.active_bytes_per_token) / awq.weights.active_bytes_per_token < 0.01
    assert awq_on_deploy_bytes(bf16, 32)[0] > weights  # smaller groups: more scales and zeros
    p16, p4 = plan(bf16, "H100"), plan(bf16, "H100", quantize="awq")
    assert not p16.fits and "quantize it to AWQ 4-bit on deploy" not in p16.reason  # an AWQ variant exists
    assert p4.fits and p4.weights_bytes == weights and p4.quantize == "awq" and p4.quantize_group_size == 128


def test_offer_and_refusals(bf16: ModelReport, awq: ModelReport) -> None:
    plans = plan_all(bf16)
    offer = quantize_offer(bf16, plans)
    assert offer["available"] and offer["group_size"] == 128 and "calibration text shipped" in offer["calibration"]
    assert "H100-80GB" in offer["recommended_for"] and "H200" not in offer["recommended_for"]  # 16-bit fits H200
    assert not offer["recommended"] and MIXTRAL_AWQ in offer["reason"]  # the Hub has an AWQ variant already
    assert [p["gpu"] for p in offer["plans"]] == [p.gpu for p in plans]
    refused = quantize_offer(awq, plan_all(awq))
    assert not refused["available"] and "already quantized (AWQ 4-bit)" in refused["reason"]
    assert "deploy it as is" in refused["reason"]


def test_recommended_without_a_variant(bf16: ModelReport) -> None:
    alone = ModelReport.from_dict({**bf16.to_dict(), "awq_variants": []})
    offer = quantize_offer(alone, plan_all(alone))
    assert offer["recommended"] and "no AWQ 4-bit variant" in offer["reason"]
    assert "quantize it to AWQ 4-bit on deploy" in plan(alone, "H100").reason
    gpt2 = ModelReport.from_dict({**alone.to_dict(), "arch": {**alone.to_dict()["arch"], "family": "",
                                                              "architecture": "GPT2LMHeadModel"}})
    assert "GPT2LMHeadModel cannot be quantized" in (quantize_refusal(gpt2) or "")
