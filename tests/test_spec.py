"""`DeploymentSpec`: shape validation, `serve_args` against the real `hubdeploy serve` parser,
and `check_spec` against real directories, the local Hub and the memory plan."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hubdeploy.hub_integration.spec import (CreateEndpointRequest, DeploymentSpec, PatchEndpointRequest, SpecContext,
                                  SpecError, check_spec, classify_source)


def errors_of(**fields: Any) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as ei:
        DeploymentSpec(**{"name": "ok", "model": "org/name", **fields})
    return [e["loc"] for e in ei.value.errors()]


@pytest.mark.parametrize("name", ["a", "abc-123", "a" * 32, "0x"])
def test_good_names(name: str) -> None:
    assert DeploymentSpec(name=name, model="org/m").name == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a_b", "a.b", "a" * 33, "é", "a b", "a/b"])
def test_bad_names_name_the_field(name: str) -> None:
    assert errors_of(name=name) == [("name",)]


@pytest.mark.parametrize("model", ["http://evil/x", "https://huggingface.co/org/m", "file:///etc", "hf://org/m",
                                   "s3://b/k", "../x", "/a/../b", "./../x", "org/../x", "org", "org/a/b",
                                   "org/m\x00", "a\\b", ""])
def test_bad_model_refs(model: str) -> None:
    assert errors_of(model=model) == [("model",)]


def test_classify() -> None:
    assert classify_source("mistralai/Mixtral-8x7B-v0.1") == "repo"
    assert classify_source("/data/models/x") == "path"
    assert classify_source("./x") == "path"


def test_adapters_tags_and_engine_ranges() -> None:
    assert errors_of(adapters={"bad name": "org/a"}) == [("adapters",)]
    assert errors_of(adapters={"a": "http://x/y"}) == [("adapters",)]
    assert errors_of(tags=["white space"]) == [("tags",)]
    assert errors_of(engine={"max_model_len": 0}) == [("engine", "max_model_len")]
    assert errors_of(engine={"max_num_seqs": 10**6}) == [("engine", "max_num_seqs")]
    assert errors_of(engine={"dtype": "int3"}) == [("engine", "dtype")]
    assert errors_of(access="secret") == [("access",)]
    assert errors_of(unknown=1) == [("unknown",)]


def test_hf_token_is_not_part_of_the_spec() -> None:
    req = CreateEndpointRequest(name="a", model="org/m", hf_token="hf_secret_value")
    assert "hf_secret_value" not in repr(req)
    spec = req.spec()
    assert "hf_token" not in spec.model_dump()
    assert "hf_secret_value" not in spec.model_dump_json()


def test_serve_args_parse_with_the_real_serve_command() -> None:
    from hubdeploy.commands import serve

    spec = DeploymentSpec(name="a", model="org/m", revision="v1", adapters={"sql": "org/sql", "x": "/m/x"},
                          engine={"max_model_len": 512, "max_num_seqs": 4, "max_loras": 2, "max_lora_rank": 8,
                                  "kv_cache_tokens": 4096, "dtype": "float32"})
    argv = spec.serve_args(port=1234, device="cpu")
    import argparse

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    ns = parser.parse_args(["serve", *argv])
    assert (ns.model, ns.revision, ns.port, ns.device) == ("org/m", "v1", 1234, "cpu")
    assert serve.parse_loras(ns.lora) == {"sql": "org/sql", "x": "/m/x"}
    assert (ns.max_model_len, ns.max_num_seqs, ns.max_loras, ns.max_lora_rank, ns.kv_cache_tokens, ns.dtype) == \
        (512, 4, 2, 8, 4096, "float32")
    assert ns.served_model_name == "org/m"
    assert ns.api_key is None  # secrets never travel in argv


def test_patch_applies_and_revalidates() -> None:
    spec = DeploymentSpec(name="a", model="org/m", engine={"max_model_len": 256})
    new = PatchEndpointRequest(engine={"max_num_seqs": 3}, tags=["x"]).apply(spec)
    assert new.engine.max_model_len == 256 and new.engine.max_num_seqs == 3 and new.tags == ["x"]
    assert new.name == "a" and new.model == "org/m"
    with pytest.raises(ValidationError):
        PatchEndpointRequest(name="b")  # name and model cannot change


# --- check_spec against the world -------------------------------------------------------
@pytest.fixture(scope="module")
def root(tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed root holding a tiny model and its adapter; a sibling folder outside it."""
    from hubdeploy.serving.tiny import adapter_dir

    src = tiny_models("mixtral", "awq", adapters=1)
    base = tmp_path_factory.mktemp("roots")
    r = base / "models"
    shutil.copytree(src, r / "m")
    shutil.copytree(adapter_dir(src, 0), r / "m-lora-0")
    shutil.copytree(src, base / "outside")
    (r / "escape").symlink_to(base / "outside")
    big = json.loads((r / "m-lora-0" / "adapter_config.json").read_text())
    shutil.copytree(r / "m-lora-0", r / "big-lora")
    (r / "big-lora" / "adapter_config.json").write_text(json.dumps({**big, "r": 64}))
    return r


