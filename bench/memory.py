"""Memory plan against measurement: for small configurations and layouts, every stage's planned peak and the
measured peak of live tensors (``inference.memory.track.LiveTensors``, a dispatch-mode allocation tracker,
not RSS), on the CPU.

    python bench/memory.py              # every case of inference.memory.measure (stages, then one forward)
    python bench/memory.py --breakdown  # also the largest live tensors at each stage's peak

Prints planned, measured and measured/planned per stage; exits 1 when a ratio leaves 0.85..1.15.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from inference.memory.measure import CASES, FORWARD_CASES, measure, measure_forward, resolve

LOW, HIGH = 0.85, 1.15


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", type=int, action="append", help="run only these case numbers (0-based)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bad = 0
    print(f"{'case':48s} {'stage':13s} {'planned MiB':>12s} {'measured MiB':>13s} {'ratio':>6s}")
    for i, case in enumerate(CASES):
        if args.case and i not in args.case:
            continue
        _, results = measure(resolve(case))
        for r in results:
            ok = LOW <= r.ratio <= HIGH
            bad += not ok
            print(f"{r.case:48s} {r.stage:13s} {r.planned / 2**20:12.2f} {r.measured / 2**20:13.2f} "
                  f"{r.ratio:6.3f}{'' if ok else '  OUT OF RANGE'}")  # fmt: skip
    if not args.case:
        for case in FORWARD_CASES:
            planned, per_rank = measure_forward(case)
            for rank, got in enumerate(per_rank):
                ratio = got / planned
                ok = LOW <= ratio <= HIGH
                bad += not ok
                print(f"{case.name:48s} {f'rank {rank}':13s} {planned / 2**20:12.2f} {got / 2**20:13.2f} "
                      f"{ratio:6.3f}{'' if ok else '  OUT OF RANGE'}")  # fmt: skip
    print(f"{'all ratios within' if not bad else f'{bad} ratio(s) outside'} {LOW}..{HIGH}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
