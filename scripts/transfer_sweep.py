"""Run lesson 18's sweeps (learning rate x width under SP and muP, WSD vs cosine, Muon vs AdamW) and cache them.

    python scripts/transfer_sweep.py                  # the cached sweep (about 40 minutes on 2 cores)
    python scripts/transfer_sweep.py --widths 32 64 --steps 30 --seeds 0 --out /tmp/quick.json

The learning-rate sweep runs every width, rate and seed under SP and muP (untied head), plus one
seed of muP with the head tied to the embedding at the narrowest and widest width (the pitfall).

Each job trains in its own process with one thread (two at a time by default). The JSON holds the
command, versions and settings, and the results of ``course_lib.lessons.transfer``'s functions.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from course_lib.lessons import transfer  # noqa: E402
from course_lib.lessons.cache import cache_header, write_cache  # noqa: E402

DEFAULT_OUT = ROOT / "notebooks" / "data" / "transfer_sweep.json"


def _job(job: tuple) -> tuple[str, dict]:
    torch.set_num_threads(1)
    kind, kwargs = job
    fn = {"lr": transfer.lr_sweep_point, "schedule": transfer.schedule_comparison,
          "optimizer": transfer.optimizer_comparison}[kind]
    return kind, fn(**kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=list(transfer.WIDTHS))
    p.add_argument("--lrs", type=float, nargs="+", default=list(transfer.LRS))
    p.add_argument("--steps", type=int, default=transfer.SWEEP_STEPS, help="steps per learning-rate point")
    p.add_argument("--seeds", type=int, nargs="+", default=list(transfer.SEEDS))
    p.add_argument("--budgets", type=int, nargs="+", default=[100, 200, 300], help="WSD vs cosine budgets")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    jobs = [("schedule", dict(width=128, lr=3e-3, budgets=tuple(args.budgets))),
            ("optimizer", dict(width=128, adam_lr=3e-3, muon_lr=0.02, steps=max(args.budgets)))]
    jobs += [("lr", dict(width=w, lr=lr, mup=mup, seed=seed, steps=args.steps))
             for w in args.widths for mup in (False, True) for lr in args.lrs for seed in args.seeds]
    jobs += [("lr", dict(width=w, lr=lr, mup=True, seed=args.seeds[0], steps=args.steps, tie_embeddings=True))
             for w in (min(args.widths), max(args.widths)) for lr in args.lrs]
    jobs.sort(key=lambda job: -job[1]["width"])  # widest (slowest) first keeps both workers busy
    results: dict[str, list] = {"lr": [], "schedule": [], "optimizer": []}
    with ProcessPoolExecutor(args.workers) as pool:
        for kind, result in pool.map(_job, jobs):
            results[kind].append(result)
    out = {
        **cache_header("scripts/transfer_sweep.py", sys.argv[1:] if argv is None else argv),
        "settings": {"widths": args.widths, "lrs": args.lrs, "steps": args.steps, "seeds": args.seeds,
                     "base_width": transfer.BASE_WIDTH,
                     "layers": transfer.LAYERS, "heads": transfer.HEADS, "block": transfer.BLOCK,
                     "batch": transfer.BATCH},
        "lr_sweep": results["lr"], "schedule": results["schedule"][0], "optimizer": results["optimizer"][0],
    }
    write_cache(args.out, out)
    print(f"wrote {len(results['lr'])} sweep points, the schedule and the optimizer comparison to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
