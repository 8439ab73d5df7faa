"""Compile the course GPT's training step on this CPU and cache eager-vs-compiled numbers for lesson 12.

    python scripts/compile_benchmark.py        # the cached result: 3-6 minutes on one busy CPU core

Compiling the whole training step with inductor's C++ backend takes minutes here (longer than
the lesson's budget), so the notebook reads ``notebooks/data/compile_cpu.json``; on a GPU it runs
the same measurement (``course_lib.lessons.compile_step.compare_compiled``) live. The output holds
the command that made it, the date and the versions. Inductor's on-disk cache is pointed at a new
empty folder, so the compile time is that of a first compile (a second compile of the same graph
hits the cache and takes seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# A fresh inductor cache: the compile time measured is a first compile's, not a cache hit's.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

import torch  # noqa: E402

from course_lib.lessons.compile_step import compare_compiled  # noqa: E402
from course_lib.model import GPTConfig  # noqa: E402

DEFAULT_OUT = ROOT / "notebooks" / "data" / "compile_cpu.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, default=65, help="the character-level Shakespeare vocabulary")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="the notebook's measurements use one thread")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = GPTConfig.from_preset(args.preset, vocab_size=args.vocab)
    try:
        result = compare_compiled(config, args.batch, "cpu", reps=args.reps)
    finally:
        shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    result = {
        "command": "python scripts/compile_benchmark.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:])),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "python": platform.python_version(),
        "preset": args.preset, **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"compile {result['compile_s']:.0f} s; eager {result['eager_tok_s']:,.0f} tok/s, compiled "
          f"{result['compiled_tok_s']:,.0f} tok/s: {result['speedup']:.2f}x "
          f"({result['speedup_low']:.2f}-{result['speedup_high']:.2f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
