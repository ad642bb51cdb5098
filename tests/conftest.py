"""Shared pytest setup: markers, an isolated Hugging Face home, and the fixture plugins.

Fixture modules live in tests/fixtures/ (tiny models, the local Hub); each owns its
fixtures and is registered here.
"""
from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.fixtures.tiny", "tests.fixtures.hub", "tests.fixtures.serve", "tests.fixtures.service",
                  "tests.fixtures.engine"]


def pytest_configure(config: pytest.Config) -> None:
    # Never reach the real Hub from tests; each test that needs a Hub gets the local one.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing means no GPU either
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _isolated_hf_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point the Hugging Face cache at a temporary directory for the whole session."""
    home = tmp_path_factory.mktemp("hf_home")
    old = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = str(home)
    yield
    if old is None:
        os.environ.pop("HF_HOME", None)
    else:
        os.environ["HF_HOME"] = old
