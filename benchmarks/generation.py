"""Generation speed of GPT.generate with the KV cache against the uncached path, tokens/s.

Without a cache every new token re-runs the model over the whole context and the head over
every position; with it a new token is one position's forward pass (its key and value are
appended to each block's cache) and the head runs on the last position only. Both paths
generate the same tokens (checked here: greedy decoding, equal outputs). They run alternately
after warm-up, so a noisy neighbour slows both alike; the speed-up is the median of the paired
ratios with a distribution-free 95% interval (``course_lib.profiling.median_interval``).

    python benchmarks/generation.py                 # tiny and small presets on CPU (2-3 minutes on 2 busy cores)
    python benchmarks/generation.py --device cuda --sizes small,gpt2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import DEFAULT_VOCAB  # noqa: E402

from course_lib.model import GPT, PRESETS, GPTConfig  # noqa: E402
from course_lib.profiling import median_interval  # noqa: E402


def bench_size(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Time cached and uncached greedy generation at one preset; tokens/s and the paired ratio."""
    config = GPTConfig.from_preset(name, vocab_size=DEFAULT_VOCAB[name])
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    new = args.new_tokens or config.block_size // 2
    prompt = torch.randint(0, config.vocab_size, (args.batch, config.block_size - new), device=device)
    runs = {key: (lambda c=key == "cached": model.generate(prompt, new, temperature=0, use_cache=c))
            for key in ("cached", "uncached")}
    outputs = {key: fn() for key, fn in runs.items()}  # warm-up, and the equality check
    if not torch.equal(outputs["cached"], outputs["uncached"]):
        raise RuntimeError(f"{name}: cached and uncached generation disagree")
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(args.reps):
        for key, fn in runs.items():  # alternate, so drift in machine load hits both alike
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[key].append(time.perf_counter() - t0)
    tokens = args.batch * new
    paired = [u / c for c, u in zip(times["cached"], times["uncached"], strict=True)]  # > 1: the cache is faster
    low, high = median_interval(paired)
    return dict(prompt=prompt.size(1), new=new, cached=tokens / statistics.median(times["cached"]),
                uncached=tokens / statistics.median(times["uncached"]),
                ratio=statistics.median(paired), low=low, high=high)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="tiny,small", help=f"comma-separated presets from {sorted(PRESETS)}")
    p.add_argument("--batch", type=int, default=1, help="sequences generated at once")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default half the context)")
    p.add_argument("--reps", type=int, default=5, help="timed generations per path")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--min-speedup", type=float, default=None,
                   help="exit non-zero unless the cache is faster than this at every size beyond noise "
                        "(the whole 95%% interval above it)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n.strip() for n in args.sizes.split(",")]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        p.error(f"unknown size(s) {unknown}; choose from {sorted(PRESETS)}")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {where}; greedy, batch {args.batch}, median of {args.reps} paired runs")
    head = ["size", "prompt + new tokens", "uncached tok/s", "KV cache tok/s", "speed-up (95% CI)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    slow = []
    for name in names:
        r = bench_size(name, args, device)
        lines.append(f"| {name} | {r['prompt']:.0f} + {r['new']:.0f} | {r['uncached']:,.0f} | {r['cached']:,.0f} | "
                     f"{r['ratio']:.2f}x ({r['low']:.2f}-{r['high']:.2f}) |")
        if args.min_speedup is not None and r["low"] <= args.min_speedup:
            slow.append(name)
    print("\n".join(lines))
    if slow:
        print(f"FAIL: the KV cache is not beyond noise faster than {args.min_speedup}x at {', '.join(slow)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
