"""``python -m inference.memory``: the memory plan of a layout, per rank and per stage, and its verdict.

    python -m inference.memory --gpus 8 --gpu-gib 24 --size multitalk-720 --frames 81 --t5_fsdp --dit_fsdp
    python -m inference.memory --gpus 1 --gpu-gib 24 --size multitalk-480      # names a layout that fits
    python -m inference.memory --table                                          # the README's table

Layout flags are the service's (``distributed_app.py``), with upstream MultiTalk's names. Exit status 0 when
the layout fits, 1 when it does not, 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import logging
import sys

from common.flags import flag_bool
from inference.memory.plan import (
    DEFAULT_RESERVE_GIB,
    FSDP_MODES,
    QUANT_KINDS,
    SIZES,
    VAE_TILING_MODES,
    Layout,
    MemoryPlanError,
    Plan,
    Workload,
    gib,
    plan,
)
from inference.memory.sizes import ModelSizes

logger = logging.getLogger(__name__)

# The README's table: (GPUs, GiB each, size, extra layout flags).
TABLE_ROWS: tuple[tuple[int, float, str, dict[str, object]], ...] = (
    (8, 24, "multitalk-480", {"dit_fsdp": "full", "t5_fsdp": True}),
    (8, 24, "multitalk-720", {"dit_fsdp": "full", "t5_fsdp": True}),
    (1, 24, "multitalk-480", {}),
    (1, 24, "multitalk-720", {}),
    (1, 80, "multitalk-480", {}),
    (1, 80, "multitalk-720", {}),
    (8, 80, "multitalk-480", {}),
    (8, 80, "multitalk-720", {}),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=1, help="ranks, one GPU each (torchrun --nproc_per_node)")
    p.add_argument("--gpu-gib", type=float, default=24.0, help="memory of each GPU in GiB")
    p.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                   help="kept free for the CUDA context, workspaces and allocator rounding")  # fmt: skip
    p.add_argument("--preset", choices=("multitalk-14b", "tiny"), default="multitalk-14b")
    p.add_argument("--size", choices=tuple(SIZES), default="multitalk-480",
                   help="resolution family; the plan takes its largest bucket")  # fmt: skip
    p.add_argument(
        "--height", type=int, default=None, help="plan this height instead of the family's largest"
    )
    p.add_argument("--width", type=int, default=None, help="plan this width instead of the family's largest")
    p.add_argument("--frames", type=int, default=81, help="frames per clip (4n+1)")
    p.add_argument("--dit_fsdp", nargs="?", const="full", default="off", choices=FSDP_MODES)
    p.add_argument("--t5_fsdp", action="store_true")
    p.add_argument("--t5_cpu", action="store_true")
    p.add_argument(
        "--offload_model", type=flag_bool, default=None, help="default: true on one GPU, false on more"
    )
    p.add_argument("--num_persistent_param_in_dit", type=int, default=None)
    p.add_argument("--vae_tiling", choices=VAE_TILING_MODES, default="auto")
    p.add_argument("--quant", choices=QUANT_KINDS, default=None)
    p.add_argument("--table", action="store_true", help="print the README's table of plans and exit")
    return p


def layout_from_args(args: argparse.Namespace) -> Layout:
    return Layout(
        gpus=args.gpus,
        gpu_gib=args.gpu_gib,
        reserve_gib=args.reserve_gib,
        dit_fsdp=args.dit_fsdp,
        t5_fsdp=args.t5_fsdp,
        t5_cpu=args.t5_cpu,
        offload_model=args.offload_model,
        num_persistent_param_in_dit=args.num_persistent_param_in_dit,
        vae_tiling=args.vae_tiling,
        quant=args.quant,
    )


def format_plan(result: Plan) -> str:
    """Per rank: every stage's total, the peak stage by component, then the verdict."""
    lines = [f"{result.model}, {result.workload.describe()}, {result.layout.gpus} x {result.layout.gpu_gib:g} GiB "
             f"({result.layout.flags()})"]  # fmt: skip
    for rank in result.ranks:
        peak = rank.peak
        lines.append(f"{rank.ranks}: peak {gib(peak.total)} at {peak.name}")
        lines.append("  stages: " + ", ".join(f"{s.name} {gib(s.total)}" for s in rank.stages))
        for item in peak.items:
            if item.nbytes or item.name in ("DiT blocks in flight", "attention buffers"):
                note = f"  ({item.note})" if item.note else ""
                lines.append(f"    {item.name:28s} {item.nbytes / 2**30:8.2f} GiB{note}")
    lines.append(result.verdict)
    return "\n".join(lines)


def table(sizes: ModelSizes) -> str:
    """The README's table: one row per (GPUs, size), the plan of the layout given or the one suggested."""
    out = ["| GPUs | clip | layout | peak (rank, stage) | verdict |", "|---|---|---|---|---|"]
    for gpus, gpu_gib, size, extra in TABLE_ROWS:
        work = Workload.for_size(size)
        asked = Layout(gpus=gpus, gpu_gib=gpu_gib, **extra)  # type: ignore[arg-type]
        result = plan(sizes, asked, work)
        shown = result if result.fits or result.suggestion is None else plan(sizes, result.suggestion, work)
        worst = shown.worst
        verdict = "fits" if shown.fits else "does not fit"
        if shown is not result:
            verdict = f"fits with the suggested flags ({asked.flags()} alone: {gib(result.worst.peak.total)})"
        tiled = ", VAE tiled" if shown.vae_tiled else ""
        out.append(
            f"| {gpus} x {gpu_gib:g} GiB | {work.describe()} | `{shown.layout.flags()}`{tiled} | "
            f"{gib(worst.peak.total)} ({worst.ranks}, {worst.peak.name}) | {verdict} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # its dtype note on the meta VAE of the dry run
    try:
        sizes = ModelSizes.preset(args.preset)
        if args.table:
            print(table(sizes))
            return 0
        if (args.height is None) != (args.width is None):
            raise MemoryPlanError("height", "give --height and --width together")
        if args.height is not None:
            work = Workload(args.height, args.width, args.frames)
        else:
            work = Workload.for_size(args.size, args.frames)
        result = plan(sizes, layout_from_args(args), work)
    except MemoryPlanError as exc:
        print(f"error: --{exc.field}: {exc.message}", file=sys.stderr)
        return 2
    print(format_plan(result))
    if not result.fits and result.suggestion is not None:
        print()
        print("with the suggested flags:")
        print(format_plan(plan(sizes, result.suggestion, work)))
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
