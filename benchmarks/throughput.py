"""Training-step throughput of course_lib's GPT against transformers' GPT-2, and MFU.

Both models get the same width, depth, heads, vocabulary and context, the same batch and the
same optimizer (AdamW); one training step is forward + backward + AdamW step + zero_grad. The
two run alternately in one process after warm-up, so a noisy neighbour slows both alike. Each
reports the median of several repetitions; the ratio is the median of the *paired* ratios (each
reference step over the course_lib step next to it) with a distribution-free 95% confidence
interval for that median, so "faster", "slower" and "tied within noise" can be told apart.

MFU (model FLOPs utilisation) = achieved FLOP/s (tokens/s x ``GPT.flops_per_token``) over
the matrix-multiply peak measured here (and, on CUDA, over the datasheet peak as well). The
peak is timed in the same alternating loop as the two models, best over the whole run, so a
neighbour that is busy only while the peak is measured cannot push MFU above 100%.

With ``--compile`` both models are compiled (``torch.compile``) and an eager copy of course_lib's
model is timed in the same alternating loop: three more columns give its tokens/s, the compile
speed-up (median paired eager/compiled step time, 95% interval) and the compile time (first
compiled step less a steady one).

    python benchmarks/throughput.py                      # CPU table (about 2 minutes on 2 cores)
    python benchmarks/throughput.py --compile --sizes tiny  # compiled vs eager on CPU (a few minutes)
    python benchmarks/throughput.py --device cuda --bf16 --compile --sizes gpt2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from course_lib.model import GPT, PRESETS, GPTConfig  # noqa: E402
from course_lib.monitoring import datasheet_peak_flops, measure_matmul_flops, mfu  # noqa: E402
from course_lib.profiling import median_interval  # noqa: E402 (tests import it from here too)

# Batch (sequences) and vocabulary per size: small enough for a 2-core CPU at the small sizes.
DEFAULT_BATCH = {"nano": 16, "tiny": 8, "small": 4, "gpt2": 16}
DEFAULT_VOCAB = {"nano": 256, "tiny": 1024, "small": 4096, "gpt2": 50257}


@dataclass
class Row:
    size: str
    params_m: float
    tokens_per_step: int
    ours_tok_s: float
    ref_tok_s: float
    ratio: float
    ratio_low: float
    ratio_high: float
    flops_per_token: int
    mfu_measured: float | None = None
    mfu_datasheet: float | None = None
    eager_tok_s: float | None = None  # with --compile: course_lib eager, timed in the same loop
    compile_speedup: float | None = None  # median paired eager/compiled step time, and its interval
    compile_low: float | None = None
    compile_high: float | None = None
    compile_s: float | None = None  # first compiled step (tracing + code generation) less a steady one

    def with_mfu(self, peak: float, sheet_peak: float | None) -> Row:
        """This row with MFU against the measured peak (and the datasheet peak, if known)."""
        achieved = self.ours_tok_s
        return replace(
            self, mfu_measured=mfu(achieved, self.flops_per_token, peak),
            mfu_datasheet=None if sheet_peak is None else mfu(achieved, self.flops_per_token, sheet_peak))


def reference_model(config: GPTConfig) -> torch.nn.Module:
    """transformers' GPT-2 with the same shape, built from a config (nothing is downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_pytorch_tanh",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(hf)


