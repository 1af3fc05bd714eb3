"""CLI: ``python -m specvlm_lit.export`` (module docstring of :mod:`specvlm_lit.export`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import find_user_error, one_line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m specvlm_lit.export",
        description="Export a drafter directory to a serving format, or --import a public EAGLE-3 checkpoint.",
    )
    p.add_argument("source", help="drafter directory (export) or serving checkpoint directory (--import)")
    p.add_argument("--format", choices=("speculators", "sglang", "eagle"), help="serving format to write")
    p.add_argument("--out", help="output directory (default: <source>-<format>; required with --import)")
    p.add_argument("--speculative-tokens", type=int, default=3, help="speculators proposal length (default 3)")
    p.add_argument("--verifier", help="verifier name_or_path written to the speculators config (default: target)")
    p.add_argument("--import", dest="do_import", action="store_true", help="import SOURCE into a drafter directory")
    p.add_argument("--target", help="target checkpoint directory the imported drafter is for (with --import)")
    p.add_argument(
        "--image-rows",
        choices=("visual", "placeholder"),
        help="what the imported checkpoint was trained on at image rows (default: recorded value, else placeholder)",
    )
    args = p.parse_args(argv)
    from .formats import ExportError, export_drafter, import_checkpoint

    try:
        if args.do_import:
            if not args.target or not args.out:
                raise ExportError("--import needs --target <target dir> and --out <drafter dir>")
            from ..target import TargetAdapter

            target = TargetAdapter.from_pretrained(args.target)
            out = import_checkpoint(args.source, target, args.out, image_rows=args.image_rows)
        else:
            if not args.format:
                raise ExportError("--format is required: speculators, sglang or eagle")
            out = args.out or f"{Path(args.source).expanduser().absolute()}-{args.format}"
            out = export_drafter(
                args.source, out, args.format, speculative_tokens=args.speculative_tokens, verifier=args.verifier
            )
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None:
            raise
        print(f"error: {one_line(user_error)}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
