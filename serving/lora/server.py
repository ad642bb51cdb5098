"""The LoRA manager behind the endpoint's adapter admin routes (imported by `hubdeploy serve`).

`/v1/load_lora_adapter` reads and validates in a worker thread (disk or Hub download), so
the event loop and the engine keep serving meanwhile; a bad adapter raises `LoRAError`
(a ValueError: answered 400 with the reason). Unloading an adapter that requests still use
answers 409.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from serving.lora.adapter import LoRAError
from serving.lora.manager import LoRAManager


def lora_hooks(mgr: LoRAManager) -> tuple[Callable[[str, str], Awaitable[None]], Callable[[str], Awaitable[None]]]:
    """`(load(name, source), unload(name))` coroutines for `api_server.set_lora_hooks`."""
    from serving.server.errors import OpenAIError

    async def load(name: str, source: str) -> None:
        await asyncio.to_thread(mgr.register, name, source)

    async def unload(name: str) -> None:
        try:
            mgr.unregister(name)
        except KeyError as e:
            raise OpenAIError(f"no adapter named '{name}' is loaded; see /v1/models", 404, param="lora_name",
                              code="model_not_found") from e
        except LoRAError as e:
            raise OpenAIError(str(e), 409, param="lora_name", code="adapter_in_use") from e

    return load, unload


__all__ = ["lora_hooks"]
