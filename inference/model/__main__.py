"""``python -m inference.model keys --preset multitalk-14b|tiny``: key<TAB>shape per tensor and the count.

Built on the meta device, so no memory is used.
"""

from __future__ import annotations

import argparse

from inference.model.config import DiTConfig
from inference.model.dit import build_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.model", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="print key<TAB>shape per tensor and the parameter count")
    keys.add_argument("--preset", default="multitalk-14b", choices=["multitalk-14b", "tiny"])
    args = parser.parse_args(argv)
    model = build_model(DiTConfig.preset(args.preset))
    total = 0
    for key, tensor in model.state_dict().items():
        total += tensor.numel()
        print(f"{key}\t{list(tensor.shape)}")
    print(f"# parameters\t{total}\t({total / 1e9:.3f} B)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
