"""The local Hub (Olah + Hub double) answers the real `huggingface_hub` client as the Hub does."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub import errors as hf_errors
from safetensors import safe_open

from tests.fixtures.hub import GATED_REPO, GATED_TOKEN
from tests.fixtures.local_hub import LocalHub

MIXTRAL_AWQ = "TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_repo(hub_tiny_model, tiny_models) -> tuple[str, Path]:
    return hub_tiny_model("mixtral", "awq", adapters=2), tiny_models("mixtral", "awq", adapters=2)


def test_model_info_with_files_metadata(shape_only_hub: LocalHub) -> None:
    api = HfApi(endpoint=shape_only_hub.endpoint)
    info = api.model_info(MIXTRAL_AWQ, revision="main", files_metadata=True)
    head = (shape_only_hub.repo_path(MIXTRAL_AWQ) / ".git" / "refs" / "heads" / "main").read_text().strip()
    assert info.sha == head
    shards = {s.rfilename: s for s in info.siblings if s.rfilename.endswith(".safetensors")}
    assert len(shards) >= 5
    # LFS pointer sizes are the real checkpoint's: about 24.6 GB in all
    total = sum(s.lfs.size for s in shards.values())
    assert 24.0e9 < total < 25.0e9
    assert all(s.lfs.sha256 and s.blob_id for s in shards.values())
    assert "base_model:quantized:mistralai/Mixtral-8x7B-Instruct-v0.1" in info.tags
    assert info.card_data.license == "apache-2.0"
    # the bare route (Olah alone answers 401) works through the double
    assert api.model_info(MIXTRAL_AWQ).sha == head


def test_model_card_and_safetensors_metadata(shape_only_hub: LocalHub) -> None:
    path = hf_hub_download(MIXTRAL_AWQ, "README.md", endpoint=shape_only_hub.endpoint)
    card = ModelCard.load(path)
    assert card.data.base_model == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    meta = HfApi(endpoint=shape_only_hub.endpoint).get_safetensors_metadata(MIXTRAL_AWQ)
    assert meta.sharded
    t = meta.files_metadata[meta.weight_map["model.layers.0.block_sparse_moe.experts.0.w1.qweight"]]
    info = t.tensors["model.layers.0.block_sparse_moe.experts.0.w1.qweight"]
    assert (info.dtype, info.shape) == ("I32", [4096, 14336 // 8])
    gate = t.tensors["model.layers.0.block_sparse_moe.gate.weight"]
    assert (gate.dtype, gate.shape) == ("F16", [8, 4096])


def test_model_card_load_by_repo_id(shape_only_hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> None:
    # ModelCard.load(repo_id) goes through hf_hub_download, whose endpoint comes from constants
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", shape_only_hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        shape_only_hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    card = ModelCard.load(MIXTRAL_AWQ)
    assert card.data.tags and "awq" in card.data.tags


def test_download_and_snapshot_of_tiny_model_and_adapters(local_hub: LocalHub, tiny_repo, tmp_path: Path) -> None:
    repo_id, model_dir = tiny_repo
    cfg = hf_hub_download(repo_id, "config.json", endpoint=local_hub.endpoint, cache_dir=tmp_path)
    assert json.loads(Path(cfg).read_text()) == json.loads((model_dir / "config.json").read_text())
    snap = Path(snapshot_download(repo_id, endpoint=local_hub.endpoint, cache_dir=tmp_path))
    for f in model_dir.glob("*.safetensors"):
        assert _sha(snap / f.name) == _sha(f), f.name
        with safe_open(snap / f.name, "pt") as a, safe_open(f, "pt") as b:
            assert set(a.keys()) == set(b.keys())
    api = HfApi(endpoint=local_hub.endpoint)
    meta = api.get_safetensors_metadata(repo_id)
    with safe_open(next(model_dir.glob("*.safetensors")), "pt") as b:
        assert set(meta.weight_map) >= set(b.keys())
    for i in range(2):
        ad = Path(snapshot_download(f"{repo_id}-lora-{i}", endpoint=local_hub.endpoint, cache_dir=tmp_path))
        src = model_dir.parent / f"{model_dir.name}-lora-{i}"
        assert _sha(ad / "adapter_model.safetensors") == _sha(src / "adapter_model.safetensors")
        assert json.loads((ad / "adapter_config.json").read_text())["r"] == json.loads(
            (src / "adapter_config.json").read_text())["r"]


def test_list_models_filters(shape_only_hub: LocalHub, tiny_repo) -> None:
    repo_id, _ = tiny_repo
    api = HfApi(endpoint=shape_only_hub.endpoint)
    adapters = sorted(m.id for m in api.list_models(filter=f"base_model:adapter:{repo_id}"))
    assert adapters == [f"{repo_id}-lora-0", f"{repo_id}-lora-1"]
    base = "mistralai/Mixtral-8x7B-Instruct-v0.1"
    quantized = {m.id for m in api.list_models(filter=f"base_model:quantized:{base}")}
    # The hub is session-wide: other tests may push more quantized variants of this base.
    assert {GATED_REPO, MIXTRAL_AWQ} <= quantized
    assert "mistralai/Mixtral-8x7B-Instruct-v0.1" not in quantized
    for repo in quantized - {GATED_REPO}:
        assert f"base_model:quantized:{base}" in (api.model_info(repo).tags or [])
    assert [m.id for m in api.list_models(filter="base_model:adapter:nobody/nothing")] == []


def test_gated_and_private_repos(shape_only_hub: LocalHub, tiny_models, tmp_path: Path) -> None:
    ep = shape_only_hub.endpoint
    with pytest.raises(hf_errors.GatedRepoError) as e:
        hf_hub_download(GATED_REPO, "config.json", endpoint=ep, cache_dir=tmp_path, token=False)
    assert e.value.response.status_code == 401
    with pytest.raises(hf_errors.GatedRepoError) as e:
        hf_hub_download(GATED_REPO, "config.json", endpoint=ep, cache_dir=tmp_path, token="hf_not_granted")
    assert e.value.response.status_code == 403
    assert Path(hf_hub_download(GATED_REPO, "config.json", endpoint=ep, cache_dir=tmp_path,
                                token=GATED_TOKEN)).is_file()
    assert HfApi(endpoint=ep, token=False).model_info(GATED_REPO).gated == "manual"

    shape_only_hub.add_repo("secret/tiny", tiny_models("llama", "none"), private=True)
    shape_only_hub.grant("hf_owner", "secret/tiny")
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        HfApi(endpoint=ep, token=False).model_info("secret/tiny")
    assert HfApi(endpoint=ep, token="hf_owner").model_info("secret/tiny").private is True
    assert "secret/tiny" not in [m.id for m in HfApi(endpoint=ep, token=False).list_models(author="secret")]
    assert "secret/tiny" in [m.id for m in HfApi(endpoint=ep, token="hf_owner").list_models(author="secret")]


def test_range_requests_read_only_the_header(shape_only_hub: LocalHub) -> None:
    url = f"{shape_only_hub.endpoint}/TheBloke/Mistral-7B-Instruct-v0.2-AWQ/resolve/main/model.safetensors"
    r = httpx.get(url, headers={"Range": "bytes=0-7"})
    assert r.status_code == 206 and len(r.content) == 8
    (n,) = struct.unpack("<Q", r.content)
    total = int(r.headers["content-range"].split("/")[1])
    assert total == 8 + n  # a shape-only file ends right after its header
    h = httpx.get(url, headers={"Range": f"bytes=8-{8 + n - 1}"})
    assert h.status_code == 206 and json.loads(h.content)["model.embed_tokens.weight"]["shape"] == [32000, 4096]


def test_missing_revision_and_repo(shape_only_hub: LocalHub) -> None:
    api = HfApi(endpoint=shape_only_hub.endpoint)
    with pytest.raises(hf_errors.RevisionNotFoundError):
        api.model_info(MIXTRAL_AWQ, revision="v9-does-not-exist")
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        api.model_info("nobody/nothing")


def test_hub_stops_without_leaving_a_process(tmp_path: Path) -> None:
    hub = LocalHub(tmp_path).start()
    olah = hub._olah
    assert olah is not None and olah.poll() is None
    endpoint = hub.endpoint
    hub.stop()
    assert olah.poll() is not None
    with pytest.raises(httpx.TransportError):
        httpx.get(endpoint + "/api/models", timeout=2)


def test_revisions_by_tag_and_sha(local_hub: LocalHub, tiny_models) -> None:
    d = tiny_models("llama", "none")
    v1 = local_hub.add_repo("rev/llama", d, tag="v1")
    v2 = local_hub.add_repo("rev/llama", d, card_data={"license": "mit"}, message="new card")
    api = HfApi(endpoint=local_hub.endpoint)
    assert v1 != v2
    assert api.model_info("rev/llama", revision="v1").sha == v1
    assert api.model_info("rev/llama", revision="main").sha == v2
    assert api.model_info("rev/llama", revision=v1).card_data.get("license") != "mit"
    assert api.model_info("rev/llama", revision=v2).card_data.license == "mit"


def test_process_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """A test run killed with SIGKILL must not leave Olah running (PR_SET_PDEATHSIG)."""
    import os
    import subprocess
    import sys
    import time

    code = ("import sys, time; from tests.fixtures.local_hub import LocalHub; "
            f"h = LocalHub({str(tmp_path)!r}).start(); print(h._olah.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                              stdout=subprocess.PIPE, text=True)
    try:
        olah_pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(olah_pid, 0)
        except ProcessLookupError:
            return
        try:  # reap if it became our zombie (it is not our child: just poll)
            os.waitpid(olah_pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    os.kill(olah_pid, 9)
    raise AssertionError("Olah outlived its killed parent")
