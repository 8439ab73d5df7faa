"""Run lesson 18's sweeps (learning rate x width under SP and muP, WSD vs cosine, Muon vs AdamW) and cache them.

    python scripts/transfer_sweep.py                  # the cached sweep (about 15 minutes on 2 cores)
    python scripts/transfer_sweep.py --widths 32 64 --steps 30 --out /tmp/quick.json

Each job trains in its own process with one thread (two at a time by default). The JSON holds the
command, versions and settings, and the results of ``course_lib.lessons.transfer``'s functions.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from course_lib.lessons import transfer  # noqa: E402

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
    p.add_argument("--budgets", type=int, nargs="+", default=[100, 200, 300], help="WSD vs cosine budgets")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    jobs = [("schedule", dict(width=128, lr=3e-3, budgets=tuple(args.budgets))),
            ("optimizer", dict(width=128, adam_lr=3e-3, muon_lr=0.02, steps=max(args.budgets)))]
    jobs += [("lr", dict(width=w, lr=lr, mup=mup, steps=args.steps))
             for w in args.widths for mup in (False, True) for lr in args.lrs]
    results: dict[str, list] = {"lr": [], "schedule": [], "optimizer": []}
    with ProcessPoolExecutor(args.workers) as pool:
        for kind, result in pool.map(_job, jobs):
            results[kind].append(result)
    out = {
        "command": "python scripts/transfer_sweep.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__, "python": platform.python_version(),
        "settings": {"widths": args.widths, "lrs": args.lrs, "steps": args.steps, "base_width": transfer.BASE_WIDTH,
                     "layers": transfer.LAYERS, "heads": transfer.HEADS, "block": transfer.BLOCK,
                     "batch": transfer.BATCH},
        "lr_sweep": results["lr"], "schedule": results["schedule"][0], "optimizer": results["optimizer"][0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out) + "\n")
    print(f"wrote {len(results['lr'])} sweep points, the schedule and the optimizer comparison to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