def make_step(model, optimizer, input_ids, labels, bf16: bool, shift_inside: bool):
    """One training step. transformers shifts labels itself; course_lib expects them shifted."""
    device_type = input_ids.device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            if shift_inside:
                loss = model(input_ids=input_ids, labels=input_ids).loss
            else:
                loss = model(input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_size(name: str, args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype) -> tuple[Row, float]:
    """Time both models at one preset; returns the row (MFU not yet filled) and the best matmul FLOP/s seen."""
    vocab = args.vocab or DEFAULT_VOCAB[name]
    batch = args.batch or DEFAULT_BATCH[name]
    config = GPTConfig.from_preset(name, vocab_size=vocab, dropout=0.0)
    T = config.block_size
    torch.manual_seed(0)
    ours = GPT(config).to(device)
    ref = reference_model(config).to(device)
    n_ours, n_ref = ours.num_params(), sum(p.numel() for p in ref.parameters())
    if n_ours != n_ref:
        raise RuntimeError(f"{name}: models differ in size ({n_ours} vs {n_ref} parameters)")
    ids = torch.randint(0, vocab, (batch, T + 1), device=device)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    arms = [("ours", ours, False, args.compile), ("ref", ref, True, args.compile)]
    if args.compile:  # an eager copy of course_lib's model too: the compile speed-up, paired
        arms.append(("eager", copy.deepcopy(ours), False, False))
    steps = {}
    for key, model, shift, compiled in arms:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
        m = torch.compile(model, backend=args.compile_backend) if compiled else model
        steps[key] = make_step(m, opt, inputs, labels, args.bf16, shift)
    warm: dict[str, list[float]] = {k: [] for k in steps}  # the first compiled call traces and generates code
    for _ in range(max(args.warmup, 2 if args.compile else 0)):
        for key, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            warm[key].append(time.perf_counter() - t0)
    times: dict[str, list[float]] = {k: [] for k in steps}
    peak = 0.0
    for _ in range(args.reps):
        for key, fn in steps.items():  # alternate, so drift in machine load hits both alike
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
        peak = max(peak, measure_matmul_flops(device, dtype, reps=1))
    tokens = batch * T
    ours_tok_s = tokens / statistics.median(times["ours"])
    ref_tok_s = tokens / statistics.median(times["ref"])
    paired = [r / o for o, r in zip(times["ours"], times["ref"])]  # > 1: course_lib faster
    low, high = median_interval(paired)
    row = Row(
        size=name, params_m=n_ours / 1e6, tokens_per_step=tokens, ours_tok_s=ours_tok_s,
        ref_tok_s=ref_tok_s, ratio=statistics.median(paired), ratio_low=low, ratio_high=high,
        flops_per_token=ours.flops_per_token(T),
    )
    if args.compile:
        ratio = [e / o for o, e in zip(times["ours"], times["eager"], strict=True)]  # > 1: compiled faster
        low, high = median_interval(ratio)
        row = replace(row, eager_tok_s=tokens / statistics.median(times["eager"]),
                      compile_speedup=statistics.median(ratio), compile_low=low, compile_high=high,
                      compile_s=warm["ours"][0] - warm["ours"][-1])
    return row, peak


def format_table(rows: list[Row], peak: float, sheet_peak: float | None) -> str:
    head = ["size", "params", "tokens/step", "course_lib tok/s", "transformers tok/s", "ratio (95% CI)",
            f"MFU vs measured {peak / 1e12:.3g} TFLOP/s"]
    if sheet_peak is not None:
        head.append(f"MFU vs datasheet {sheet_peak / 1e12:.0f} TFLOP/s")
    compiled = rows and rows[0].compile_speedup is not None
    if compiled:
        head += ["course_lib eager tok/s", "compiled/eager (95% CI)", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.size, f"{r.params_m:.2f}M", str(r.tokens_per_step), f"{r.ours_tok_s:,.0f}",
                 f"{r.ref_tok_s:,.0f}", f"{r.ratio:.2f}x ({r.ratio_low:.2f}-{r.ratio_high:.2f})", f"{r.mfu_measured:.1%}"]
        if r.mfu_datasheet is not None:
            cells.append(f"{r.mfu_datasheet:.1%}")
        if compiled:
            cells += [f"{r.eager_tok_s:,.0f}", f"{r.compile_speedup:.2f}x ({r.compile_low:.2f}-{r.compile_high:.2f})",
                      f"{r.compile_s:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated presets from {sorted(PRESETS)} (default: tiny,small on CPU, gpt2 on CUDA)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fast on recent GPUs, slow on most CPUs)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both models, and time an eager copy of course_lib's model alongside "
                        "(compile speed-up, paired, and compile time)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; aot_eager traces without generating code, "
                        "to test the plumbing fast)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default per size)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default per size)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--reps", type=int, default=None,
                   help="timed steps per model, median reported (default 15 on CPU, 20 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    p.add_argument("--min-ratio", type=float, default=None,
                   help="exit non-zero if course_lib is slower than this ratio at any size, "
                        "beyond noise (the whole 95%% interval below it)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible; use --device cpu")
    names = [n.strip() for n in args.sizes.split(",")] if args.sizes else (["gpt2"] if device.type == "cuda" else ["tiny", "small"])
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        p.error(f"unknown size(s) {unknown}; choose from {sorted(PRESETS)}")
    args.size_names = names
    if args.reps is None:
        args.reps = 20 if device.type == "cuda" else 15
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    precision = "bf16" if args.bf16 else "fp32"
    sheet_peak = datasheet_peak_flops(device, precision)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    compiled = f" + compile ({args.compile_backend})" if args.compile else ""
    print(f"torch {torch.__version__} on {where}; {precision}{compiled}; "
          f"median of {args.reps} steps after {args.warmup} warm-up")
    rows, peak = [], 0.0
    for name in args.size_names:
        row, size_peak = bench_size(name, args, device, dtype)
        rows.append(row)
        peak = max(peak, size_peak)
        print(f"  {name}: {row.ours_tok_s:,.0f} vs {row.ref_tok_s:,.0f} tokens/s", flush=True)
    rows = [r.with_mfu(peak, sheet_peak) for r in rows]
    print(format_table(rows, peak, sheet_peak))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "torch": torch.__version__, "device": where, "precision": precision, "compile": args.compile and args.compile_backend,
            "measured_peak_flops": peak, "datasheet_peak_flops": sheet_peak,
            "rows": [asdict(r) for r in rows]}, indent=2))
    if args.min_ratio is not None:
        slow = [r.size for r in rows if r.ratio_high < args.min_ratio]
        if slow:
            print(f"FAIL: course_lib is slower than {args.min_ratio}x the reference at {', '.join(slow)} "
                  "(the whole 95% interval of the paired ratio is below it)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
