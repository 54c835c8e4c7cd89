"""``python -m inference.scene``: compose a scene from two portraits or one image (see ``compose.main``)."""

from inference.scene.compose import main

if __name__ == "__main__":
    raise SystemExit(main())
