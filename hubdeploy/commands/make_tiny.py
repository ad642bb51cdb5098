"""`hubdeploy make-tiny`: build a tiny random model in real Hub layout (for tests and demos)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-tiny",
        help="write a tiny random model (Hub layout, fp16 or AWQ) and optional LoRA adapters",
        description=(
            "Write a tiny random Mixtral / Qwen3-MoE / Llama in the exact layout of its Hub family "
            "(config.json, model.safetensors, tokenizer, chat template, model card). The same seed "
            "gives byte-identical files. Adapters go to sibling directories OUT_DIR-lora-<i>."
        ),
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    p.add_argument("--arch", choices=["mixtral", "qwen3_moe", "llama"], default="mixtral")
    p.add_argument("--quant", choices=["awq", "none"], default="awq",
                   help="awq: AutoAWQ GEMM 4-bit, group size 32; none: float16")
    p.add_argument("--adapters", type=int, default=0, metavar="N", help="number of PEFT LoRA adapters to write")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--base-model-id", default=None,
                   help="repo id written as the adapters' base_model_name_or_path (default: OUT_DIR's name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hubdeploy.serving.tiny import adapter_dir, make_tiny

    if args.adapters < 0:
        raise SystemExit("--adapters must be 0 or more")
    out = make_tiny(args.out_dir, arch=args.arch, quant=args.quant, adapters=args.adapters,
                    seed=args.seed, base_model_id=args.base_model_id)
    print(f"wrote {args.arch} ({args.quant}, seed {args.seed}) to {out}")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:28s} {f.stat().st_size:>9,d} bytes")
    for i in range(args.adapters):
        d = adapter_dir(out, i)
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"adapter {i}: {d} ({size:,d} bytes)")
    return 0
