"""hubdeploy: deploy Hugging Face Hub models to an OpenAI-compatible endpoint on one GPU.

The one import root of the project (so no top-level name of ours can shadow another
distribution's, e.g. Hugging Face's `kernels`, which transformers imports):

- `hubdeploy.kernels`: Triton kernels beside their plain-torch references
- `hubdeploy.serving`: the engine; `from hubdeploy import LLM, SamplingParams` is the offline API
- `hubdeploy.hub_integration`: reports, memory plans, the deploy service and its provisioners
- `hubdeploy.space`, `hubdeploy.templates`: the Gradio page and Jinja2 templates
- `hubdeploy.cli`, `hubdeploy.commands`: the command line (the composition root)

Importing this package is cheap: `LLM` (torch, the engine) loads on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from hubdeploy.serving import LLM, SamplingParams


def __getattr__(name: str) -> Any:
    if name in ("LLM", "SamplingParams"):
        import hubdeploy.serving

        return getattr(hubdeploy.serving, name)
    raise AttributeError(f"module 'hubdeploy' has no attribute {name!r}")