def check(root: Path, **fields: Any) -> DeploymentSpec:
    ctx = SpecContext(allowed_roots=[root], name_taken=lambda n: n == "taken")
    return check_spec(DeploymentSpec(**{"name": "ok", "model": str(root / "m"), **fields}), ctx)


def loc_of(root: Path, **fields: Any) -> tuple[Any, ...]:
    with pytest.raises(SpecError) as ei:
        check(root, **fields)
    assert ei.value.msg
    return ei.value.loc


def test_local_model_and_adapter_ok(root: Path) -> None:
    spec = check(root, adapters={"a": str(root / "m-lora-0")})
    assert spec.model == str(root / "m")
    spec = check(root, model="./m")
    assert spec.model == "./m"


def test_local_checks_name_fields(root: Path) -> None:
    assert loc_of(root, name="taken") == ("name",)
    assert loc_of(root, model=str(root / "nope")) == ("model",)
    assert loc_of(root, model=str(root.parent / "outside")) == ("model",)
    assert loc_of(root, model=str(root / "escape")) == ("model",)  # symlink out of the root
    assert loc_of(root, model="/etc") == ("model",)
    assert loc_of(root, model=str(root / "m-lora-0")) == ("model",)  # no config.json
    assert loc_of(root, adapters={"x": str(root / "missing")}) == ("adapters", "x")
    assert loc_of(root, adapters={"x": str(root / "m")}) == ("adapters", "x")  # not an adapter
    assert loc_of(root, adapters={"big": str(root / "big-lora")}, engine={"max_lora_rank": 8}) == \
        ("adapters", "big")
    assert loc_of(root, revision="v2") == ("revision",)


def test_plan_defaults_and_limits(root: Path) -> None:
    spec = check(root, gpu="t4")
    assert spec.gpu == "T4"  # canonical catalog name
    from hubdeploy.hub_integration.memory_plan import plan
    from hubdeploy.hub_integration.report import inspect_model

    want = plan(inspect_model(str(root / "m")), "T4").engine_defaults()
    assert spec.engine.max_model_len == want["max_model_len"]
    assert spec.engine.max_num_seqs == want["max_num_seqs"]
    cpu = check(root)
    assert cpu.engine.max_model_len is None  # no plan on cpu: the engine sizes itself
    assert loc_of(root, gpu="TPU-v9") == ("gpu",)
    assert loc_of(root, gpu="T4", engine={"max_model_len": 1_000_000}) == ("engine", "max_model_len")
    assert loc_of(root, engine={"max_model_len": 1_000_000}) == ("engine", "max_model_len")  # model context


def test_hub_repo_checks(local_hub: Any, hub_tiny_model: Any) -> None:
    repo = hub_tiny_model("mixtral", "awq", adapters=1)
    ctx = SpecContext(allowed_roots=[], hub_endpoint=local_hub.endpoint)
    ok = check_spec(DeploymentSpec(name="h", model=repo, adapters={"a": f"{repo}-lora-0"}, gpu="L4"), ctx)
    assert ok.engine.max_model_len and ok.gpu == "L4"
    for fields, loc in (({"model": "nobody/nothing"}, ("model",)),
                        ({"revision": "no-such-branch"}, ("revision",)),
                        ({"adapters": {"z": "nobody/lora"}}, ("adapters", "z")),
                        ({"adapters": {"z": repo}}, ("adapters", "z"))):  # a model, not an adapter
        with pytest.raises(SpecError) as ei:
            check_spec(DeploymentSpec(**{"name": "h", "model": repo, **fields}), ctx)
        assert ei.value.loc == loc, (fields, ei.value.msg)


