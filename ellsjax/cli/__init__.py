"""``ellsjax`` command line: a thin face over the library.

Each subcommand lives in its own module with a ``register(subparsers)`` function; ``sample`` is the
main job (``ellsjax sample --help``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

# Subcommand modules, in help order.
_COMMANDS = ("_sample", "_train", "_convert", "_explain", "_calibrate", "_evaluate", "_reproduce", "_machines", "_plan")


def build_parser() -> argparse.ArgumentParser:
    """The ``ellsjax`` argument parser, one subcommand per ``ellsjax.cli._<name>`` module."""
    parser = argparse.ArgumentParser(
        prog="ellsjax", description="Analytic diffusion denoisers (ELS machine and relatives) in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"ellsjax.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ellsjax`` console script."""
    from ellsjax._io import OutputError
    from ellsjax.cli._common import fail, release_claims

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OutputError as e:  # an output that could not be written (a full disk): one line, no traceback
        fail(str(e))
    finally:
        release_claims()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
