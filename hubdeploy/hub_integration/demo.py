"""The built-in demo model of `hubdeploy up`: a tiny AWQ Mixtral with two LoRA adapters.

Built once under `<data dir>/models/` with `serving.tiny.make_tiny`, so the whole flow
(page → deploy → chat) runs on a laptop with no GPU and no network.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

DEMO_NAME = "tiny-mixtral-awq"
DEMO_ADAPTERS = 2
_DONE_MARK = ".hubdeploy-demo-complete"


def demo_model_dir(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser().resolve() / "models" / DEMO_NAME


def demo_adapters(data_dir: str | Path) -> dict[str, str]:
    """Served adapter name -> directory, for the demo model (make_tiny writes `<dir>-lora-<i>`)."""
    from hubdeploy.serving.tiny import adapter_dir

    base = demo_model_dir(data_dir)
    return {f"lora-{i}": str(adapter_dir(base, i)) for i in range(DEMO_ADAPTERS)}


def ensure_demo_model(data_dir: str | Path) -> Path:
    """Build the demo model once (atomically: a half-built one is never used); return its directory."""
    out = demo_model_dir(data_dir)
    if (out / _DONE_MARK).is_file():
        return out
    from hubdeploy.serving.tiny import adapter_dir, make_tiny

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        staged = Path(tmp) / DEMO_NAME
        make_tiny(staged, arch="mixtral", quant="awq", adapters=DEMO_ADAPTERS, seed=0)
        for i in range(DEMO_ADAPTERS):
            dst = adapter_dir(out, i)
            if dst.exists():
                shutil.rmtree(dst)
            shutil.move(str(adapter_dir(staged, i)), str(dst))
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staged), str(out))
    (out / _DONE_MARK).write_text("built by hubdeploy up\n")
    return out
