"""The `lnfm` command: `lnfm export ...` and `lnfm predict ...` (also `python -m lnfm ...`)."""

from __future__ import annotations

import argparse
import sys

from lnfm.workdir import setup_logging


def main(argv: list[str] | None = None) -> int:
    from lnfm.jobs import export, predict

    ap = argparse.ArgumentParser(prog="lnfm", description="Lymph-node foundation model: export and predict.")
    sub = ap.add_subparsers(dest="command", required=True)
    export.build_parser(sub.add_parser("export", help="write a portable export of a finetuned or pretrained model",
                                       description=export.__doc__.splitlines()[0]))
    predict.build_parser(sub.add_parser("predict", help="segment lymph nodes in scans with an export",
                                        description=predict.__doc__.splitlines()[0]))
    args = ap.parse_args(argv)
    setup_logging()  # lnfm at INFO; libraries (orbax, absl) stay at WARNING
    return export.run(args) if args.command == "export" else predict.run(args)


if __name__ == "__main__":
    sys.exit(main())