def test_real_mixtral_shapes_against_the_plan(shape_only_hub: Any) -> None:
    """Shape-only Mixtral-8x7B AWQ (real headers): too big for a T4, KV-bounded on an H100."""
    ctx = SpecContext(allowed_roots=[], hub_endpoint=shape_only_hub.endpoint)
    repo = "TheBloke/Mixtral-8x7B-Instruct-v0.1-AWQ"

    def loc(**fields: Any) -> tuple[Any, ...]:
        with pytest.raises(SpecError) as ei:
            check_spec(DeploymentSpec(**{"name": "m", "model": repo, **fields}), ctx)
        return ei.value.loc

    assert loc(gpu="T4") == ("gpu",)
    assert loc(gpu="H100", engine={"kv_cache_tokens": 16_000_000}) == ("engine", "kv_cache_tokens")
    assert loc(gpu="H100", engine={"max_model_len": 65536}) == ("engine", "max_model_len")
    assert loc(model="gated/Mixtral-8x7B-Instruct-v0.1-AWQ", gpu="H100") == ("hf_token",)
    ok = check_spec(DeploymentSpec(name="m", model=repo, gpu="H100"), ctx)
    assert ok.engine.max_model_len == 32768 and ok.engine.max_num_seqs


def test_patch_to_a_smaller_gpu_replans_defaults_but_keeps_user_options(shape_only_hub: Any) -> None:
    """Qwen3-30B-A3B AWQ planned on an H100 (max_model_len 40960), then moved to an L4 (≈ 31.9k fits).

    Defaults the plan filled in are planned again for the L4; an option the user set stays.
    """
    from hubdeploy.hub_integration.memory_plan import plan
    from hubdeploy.hub_integration.report import inspect_model

    ctx = SpecContext(allowed_roots=[], hub_endpoint=shape_only_hub.endpoint)
    repo = "Qwen/Qwen3-30B-A3B-AWQ"
    on_h100 = check_spec(DeploymentSpec(name="q", model=repo, gpu="H100"), ctx)
    assert on_h100.engine.max_model_len == 40960
    assert {"max_model_len", "max_num_seqs"} <= set(on_h100.engine_from_plan)
    # the bug this guards against: the H100's stored defaults checked against the L4 → 422
    with pytest.raises(SpecError) as ei:
        check_spec(on_h100.model_copy(update={"gpu": "L4", "engine_from_plan": []}), ctx)
    assert ei.value.loc == ("engine", "max_model_len")

    on_l4 = check_spec(PatchEndpointRequest(gpu="L4").apply(on_h100), ctx)
    report = inspect_model(repo, endpoint=shape_only_hub.endpoint, with_adapters=False)
    want = plan(report, "L4").engine_defaults()
    assert on_l4.gpu == "L4"
    assert (on_l4.engine.max_model_len, on_l4.engine.max_num_seqs) == (want["max_model_len"], want["max_num_seqs"])
    assert on_l4.engine.max_model_len < 40960
    # back to the H100: the defaults grow again (they were never the user's)
    back = check_spec(PatchEndpointRequest(gpu="H100").apply(on_l4), ctx)
    assert back.engine.max_model_len == 40960

    # a user-set option is kept across the move; the plan fills only the rest
    mine = check_spec(DeploymentSpec(name="q", model=repo, gpu="H100", engine={"max_model_len": 8192}), ctx)
    assert "max_model_len" not in mine.engine_from_plan
    moved = check_spec(PatchEndpointRequest(gpu="L4").apply(mine), ctx)
    assert moved.engine.max_model_len == 8192
    assert moved.engine.max_num_seqs == plan(report, "L4", max_model_len=8192).engine_defaults()["max_num_seqs"]
    # an explicit null in a PATCH hands the option back to the plan
    freed = check_spec(PatchEndpointRequest(engine={"max_model_len": None}).apply(moved), ctx)
    assert freed.engine.max_model_len == want["max_model_len"] and "max_model_len" in freed.engine_from_plan
    # the service fills engine_from_plan; a client cannot set it (not in the create body's schema)
    assert "engine_from_plan" not in CreateEndpointRequest.model_json_schema()["properties"]
    assert CreateEndpointRequest(name="x", model=repo, engine_from_plan=["max_model_len"]).spec().engine_from_plan == []
