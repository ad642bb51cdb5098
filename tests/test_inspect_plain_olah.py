"""Inspect behind a plain Hub mirror: Olah alone, no test double in front of it (issue 13, part 2).

Olah 0.5.4 (offline, local git mirrors) has no model search (`GET /api/models` answers an
empty 200 body) and no file sizes in `model_info(files_metadata=True)`. Inspect must still
answer with a complete report, through the real `huggingface_hub` client with `HF_ENDPOINT`
at Olah, and say which optional lookups it could not make and why.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors import safe_open

from hubdeploy.hub_integration.compat import quant_verdict
from hubdeploy.hub_integration.report import (ADAPTER_SEARCH, AWQ_VARIANT_SEARCH, FILE_SIZES, ModelReport,
                                              QuantInfo, inspect_model)
from tests.fixtures.local_hub import LocalHub

REPO = "tiny/mixtral-awq"
DENSE = "tiny/mixtral-none"


@pytest.fixture(scope="module")
def plain(plain_olah_hub: LocalHub, tiny_models: Any) -> dict[str, Any]:
    """The plain mirror with an AWQ model, an adapter of it (which search would list) and a dense model."""
    from hubdeploy.serving.tiny import adapter_dir

    awq = tiny_models("mixtral", "awq", adapters=1)
    dense = tiny_models("mixtral", "none")
    shas = {REPO: plain_olah_hub.add_repo(REPO, awq, card_data={"base_model": "test/tiny-mixtral-base"}),
            DENSE: plain_olah_hub.add_repo(DENSE, dense, card_data={"base_model": "test/tiny-mixtral-base"})}
    plain_olah_hub.add_repo(f"{REPO}-lora-0", adapter_dir(awq, 0),
                            card_data={"base_model": REPO, "base_model_relation": "adapter"})
    assert plain_olah_hub.endpoint == plain_olah_hub.olah_url, "a test double stands in front of Olah"
    return {"hub": plain_olah_hub, "awq": awq, "shas": shas}


def _tensor_count(model_dir: Path) -> int:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return len(list(f.keys()))


def _assert_complete(r: dict[str, Any], sha: str, num_tensors: int) -> None:
    """The facts the report gives with or without the optional lookups."""
    assert r["repo_id"] == REPO and r["source"] == "hub" and r["sha"] == sha
    assert r["arch"]["architecture"] == "MixtralForCausalLM" and r["arch"]["num_layers"] == 2
    assert r["moe"]["num_experts"] == 4 and r["moe"]["experts_per_token"] == 2
    assert r["quant"]["method"] == "awq" and r["quant"]["bits"] == 4
    assert r["weights"]["has_safetensors"] and r["weights"]["num_tensors"] == num_tensors
    assert r["weights"]["param_count"] > 0 and r["weights"]["total_bytes"] > 0
    assert r["has_tokenizer"] and r["has_chat_template"]
    assert r["card"]["license"] == "apache-2.0" and r["card"]["base_model"] == ["test/tiny-mixtral-base"]
    assert r["servable"] and not [c for c in r["compat"] if c["status"] == "error"]


def _notes(r: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {n["what"]: n for n in r["lookups_unavailable"]}


def test_plain_olah_really_lacks_search_and_file_sizes(plain: dict[str, Any]) -> None:
    """The premise: this mirror is one without search, so the rest of this file tests something."""
    from huggingface_hub import HfApi

    hub = plain["hub"]
    r = httpx.get(f"{hub.endpoint}/api/models", params={"filter": f"base_model:adapter:{REPO}"}, timeout=30)
    try:
        listed = r.json()
    except json.JSONDecodeError:
        listed = None
    assert not isinstance(listed, list), f"Olah now answers model search ({r.text[:200]}): use a mirror without it"
    info = HfApi(endpoint=hub.endpoint).model_info(REPO, revision="main", files_metadata=True)
    assert all(s.size is None and s.lfs is None for s in info.siblings or [])


def test_library_inspect_through_hf_endpoint(plain: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    hub = plain["hub"]
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    report = inspect_model(REPO)  # no endpoint argument: huggingface_hub reaches Olah through HF_ENDPOINT
    r = report.to_dict()
    assert r["endpoint"] == hub.endpoint
    _assert_complete(r, plain["shas"][REPO], _tensor_count(plain["awq"]))
    assert r["weights"]["file_bytes"] is None and r["weights"]["sizes_consistent"] is None
    assert r["adapters"] == []  # the adapter repo exists, but nothing could list it

    notes = _notes(r)
    assert set(notes) == {ADAPTER_SEARCH, FILE_SIZES}  # an AWQ 4-bit model: no variant search was needed
    search = notes[ADAPTER_SEARCH]
    assert hub.endpoint in search["why"] and "/api/models" in search["why"] and "no search" in search["why"]
    assert REPO in search["effect"] and "name=org/repo" in search["effect"]
    assert "model.safetensors" in notes[FILE_SIZES]["why"] and "truncated" in notes[FILE_SIZES]["effect"]
    adapters = [c for c in r["compat"] if c["capability"] == "adapters"]
    assert [c["status"] for c in adapters] == ["warn"] and "could not be listed" in adapters[0]["reason"]

    assert ModelReport.from_dict(json.loads(report.to_json())) == report  # the notes survive the JSON round trip


def test_dense_model_says_awq_variants_were_not_looked_up(plain: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", plain["hub"].endpoint)
    report = inspect_model(DENSE)
    assert report.sha == plain["shas"][DENSE] and report.quant.method == "none" and report.servable
    assert report.awq_variants == []
    note = report.unavailable(AWQ_VARIANT_SEARCH)
    assert note is not None and "no search" in note.why and "test/tiny-mixtral-base" in note.effect
    assert {n.what for n in report.lookups_unavailable} == {ADAPTER_SEARCH, AWQ_VARIANT_SEARCH, FILE_SIZES}
    # a quantization we do not serve: the advice says the variants were not looked up, not that none exist
    gptq = quant_verdict(dataclasses.replace(report, quant=QuantInfo(method="gptq", bits=4)))
    assert gptq.status == "error" and "could not be looked up" in (gptq.action or "")
    assert "is listed on the Hub" not in (gptq.action or "")


def test_service_api_inspect_answers_200(plain: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    """`hubdeploy up` with HF_ENDPOINT at the plain mirror: GET /api/inspect on a real port."""
    from hubdeploy.hub_integration.service import build_service_app
    from tests.fixtures.service import ADMIN, LiveService, reap

    monkeypatch.setenv("HF_ENDPOINT", plain["hub"].endpoint)
    data = tmp_path / "svc"
    app = build_service_app(data, admin_token=ADMIN)
    live = LiveService(app)
    try:
        resp = live.client.get("/api/inspect", params={"model": REPO})
        assert resp.status_code == 200, resp.text
        payload = resp.json()
        r = payload["report"]
        _assert_complete(r, plain["shas"][REPO], _tensor_count(plain["awq"]))
        assert r["endpoint"] == plain["hub"].endpoint
        assert payload["plans"] and payload["suggested_gpu"] and payload["serve_args"]
        notes = _notes(r)
        assert ADAPTER_SEARCH in notes and "no search" in notes[ADAPTER_SEARCH]["why"]
        assert FILE_SIZES in notes
    finally:
        live.stop()
        app.state.provisioner.close()
        reap(data)


def test_cli_tables_show_what_was_not_looked_up(plain: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from hubdeploy.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    rc = main(["inspect", REPO, "--hub-endpoint", plain["hub"].endpoint])
    text = capsys.readouterr().out
    assert rc == 0
    for needle in ("MixtralForCausalLM", "Compatibility", "Not looked up", ADAPTER_SEARCH, FILE_SIZES,
                   "no search", "GPUs"):
        assert needle in text, needle


def test_with_search_the_same_repo_has_no_notes(hub_tiny_model: Any, local_hub: LocalHub) -> None:
    """Through the Hub double (search and sizes answered) nothing is reported missing: the notes are specific."""
    repo = hub_tiny_model("mixtral", "awq", adapters=1)
    report = inspect_model(repo, endpoint=local_hub.endpoint)
    assert report.lookups_unavailable == [] and report.weights.file_bytes is not None
    assert f"{repo}-lora-0" in [a.repo_id for a in report.adapters]
