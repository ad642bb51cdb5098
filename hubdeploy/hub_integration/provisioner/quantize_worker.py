"""The quantize-on-deploy worker: `python -m hubdeploy.hub_integration.provisioner.quantize_worker JOB_JSON`.

Runs `hubdeploy.quantize.quantize_model` out of the service's process and reports on stdout
as JSON lines (`progress`, then `done` or `error` with the error's class name), so the
service's event loop never holds the weights and a delete can kill it. Anything the quantizer
itself prints goes to stderr (the endpoint's log). It dies with the thread that started it
(`PR_SET_PDEATHSIG`): a restarted service starts a new one, which resumes into the same
`.partial` directory.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the service kills it on stop instead
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)


def _emit(out: TextIO, **event: Any) -> None:
    out.write(json.dumps(event) + "\n")
    out.flush()


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    _die_with_parent(int(job["parent"]))
    # the JSON channel is a private copy of stdout; fd 1 becomes stderr for whatever the quantizer prints
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    from hubdeploy.quantize import QuantizeError, QuantizeSettings, quantize_model

    settings = QuantizeSettings(method=job["method"], group_size=int(job["group_size"]),
                                calib=Path(job["calib"]) if job.get("calib") else None)

    def on_progress(p: Any) -> None:
        _emit(out, event="progress", layers_done=int(p.layers_done), layers_total=int(p.layers_total),
              bytes_written=int(p.bytes_written), stage=str(p.stage))

    try:
        result = quantize_model(Path(job["src"]), Path(job["out"]), settings, on_progress)
    except QuantizeError as e:
        _emit(out, event="error", kind=type(e).__name__, message=str(e))
        return 1
    _emit(out, event="done", calibration=str(result.calibration), layers=int(result.layers),
          seconds=float(result.seconds), bytes_written=int(result.bytes_written))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
