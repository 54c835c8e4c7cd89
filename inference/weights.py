"""Kept command: ``python -m inference.weights`` runs ``inference.checkpoint.weights`` (check, make-tiny)."""

from inference.checkpoint.weights import main

if __name__ == "__main__":
    raise SystemExit(main())
