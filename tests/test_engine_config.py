"""One engine config (issue 15, point 2): every `EngineArgs` knob is a `hubdeploy serve` flag, and
values round-trip config -> argv -> parsed config, and deploy spec -> argv -> parsed config."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

from hubdeploy.commands import serve
from hubdeploy.hub_integration.memory_plan import PLANNED
from hubdeploy.hub_integration.spec import DeploymentSpec, EngineOptions
from hubdeploy.serving.config import EngineArgs, engine_argv, knobs

NOT_FLAGS = {"model": "the positional MODEL", "token": "HF_TOKEN, never argv", "lora_modules": "--lora NAME=SRC"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def _other_value(name: str) -> Any:
    """A valid value of knob `name` that is not its default."""
    kind, f = knobs()[name]
    if "choices" in f.metadata:
        return next(c for c in f.metadata["choices"] if c != f.default)
    if kind is bool:
        return not f.default
    if kind is float:
        return 0.5
    if kind is int:
        return (f.default or 0) + 17
    return "v1"


def test_every_knob_is_a_serve_flag() -> None:
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    flags = {s for a in sub._actions for s in a.option_strings}
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(knobs()) == fields - set(NOT_FLAGS)
    for name in fields - set(NOT_FLAGS):
        assert "--" + name.replace("_", "-") in flags, name
    assert "--max-num-batched-tokens" in flags  # the plan sizes it: serve takes it


def test_defaults_and_values_round_trip_through_argv() -> None:
    assert EngineArgs.from_flags(_parse(["m"]), model="m") == EngineArgs("m")  # the flags' defaults are the config's
    want = EngineArgs("m", **{name: _other_value(name) for name in knobs()})
    argv = engine_argv({name: getattr(want, name) for name in knobs()})
    assert EngineArgs.from_flags(_parse(["m", *argv]), model="m") == want
    with pytest.raises(KeyError):
        engine_argv({"max_num_seq": 4})  # a misspelt knob cannot reach argv


def test_spec_options_are_knobs_and_round_trip() -> None:
    options = set(EngineOptions.model_fields)
    assert options <= set(knobs()) and set(PLANNED) <= options  # the plan fills only options the spec has
    engine = {name: _other_value(name) for name in options}
    spec = DeploymentSpec(name="a", model="org/m", revision="v2", engine=engine)
    ns = _parse(spec.serve_args(port=1234, device="cpu"))
    got = EngineArgs.from_flags(ns, model=ns.model)
    assert {name: getattr(got, name) for name in options} == engine
    assert (got.model, got.revision, got.device) == ("org/m", "v2", "cpu")
    unset = EngineArgs.from_flags(_parse(DeploymentSpec(name="a", model="org/m").serve_args(port=1)), model="org/m")
    assert unset == EngineArgs("org/m")  # options left to None take the engine's defaults
