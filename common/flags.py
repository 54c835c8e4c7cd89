"""Command-line value types shared by every entry point."""

from __future__ import annotations

import argparse


def flag_bool(text: str) -> bool:
    """``true|false`` (also 1/0, yes/no), as upstream MultiTalk's ``--offload_model`` takes it."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
