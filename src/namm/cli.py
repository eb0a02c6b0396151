"""The ``namm`` command line. Each sub-command lives in ``namm.commands``; this file wires them up
and turns bad input into one clear line on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import sys

from namm.commands import command_modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="namm",
        description="Evolved KV-cache memory (Neural Attention Memory Models) and classic eviction policies "
                    "for Hugging Face transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in command_modules():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("namm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ModuleNotFoundError, PermissionError, NotADirectoryError,
            IsADirectoryError, RuntimeError) as err:
        print(f"namm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
