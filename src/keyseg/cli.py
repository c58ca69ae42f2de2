"""The ``keyseg`` command line: one entry point, one thin module per subcommand.

Errors of type :class:`keyseg.errors.KeySegError` are printed as one line and exit with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from keyseg.errors import KeySegError

# Subcommand name -> module under keyseg.commands. Modules not present yet are skipped.
COMMANDS: dict[str, str] = {
    "segment": "segment",
    "chat": "chat",
    "batch": "batch",
    "demo": "demo",
    "train": "train",
    "eval": "evaluate",
    "convert": "convert",
    "export": "export",
    "keywords": "keywords",
    "data": "data",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyseg",
        description="KeySeg: keyword-conditioned reasoning segmentation.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"keyseg.commands.{module_name}")
        except ModuleNotFoundError as error:
            if error.name == f"keyseg.commands.{module_name}":
                continue
            raise
        command = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=f"example:\n  {module.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except KeySegError as error:
        if args.debug:
            raise
        print(f"keyseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"keyseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
