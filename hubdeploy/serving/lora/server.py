"""The adapter admin routes' hooks (imported by `hubdeploy serve`).

`lora_hooks(engine)` takes any `EngineClient` (the thread or the process transport): both
read and validate an adapter off the event loop and raise `LoRAError` (a ValueError: answered 400 with the reason) for a bad one. Here the
other outcomes get their HTTP meaning: unknown adapter 404, adapter still in use 409.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable

from hubdeploy.serving.lora.adapter import LoRAError

if TYPE_CHECKING:  # pragma: no cover
    from hubdeploy.serving.engine_client import EngineClient


def lora_hooks(engine: EngineClient) -> tuple[Callable[[str, str], Awaitable[None]], Callable[[str], Awaitable[None]]]:
    """`(load(name, source), unload(name))` coroutines for `api_server.set_lora_hooks`."""
    from hubdeploy.serving.server.errors import OpenAIError

    async def load(name: str, source: str) -> None:
        await engine.load_lora(name, source)

    async def unload(name: str) -> None:
        try:
            await engine.unload_lora(name)
        except KeyError as e:
            raise OpenAIError(f"no adapter named '{name}' is loaded; see /v1/models", 404, param="lora_name",
                              code="model_not_found") from e
        except LoRAError as e:
            raise OpenAIError(str(e), 409, param="lora_name", code="adapter_in_use") from e

    return load, unload


__all__ = ["lora_hooks"]
