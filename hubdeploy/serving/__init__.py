"""The engine: models, loader, scheduler, paged KV cache, runner, sampler, LoRA manager.

`from hubdeploy import LLM, SamplingParams` (defined here) is the offline API.
"""
from hubdeploy.serving.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from hubdeploy.serving.llm import LLM

        return LLM
    raise AttributeError(name)
