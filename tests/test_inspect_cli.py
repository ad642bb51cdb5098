"""`hubdeploy inspect` against the local Hub: JSON, tables, env vars, exit codes, no weight downloads."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hubdeploy.hub_integration.errors import RepoNotFoundError
from hubdeploy.hub_integration.inspect_api import error_body, inspect_payload
from hubdeploy.cli import main

MIXTRAL_AWQ = "TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ"
ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str], hf_home: Path, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "HF_TOKEN")}
    e.update(HF_HOME=str(hf_home), COLUMNS="200", **env)
    return subprocess.run([sys.executable, "-m", "hubdeploy", "inspect", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=120)


def test_json_via_hf_endpoint_env_and_no_weights_downloaded(shape_only_hub, hub_tiny_model, tmp_path: Path) -> None:
    repo = hub_tiny_model("mixtral", "awq", adapters=2)
    home = tmp_path / "hf"
    out = _cli([repo, "--json"], home, HF_ENDPOINT=shape_only_hub.endpoint)
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    r = payload["report"]
    assert r["repo_id"] == repo and r["quant"]["method"] == "awq" and r["moe"]["num_experts"] > 0
    assert sorted(a["repo_id"] for a in r["adapters"]) == [f"{repo}-lora-0", f"{repo}-lora-1"]
    assert all(a["rank"] and a["target_modules"] for a in r["adapters"])
    assert len(payload["plans"]) == 9 and payload["suggested_gpu"] == "T4"
    cached = [p.name for p in home.rglob("*") if p.is_file()]
    assert "config.json" in cached
    assert not [n for n in cached if n.endswith((".safetensors", ".bin"))], cached


def test_tables_for_mixtral_awq(shape_only_hub, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["inspect", MIXTRAL_AWQ, "--hub-endpoint", shape_only_hub.endpoint])
    text = capsys.readouterr().out
    assert rc == 0
    for needle in ("MixtralForCausalLM", "awq", "Compatibility", "GPUs", "L4", "H100-80GB", "no fit",
                   "fits", "46.70 B", "hubdeploy serve"):
        assert needle in text, needle


def test_gpu_flag_and_token_env(shape_only_hub, tmp_path: Path) -> None:
    from tests.fixtures.hub import GATED_REPO, GATED_TOKEN

    out = _cli([MIXTRAL_AWQ, "--gpu", "L4", "--json", "--hub-endpoint", shape_only_hub.endpoint], tmp_path)
    plans = json.loads(out.stdout)["plans"]
    assert [p["gpu"] for p in plans] == ["L4"] and plans[0]["fits"] is False and "exceed" in plans[0]["reason"]
    ok = _cli([GATED_REPO, "--json", "--hub-endpoint", shape_only_hub.endpoint], tmp_path, HF_TOKEN=GATED_TOKEN)
    assert ok.returncode == 0 and json.loads(ok.stdout)["report"]["gated"] == "manual"


def test_errors_exit_1_with_a_message(shape_only_hub, tmp_path: Path) -> None:
    ep = shape_only_hub.endpoint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    cases = [
        (["nobody/nothing", "--hub-endpoint", ep], "was not found"),
        ([MIXTRAL_AWQ, "--revision", "nope", "--hub-endpoint", ep], "no revision 'nope'"),
        (["gated/Mixtral-8x7B-Instruct-v0.1-AWQ", "--hub-endpoint", ep], "gated"),
        (["broken/no-config", "--hub-endpoint", ep], "no config.json"),
        ([MIXTRAL_AWQ, "--hub-endpoint", closed], "cannot reach"),
        ([MIXTRAL_AWQ, "--gpu", "RTX-9090", "--hub-endpoint", ep], "unknown GPU"),
    ]
    for args, needle in cases:
        out = _cli(args, tmp_path)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert needle in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_inspect_api_function(shape_only_hub) -> None:
    payload = inspect_payload("TheBloke/Mistral-7B-Instruct-v0.2-GPTQ", endpoint=shape_only_hub.endpoint,
                              gpus=["H100"])
    assert payload["report"]["servable"] is False
    json.dumps(payload)
    with pytest.raises(RepoNotFoundError) as e:
        inspect_payload("nobody/nothing", endpoint=shape_only_hub.endpoint)
    status, body = error_body(e.value)
    assert status == 404 and body["error"]["code"] == "repo_not_found"
    assert body["error"]["status"] == 404 and "nobody/nothing" in body["error"]["message"]
    assert body["detail"] == body["error"]["message"] and body["error"]["model"] == "nobody/nothing"


def test_local_directory(tiny_models, capsys: pytest.CaptureFixture[str]) -> None:
    d = tiny_models("qwen3_moe", "awq")
    assert main(["inspect", str(d), "--json", "--gpu", "T4"]) == 0
    payload = json.loads(capsys.readouterr().out)
    r = payload["report"]
    assert r["source"] == "local" and r["arch"]["architecture"] == "Qwen3MoeForCausalLM"
    assert r["servable"] and payload["plans"][0]["fits"] and payload["serve_args"][0] == "--max-model-len"
