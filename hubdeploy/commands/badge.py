"""`hubdeploy badge MODEL [--deploy-url URL]`: print the Deploy badge for a model card."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("badge", help="print the Deploy badge (Markdown and HTML) for a model card",
                       description="Print Markdown and HTML for a Deploy badge that opens the deploy page "
                                   "prefilled with MODEL. Paste either into the model card (README.md).")
    p.add_argument("model", metavar="MODEL", help="Hub repo id (org/name)")
    p.add_argument("--deploy-url", default=None,
                   help="the deploy service's public URL (default $HUBDEPLOY_URL or http://127.0.0.1:7860)")
    p.add_argument("--revision", default=None, help="branch, tag or commit to prefill")
    p.add_argument("--adapters", default=None, help="comma-separated adapter repo ids to prefill")
    p.add_argument("--gpu", default=None, help="GPU to preselect (a catalog name, or cpu)")
    p.add_argument("--format", choices=("both", "markdown", "html", "svg"), default="both",
                   help="what to print (default both Markdown and HTML; svg prints the image)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hubdeploy.hub_integration.badge import badge_html, badge_markdown, badge_svg

    if args.format == "svg":
        print(badge_svg())
        return 0
    kw = {"revision": args.revision, "gpu": args.gpu,
          "adapters": [a for a in (args.adapters or "").split(",") if a.strip()]}
    try:
        md = badge_markdown(args.model, args.deploy_url, **kw)
        html = badge_html(args.model, args.deploy_url, **kw)
    except ValueError as e:
        raise SystemExit(f"hubdeploy badge: {e}") from None
    if args.format in ("both", "markdown"):
        print(("Markdown:\n" if args.format == "both" else "") + md)
    if args.format == "both":
        print()
    if args.format in ("both", "html"):
        print(("HTML:\n" if args.format == "both" else "") + html)
    return 0
