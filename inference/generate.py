"""Kept command: ``python -m inference.generate`` runs ``inference.render.cli`` (one job from a JSON file)."""

from inference.render.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
