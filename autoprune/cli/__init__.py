"""``autoprune`` command line: thin wrappers over the Python API.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a parser
whose ``func`` attribute takes the parsed ``argparse.Namespace`` and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from autoprune.errors import AutoPruneError

# subcommand modules, in --help order; a module that does not exist yet is skipped
_SUBCOMMANDS = ("profile", "bundle", "predict", "search", "run", "export", "diagnose", "repair")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoprune", description="Prune a PyTorch model to a measured latency budget."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"autoprune.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"autoprune.cli.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AutoPruneError as e:
        print(f"autoprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoprune: interrupted; finished work is saved and a rerun resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
