"""The engine: models, loader, scheduler, paged KV cache, runner, sampler, LoRA manager.

`from serving import LLM, SamplingParams` is the offline API (see DESIGN.md).
"""
from serving.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from serving.llm import LLM

        return LLM
    raise AttributeError(name)
