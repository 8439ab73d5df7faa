"""AdamW step time on CPU: the single-tensor loop, the multi-tensor ``foreach`` path and the fused kernel.

``course_lib.training.make_optimizer`` picks ``fused=True`` on CPU and CUDA; this is the
measurement behind that choice. Same model parameters and gradients for all three, run
alternately, median of many steps; the last column checks that each variant computes the same
update as the single-tensor loop (largest parameter difference after one step, fp32), next to
the size of that update (Adam's first step moves each weight by about the learning rate, 1e-3).

    python benchmarks/optimizers.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from course_lib.model import GPT, GPTConfig  # noqa: E402
from throughput import DEFAULT_VOCAB  # noqa: E402  (the same shapes as the throughput table)

VARIANTS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
SIZES = ("tiny", "small")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; AdamW.step(), median of {args.reps}")
    print("| size | params | " + " | ".join(f"{v} (ms)" for v in VARIANTS) + " | fused speed-up over foreach "
          "| first update | max difference from for-loop |")
    print("|---|---|" + "---|" * (len(VARIANTS) + 3))
    for size in SIZES:
        torch.manual_seed(0)
        base = GPT(GPTConfig.from_preset(size, vocab_size=DEFAULT_VOCAB[size]))
        grads = [torch.randn_like(param) * 1e-3 for param in base.parameters()]
        models = {name: copy.deepcopy(base) for name in VARIANTS}
        for model in models.values():
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone()
        opts = {name: torch.optim.AdamW(models[name].parameters(), lr=1e-3, **kw) for name, kw in VARIANTS.items()}
        for opt in opts.values():
            opt.step()
        update = max((a - b).abs().max().item() for a, b in zip(models["for-loop"].parameters(), base.parameters()))
        diff = max(
            (a - b).abs().max().item()
            for name in ("foreach", "fused")
            for a, b in zip(models[name].parameters(), models["for-loop"].parameters())
        )
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.reps):
            for name, opt in opts.items():  # alternate, so load drift hits all alike
                t0 = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t0)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"| {size} | {base.num_params() / 1e6:.2f}M | " + " | ".join(f"{ms[v]:.2f}" for v in VARIANTS)
              + f" | {ms['foreach'] / ms['fused']:.1f}x | {update:.1e} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
