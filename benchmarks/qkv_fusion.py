"""Is it worth fusing the q/k/v projections into one GEMM, as GPT-2's ``c_attn`` does?

``course_lib``'s attention keeps three ``nn.Linear`` layers (LoRA and tensor parallelism target
them by name). This times forward + backward of the three projections against one fused GEMM
over the concatenated weights (a custom autograd function that saves no copy of the weights, so
activation memory is unchanged), at the shapes of the ``tiny`` and ``small`` presets as
``throughput.py`` runs them (1,024 tokens per step), alternately, median of many repetitions, and
checks that both give the same gradients. The last column puts the saving in proportion: the
time saved in all layers over the time of one whole training step of the model.

    python benchmarks/qkv_fusion.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from course_lib.model import GPT, GPTConfig  # noqa: E402
from throughput import DEFAULT_BATCH, DEFAULT_VOCAB  # noqa: E402


class FusedProjections(torch.autograd.Function):
    """``x @ cat(Ws).T + cat(bs)`` as one GEMM; saves ``x`` and the weights, not their concatenation."""

    @staticmethod
    def forward(ctx, x, wq, wk, wv, bq, bk, bv):  # type: ignore[override]
        ctx.save_for_backward(x, wq, wk, wv)
        return F.linear(x, torch.cat((wq, wk, wv)), torch.cat((bq, bk, bv)))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, wq, wk, wv = ctx.saved_tensors
        grad_x = grad @ torch.cat((wq, wk, wv))
        grad_w = grad.t() @ x
        return grad_x, *grad_w.chunk(3), *grad.sum(0).chunk(3)


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def training_step_ms(config: GPTConfig, batch: int, reps: int) -> float:
    """Median time of one forward + backward + fused AdamW step of course_lib's GPT."""
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, config.block_size))
    labels = ids.roll(-1, dims=1)  # the model does not shift: labels[:, t] is position t's target

    def step() -> None:
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return median_ms(step, reps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; forward + backward of the "
          f"q/k/v projections, median of {args.reps}")
    print("| size | width | tokens | three GEMMs (ms) | one fused GEMM (ms) | fused speed-up | "
          "max grad difference | saving per training step |")
    print("|---|---|---|---|---|---|---|---|")
    for size in ("tiny", "small"):
        config = GPTConfig.from_preset(size, vocab_size=DEFAULT_VOCAB[size])
        width, tokens = config.n_embd, DEFAULT_BATCH[size] * config.block_size
        torch.manual_seed(0)
        layers = [nn.Linear(width, width) for _ in range(3)]
        params = [layer.weight for layer in layers] + [layer.bias for layer in layers]
        x = torch.randn(tokens, width, requires_grad=True)
        grad_out = torch.randn(tokens, 3 * width)

        def separate() -> list[torch.Tensor]:
            outs = [layer(x) for layer in layers]
            return list(torch.autograd.grad(outs, [x, *params], list(grad_out.split(width, -1))))

        def fused() -> list[torch.Tensor]:
            out = FusedProjections.apply(x, *params)
            return list(torch.autograd.grad(out, [x, *params], grad_out))

        diff = max((a - b).abs().max().item() for a, b in zip(separate(), fused()))
        runs = {"separate": separate, "fused": fused}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(10):
            for fn in runs.values():
                fn()
        for _ in range(args.reps):
            for key, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        sep, fus = (statistics.median(times[k]) * 1e3 for k in ("separate", "fused"))
        step = training_step_ms(config, DEFAULT_BATCH[size], reps=5)
        saving = config.n_layer * (sep - fus) / step
        print(f"| {size} | {width} | {tokens} | {sep:.2f} | {fus:.2f} | {sep / fus:.2f}x | {diff:.1e} | "
              f"{saving:.1%} of {step:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
