"""Training memory of one model and batch under each technique: measured beside the estimate.

    python benchmarks/memory.py                 # CPU: tiny preset, batch 16 x 128
    python benchmarks/memory.py --preset small --batch 32   # on a GPU

For each row: activation bytes saved for backward (measured with saved-tensor hooks, and the
estimator's prediction), parameter + gradient + optimizer bytes (the real tensors after a step,
and the prediction), the median step time, and on CUDA the peak allocated memory of a step.
Gradient accumulation runs the same effective batch as K micro-batches: its activation
memory is one micro-batch's. The baseline is full training (= full fine-tuning) in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from course_lib.device import pick_device
from course_lib.lora import apply_lora
from course_lib.memory import (
    enable_gradient_checkpointing,
    estimate_training_memory,
    saved_activation_bytes,
    state_bytes,
)
from course_lib.model import GPT, GPTConfig
from course_lib.precision import autocast


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def run_row(config, batch, seq_len, device, *, precision="fp32", checkpointing=False, grad_accum=1,
            lora_rank=None, steps=3):
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if lora_rank:
        apply_lora(model, rank=lora_rank, alpha=2 * lora_rank)
    if checkpointing:
        enable_gradient_checkpointing(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    micro = batch // grad_accum
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=g).to(device)
    labels = torch.randint(0, config.vocab_size, (batch, seq_len), generator=g).to(device)
    amp = "bf16" if precision == "autocast" else "fp32"
    with autocast(device, amp):  # one micro-batch (cloned: a slice would share the whole batch's storage)
        acts = saved_activation_bytes(model, ids[:micro].clone(), labels=labels[:micro].clone())

    def step():
        opt.zero_grad(set_to_none=True)
        for k in range(grad_accum):
            sl = slice(k * micro, (k + 1) * micro)
            with autocast(device, amp):
                loss = model(ids[sl], labels=labels[sl]).loss / grad_accum  # equal lengths: mean/K is exact
            loss.backward()
        opt.step()

    cuda = device.type == "cuda"
    times = []
    for i in range(steps + 2):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    est = estimate_training_memory(config, micro, seq_len, precision=precision, checkpointing=checkpointing,
                                   lora_rank=lora_rank)
    measured = state_bytes(model, opt)
    return {
        "act": acts.total, "act_est": est.activations,
        "pgo": sum(measured.values()), "pgo_est": est.params_grads_optimizer,
        "ms": 1000 * statistics.median(times), "peak": peak, "peak_est": est.total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=65)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    if args.batch % args.accum:
        parser.error(f"--batch {args.batch} must be divisible by --accum {args.accum}")
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    config = GPTConfig.from_preset(args.preset, vocab_size=args.vocab)
    T = args.seq_len or config.block_size
    rows = {
        "baseline: full training / fine-tuning, fp32": {},
        "gradient checkpointing (every block)": {"checkpointing": True},
        "bf16 autocast": {"precision": "autocast"},
        f"accumulation, {args.accum} micro-batches of {args.batch // args.accum}": {"grad_accum": args.accum},
        "LoRA rank 4 (q, v)": {"lora_rank": 4},
        "LoRA rank 16 (q, v)": {"lora_rank": 16},
    }
    print(f"model: {args.preset} ({GPT(config).num_params():,} params), batch {args.batch} x {T} tokens, "
          f"AdamW, device {device}, torch {torch.__version__}")
    cuda = device.type == "cuda"
    head = "| setting | activations MiB (est.) | params+grads+optim MiB (est.) | step ms |"
    head += " peak MiB (est.) |" if cuda else ""
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, kwargs in rows.items():
        r = run_row(config, args.batch, T, device, steps=args.steps, **kwargs)
        line = (f"| {name} | {_mib(r['act'])} ({_mib(r['act_est'])}) | {_mib(r['pgo'])} ({_mib(r['pgo_est'])}) "
                f"| {r['ms']:.1f} |")
        if cuda:
            line += f" {_mib(r['peak'])} ({_mib(r['peak_est'])}) |"
        print(line, flush=True)
    if device.type == "cpu":
        print("\nOn this CPU bf16 autocast is slower than fp32 (no bf16 matrix units): its speed gain is a GPU "
              "result. Activation memory falls on any device.")


if __name__ == "__main__":
    main()
