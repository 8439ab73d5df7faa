"""Train a sweep of tiny GPTs on Shakespeare and cache their validation curves for lesson 10.

    python scripts/scaling_sweep.py                  # the cached sweep: ~5 minutes on 2 CPU cores
    python scripts/scaling_sweep.py --steps 100 --out /tmp/sweep.json   # a quick look

Each size trains in its own process with one thread (two at a time by default), so the sweep
uses both cores of a small machine. The output JSON holds the command that made it, the
versions, the settings and, per size, ``course_lib.lessons.sweeps.sweep_point``'s result.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from course_lib.lessons.cache import cache_header, write_cache  # noqa: E402
from course_lib.lessons.sweeps import DEFAULT_SWEEP, SweepSize, sweep_point  # noqa: E402

DEFAULT_OUT = ROOT / "notebooks" / "data" / "scaling_sweep.json"


def parse_size(text: str) -> SweepSize:
    try:
        n_layer, n_embd, n_head = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like LAYERSxWIDTHxHEADS, e.g. 2x32x2") from None
    if n_embd % n_head:
        raise argparse.ArgumentTypeError(f"size {text!r}: width {n_embd} is not divisible by {n_head} heads")
    return SweepSize(n_layer, n_embd, n_head)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", type=parse_size, default=list(DEFAULT_SWEEP),
                   help="model shapes LAYERSxWIDTHxHEADS (default: 1x16x2 2x32x2 2x48x2 3x64x4 4x96x4)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per model")
    p.add_argument("--eval-every", type=int, default=25, help="validation loss every N steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="sizes trained at once (one thread each)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.steps < args.eval_every or args.eval_every < 1:
        p.error("--eval-every must be >= 1 and at most --steps")

    run = partial(sweep_point, steps=args.steps, eval_every=args.eval_every, block_size=args.block_size,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    # biggest first, so the longest run starts at once and the small ones fill the other worker
    order = sorted(args.sizes, key=lambda s: -s.n_layer * s.n_embd**2)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        runs = list(pool.map(run, order))
    runs.sort(key=lambda r: r["params"])
    for r in runs:
        print(f"{r['n_layer']}x{r['n_embd']}x{r['n_head']}: {r['params']:>7,} params, "
              f"val loss {r['points'][-1]['val_loss']:.3f} after {r['points'][-1]['tokens']:,} tokens "
              f"({r['seconds']:.0f} s)")
    out = {
        **cache_header("scripts/scaling_sweep.py", sys.argv[1:] if argv is None else argv),
        "corpus": "shakespeare", "tokenizer": "char",
        "settings": {"steps": args.steps, "eval_every": args.eval_every, "batch_size": args.batch_size,
                     "block_size": args.block_size, "lr": args.lr, "schedule": "20-step warmup, then constant",
                     "seed": args.seed},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "runs": runs,
    }
    write_cache(args.out, out, indent=1)
    print(f"wrote {args.out} in {out['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
