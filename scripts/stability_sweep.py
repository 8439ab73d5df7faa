"""Train lesson 17's instrumented runs (every fix x several seeds) and cache them as JSON.

    python scripts/stability_sweep.py                 # the cached sweep (about 10 minutes on 2 cores)
    python scripts/stability_sweep.py --seeds 0 --steps 60 --out /tmp/quick.json

Each run trains in its own process with one thread (two at a time by default). The JSON holds the
command, versions and settings, and per run the series that ``course_lib.lessons.stability.stability_run``
records (loss, gradient norm, update-to-weight ratio, attention and output logits).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from course_lib.lessons.cache import cache_header, write_cache  # noqa: E402
from course_lib.lessons.stability import MODEL_DEFAULTS, STABILITY_SWEEP, TRAIN_DEFAULTS, stability_run  # noqa: E402

DEFAULT_OUT = ROOT / "notebooks" / "data" / "stability_sweep.json"


def _one(job: tuple[int, int, int]) -> dict:
    torch.set_num_threads(1)
    index, seed, steps = job
    return stability_run(STABILITY_SWEEP[index], seed, steps)


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=TRAIN_DEFAULTS["steps"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    jobs = [(i, seed, args.steps) for i in range(len(STABILITY_SWEEP)) for seed in args.seeds]
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(_one, jobs))
    out = {
        **cache_header("scripts/stability_sweep.py", sys.argv[1:] if argv is None else argv),
        "settings": {"model": MODEL_DEFAULTS, "train": {**TRAIN_DEFAULTS, "steps": args.steps}, "seeds": args.seeds},
        "runs": _rounded(runs),
    }
    write_cache(args.out, out)
    print(f"wrote {len(runs)} runs to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
