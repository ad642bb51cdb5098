"""`hubdeploy --help` and `hubdeploy COMMAND --help` for every command (issue 2: `--help` on
every command), through the installed console script in a fresh process: exit 0, a usage
line naming the command, and each command's own options listed."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from hubdeploy.cli import build_parser


def _commands() -> dict[str, object]:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(sub.choices)


COMMANDS = sorted(_commands())


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hubdeploy")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "hubdeploy", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_every_design_command_is_registered() -> None:
    assert {"up", "inspect", "serve", "make-tiny", "bench", "badge"} <= set(COMMANDS)


def test_top_level_help_lists_every_command() -> None:
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: hubdeploy")
    for name in COMMANDS:
        assert name in proc.stdout, f"{name} missing from `hubdeploy --help`"


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help(name: str) -> None:
    proc = _run(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: hubdeploy {name}"), proc.stdout[:200]
    parser = _commands()[name]
    for action in parser._actions:  # every option the command takes is documented
        for flag in action.option_strings:
            assert flag in proc.stdout, f"`hubdeploy {name} --help` does not show {flag}"


def test_no_command_prints_help_and_fails() -> None:
    proc = _run()
    assert proc.returncode == 2 and "usage: hubdeploy" in proc.stdout
