"""Helpers shared by the subcommands."""

from __future__ import annotations


def fail(msg: str):
    """Stop with a one-line error (exit status 2-like message, no traceback)."""
    raise SystemExit(f"ellsjax: error: {msg}")
