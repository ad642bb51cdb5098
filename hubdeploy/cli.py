"""`hubdeploy` console script: one sub-command per module in `hubdeploy.commands`.

Each command module exposes `register(subparsers)` (adds its parser, `--help` included)
and sets `func` on its parser; heavy imports happen inside the command, so `--help` is fast.
"""
from __future__ import annotations

import argparse
import sys

from hubdeploy import __version__
from hubdeploy.commands import badge, bench, inspect_cmd, make_tiny, quantize, serve, up

COMMANDS = (up, inspect_cmd, serve, make_tiny, quantize, bench, badge)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hubdeploy",
        description="Deploy Hugging Face Hub models to a single-GPU, OpenAI-compatible endpoint.",
    )
    parser.add_argument("--version", action="version", version=f"hubdeploy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
