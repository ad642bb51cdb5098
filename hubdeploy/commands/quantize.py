"""`hubdeploy quantize MODEL OUT`: a 16-bit Hub model -> an AutoAWQ-GEMM (4-bit) checkpoint.

Real AWQ (activation-aware scale search and clipping, calibrated on the text shipped with
hubdeploy or on --calib FILE), layer by layer, with a progress bar of layers done. The
output loads in our engine (`hubdeploy serve OUT`), transformers and AutoAWQ. Rerunning the
same command after an interruption resumes; exit code 1 with a one-line reason on any error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a 16-bit model to a 4-bit AWQ checkpoint (AutoAWQ GEMM format)",
                       description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL", help="Hub repo id (org/name) or a local directory in Hub layout")
    p.add_argument("out", metavar="OUT", help="output directory (created; an interrupted run there resumes)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of the Hub repo (default: main)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128,
                   help="input channels per scale / zero point (default 128)")
    p.add_argument("--calib", type=Path, default=None, metavar="FILE",
                   help="calibration text: plain text (paragraphs) or .jsonl with a \"text\" field "
                        "(default: the set shipped with hubdeploy)")
    p.add_argument("--method", choices=("awq", "rtn"), default="awq",
                   help="awq (default) or rtn: plain round-to-nearest, the baseline")
    p.add_argument("--n-samples", type=int, default=128, metavar="N", help="calibration blocks (default 128)")
    p.add_argument("--seq-len", type=int, default=512, metavar="L", help="tokens per calibration block (default 512)")
    p.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from hubdeploy.quantize import QuantizeError, QuantizeProgress, QuantizeSettings, quantize_model
    from hubdeploy.serving.hub import HubError, resolve_model_dir

    settings = QuantizeSettings(method=args.method, group_size=args.group_size, calib=args.calib,
                                n_samples=args.n_samples, seq_len=args.seq_len)
    bar = None

    def progress(p: QuantizeProgress) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=p.layers_total, unit="layer", desc="quantizing", initial=p.layers_done)
        bar.set_postfix_str(f"{p.stage}, {p.bytes_written / 2**20:.1f} MiB written")
        bar.update(p.layers_done - bar.n)

    try:
        src = resolve_model_dir(args.model, args.revision, args.token)
        result = quantize_model(src, Path(args.out), settings, progress)
    except (QuantizeError, HubError) as e:
        if bar is not None:
            bar.close()
        print(f"hubdeploy quantize: {e}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.close()
    print(f"wrote {result.out_dir} ({result.layers} layers, {result.bytes_written / 2**20:.1f} MiB, "
          f"{result.seconds:.1f} s; calibration: {result.calibration})")
    return 0
