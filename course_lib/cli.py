"""Command line: ``python -m course_lib train|doctor|bench``.

``python -m course_lib train --corpus shakespeare --preset tiny --steps 200 --out runs/demo``
trains the tiny GPT on a bundled corpus with nothing else to set up. The same command under
``torchrun --nproc_per_node=N -m course_lib train ...`` trains with DDP (each rank draws its
own batches; ``--micro-batch`` is per rank), or with FSDP2 given ``--fsdp`` (weights, gradients
and optimizer state sharded over the ranks; checkpoints are ``ckpt_XXXXXXXX.dcp`` directories
written by every rank with ``torch.distributed.checkpoint``). ``--compile`` compiles the model
once with ``torch.compile``.

The run directory ``--out`` receives:

* ``metrics.jsonl``: one JSON object per logged step with ``step``, ``loss`` (token-weighted
  global mean over the step's window), ``lr`` (used for that step), ``grad_norm`` (global,
  before clipping), ``tokens_per_s`` (all ranks, since the previous record), ``tokens`` (real
  tokens in the step); ``val_loss`` at eval steps and at the end; ``mfu`` when the device's
  peak is known (``--peak-flops`` or a known GPU); ``loss_scale`` with fp16.
* ``ckpt_XXXXXXXX.pt``: the full training state every ``--checkpoint-every`` steps and at the
  end (the newest ``--keep-checkpoints`` are kept).
* ``config.json`` (flags, model config, training config, tokenizer) and ``tokenizer.json``.

``--resume`` continues from the newest checkpoint: rerun the *same* command with ``--resume``
after a crash or a kill, at any moment, and the losses logged after the checkpoint equal those
of an uninterrupted run (``metrics.jsonl`` is cut back to the checkpoint's step first). Under
``torchrun --max-restarts=K`` the restarted workers resume by themselves (torchrun sets
``TORCHELASTIC_RESTART_COUNT``), so one command survives a killed worker.

Wrong flags and impossible settings exit with status 2 and a one-line reason; set
``COURSE_LIB_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Flags that must match on --resume: the CLI's own, plus every TrainConfig setting in
# course_lib.train_state.RESUME_KEYS that is a flag (betas and eps are not).
CLI_RESUME_FLAGS = ("corpus", "preset", "micro_batch", "checkpointing", "lora_rank", "lora_alpha", "init_from",
                    "eval_every", "eval_batches", "fsdp")


class CLIError(Exception):
    """A problem with the command's flags or files, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m course_lib`` (see the module docstring)."""
    from course_lib.data import CORPORA
    from course_lib.model import PRESETS

    parser = _Parser(prog="python -m course_lib", description="The LLM-training course's command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,doctor,bench}")

    sub.add_parser("doctor", help="check the environment (one [OK]/[FAIL] line per check)")

    b = sub.add_parser("bench", help="measure the training loop's throughput and MFU on this machine",
                       description="Time a few training steps per precision; print tokens/s and MFU.")
    b.add_argument("--preset", choices=list(PRESETS), default="tiny")
    b.add_argument("--micro-batch", type=_int_at_least(1), default=8)
    b.add_argument("--steps", type=_int_at_least(2), default=10, help="timed steps after one warm-up step")
    b.add_argument("--precision", choices=["fp32", "bf16", "fp16"], nargs="+", default=None,
                   help="precisions to compare (default: every one this device supports)")
    b.add_argument("--device", default=None)

    t = sub.add_parser("train", help="train a GPT on a bundled corpus",
                       description="Train a GPT on a bundled corpus; writes metrics.jsonl and checkpoints to --out.")
    t.add_argument("--corpus", choices=CORPORA, default="shakespeare", help="bundled corpus (default shakespeare)")
    t.add_argument("--preset", choices=list(PRESETS), default="tiny",
                   help="model size (default tiny); ignored with --init-from, which brings its own shape")
    t.add_argument("--steps", type=_int_at_least(1), default=200, help="optimizer steps (default 200)")
    t.add_argument("--out", required=True, help="run directory for metrics.jsonl, checkpoints and config.json")
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on GPUs that support it, else fp32")
    t.add_argument("--grad-accum", type=_int_at_least(1), default=1, help="micro-batches per optimizer step")
    t.add_argument("--micro-batch", type=_int_at_least(1), default=16, help="sequences per micro-batch (per rank)")
    t.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of every block")
    t.add_argument("--lora-rank", type=_int_at_least(1), default=None, help="train LoRA adapters of this rank (needs --init-from)")
    t.add_argument("--lora-alpha", type=_positive_float, default=None, help="LoRA alpha (default 2 * rank)")
    t.add_argument("--init-from", default=None,
                   help="start from weights: a bundled pretrained name (shakespeare_tiny), a run directory, "
                        "a ckpt_*.pt file or a .safetensors file")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--checkpoint-every", type=_int_at_least(0), default=50, help="steps between checkpoints (0 = only at the end)")
    t.add_argument("--keep-checkpoints", type=_int_at_least(1), default=2, help="how many checkpoints to keep")
    t.add_argument("--eval-every", type=_int_at_least(0), default=100, help="steps between evaluations (0 = only at the end)")
    t.add_argument("--eval-batches", type=_int_at_least(1), default=10, help="validation batches per evaluation")
    t.add_argument("--log-every", type=_int_at_least(1), default=None, help="steps between metric records (default 1, or 10 past 1000 steps)")
    t.add_argument("--seed", type=_int_at_least(0), default=0)
    t.add_argument("--wandb", choices=["offline", "online", "disabled"], default="disabled",
                   help="also log to Weights & Biases: offline (sync later with `wandb sync`), online (needs `wandb login`), "
                        "or disabled (default; metrics.jsonl is always written)")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    t.add_argument("--warmup-steps", type=_int_at_least(0), default=None, help="linear warmup (default steps // 20, at most 100)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--clip-grad-norm", type=_positive_float, default=1.0)
    t.add_argument("--peak-flops", type=_positive_float, default=None, help="device peak FLOP/s, to log MFU")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state over the ranks with FSDP2 "
                        "(default: DDP, a full copy per rank); checkpoints become ckpt_*.dcp directories")
    t.add_argument("--compile", action="store_true", help="compile the model once with torch.compile (off by default)")
    return parser


# ----------------------------------------------------------------------------- helpers


def _check_device(name: str | None):
    import torch

    from course_lib.device import pick_device

    if name is None:
        return pick_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def _validate(args: argparse.Namespace) -> None:
    """Checks that need no model, data or process group (so every rank fails the same way, early)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a directory; choose another path")
    if args.lora_rank is not None and args.init_from is None:
        raise CLIError("--lora-rank needs --init-from: LoRA adapts pretrained weights (try --init-from shakespeare_tiny)")
    if args.lora_alpha is not None and args.lora_rank is None:
        raise CLIError("--lora-alpha needs --lora-rank")
    if args.warmup_steps is not None and args.warmup_steps > args.steps:
        raise CLIError(f"--warmup-steps {args.warmup_steps} exceeds --steps {args.steps}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise CLIError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.weight_decay < 0:
        raise CLIError(f"--weight-decay must be >= 0, got {args.weight_decay}")


def _decide_resume(args: argparse.Namespace, out: Path) -> bool:
    """Whether to continue the run in ``out`` (run on rank 0 only: every rank follows its answer)."""
    from course_lib.checkpoint import latest_checkpoint

    resume = args.resume
    existing = latest_checkpoint(out)
    if existing is not None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = True  # torchrun restarted the workers after a failure: continue the run
    if resume and existing is None:
        raise CLIError(f"--resume: no checkpoint in {out} (the run stopped before its first checkpoint, "
                       "or it is another directory); start it again without --resume")
    if not resume and existing is not None:
        raise CLIError(f"{out} already holds a run ({existing.name}); add --resume to continue it or choose another --out")
    if resume:
        _check_resume_flags(args, out)
    return resume


def _on_rank_0(world: int, device, decide):
    """``decide()`` evaluated on rank 0 only; its result (or its CLIError) on every rank.

    Each rank deciding for itself from what it sees in ``--out`` could disagree (another
    machine's disk, or a checkpoint written between two ranks' looks) and hang the run.
    """
    from course_lib.distributed.launch import get_rank
    from course_lib.parallel import Parallelism

    answer: tuple[str, object] = ("ok", None)
    if get_rank() == 0:
        try:
            answer = ("ok", decide())
        except CLIError as e:
            answer = ("error", str(e))
    if world > 1:
        import torch.distributed as dist

        answer = Parallelism(device, dist.group.WORLD).broadcast_object(answer)
    if answer[0] == "error":
        raise CLIError(answer[1])
    return answer[1]


def _load_init(spec: str):
    """``(model, tokenizer)`` from a pretrained name, run directory, checkpoint or safetensors file."""
    from course_lib.checkpoint import latest_checkpoint, load_checkpoint
    from course_lib.data import tokenizer_from_dict
    from course_lib.model import GPT, GPTConfig
    from course_lib.pretrained import PRETRAINED_DIR, load_pretrained

    path = Path(spec)
    if not path.exists() and (PRETRAINED_DIR / f"{spec}.safetensors").is_file():
        return load_pretrained(spec)
    if path.suffix == ".safetensors" and path.is_file():
        return load_pretrained(path.stem, directory=path.parent)
    if path.is_dir() and path.suffix != ".dcp":  # a run directory (a .dcp directory is one sharded checkpoint)
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise CLIError(f"--init-from {spec}: no ckpt_*.pt in that directory")
        path = ckpt
    if not path.exists():
        raise CLIError(f"--init-from {spec}: not a pretrained name, directory or file "
                       f"(bundled: {sorted(p.stem for p in PRETRAINED_DIR.glob('*.safetensors')) or 'none'})")
    state = load_checkpoint(path)
    extra = state.get("extra", {})
    if "model_config" not in extra or "tokenizer" not in extra:
        raise CLIError(f"--init-from {path}: the checkpoint does not say how to build its model (no model_config)")
    if extra.get("lora"):
        raise CLIError(f"--init-from {path}: it holds LoRA adapters; merge them first or start from its base model")
    model = GPT(GPTConfig(**extra["model_config"]))
    model.load_state_dict(state["model"])
    return model, tokenizer_from_dict(extra["tokenizer"])


def _shared_tokenizer():
    """One character vocabulary for every bundled corpus, so a model trained on one fine-tunes on another."""
    from course_lib.data import CORPORA, CharTokenizer, load_corpus

    return CharTokenizer.from_text("".join(load_corpus(name) for name in CORPORA))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (the interrupted run got further than its checkpoint)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError):
            break  # a half-written last line from the kill
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    os.replace(tmp, path)


def _check_resume_flags(args: argparse.Namespace, out: Path) -> None:
    saved_path = out / "config.json"
    if not saved_path.is_file():
        raise CLIError(f"--resume: {saved_path} is missing, so the run's settings are unknown")
    from course_lib.train_state import RESUME_KEYS

    saved = json.loads(saved_path.read_text())["args"]
    now = vars(args)
    keys = (*CLI_RESUME_FLAGS, *(k for k in RESUME_KEYS if k in now))
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in keys if saved.get(k) != now[k]]
    if changed:
        raise CLIError("--resume with different settings (" + "; ".join(changed) + "): rerun the original command "
                       "with --resume, or start a new run in another --out")


# ----------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    """The ``train`` command (see the module docstring)."""
    _validate(args)
    from course_lib.checkpoint import checkpoint_step, latest_checkpoint
    from course_lib.device import best_precision, supported_precisions
    from course_lib.distributed.launch import cleanup, init_from_env
    from course_lib.model import GPT, GPTConfig

    device = _check_device(args.device)
    args.precision = args.precision or best_precision(device)
    if args.precision not in supported_precisions(device):
        raise CLIError(f"--precision {args.precision} is not supported on {device} "
                       f"(supported: {', '.join(supported_precisions(device))})")
    if args.compile:
        from course_lib.training import compiler_problem

        if (problem := compiler_problem()) is not None:
            raise CLIError(f"--compile: torch.compile does not work here ({problem}); run without --compile")
    if args.log_every is None:
        args.log_every = 1 if args.steps <= 1000 else 10
    if args.warmup_steps is None:
        args.warmup_steps = min(100, args.steps // 20)
    if args.lora_rank is not None and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    out = Path(args.out)

    rank, local_rank, world = init_from_env(device=device)
    if world > 1 and device.type == "cuda":
        import torch

        device = torch.device("cuda", local_rank)  # one GPU per process, picked by LOCAL_RANK
    if world > 1:
        print(f"rank {rank} of {world} (local rank {local_rank}) on {device}", flush=True)
    try:
        if args.fsdp and world == 1:
            raise CLIError("--fsdp shards the model over the processes torchrun starts: run it under "
                           "torchrun --nproc_per_node=N (one process trains unsharded without --fsdp)")
        args.resume = _on_rank_0(world, device, lambda: _decide_resume(args, out))
        from course_lib.data import RandomWindowBatches, encode_corpus, eval_windows, train_val_split
        from course_lib.training import TrainConfig, seed_everything, train

        seed_everything(args.seed)  # the same initial weights on every rank and every attempt
        init = _load_init(args.init_from) if args.init_from is not None else None
        if args.resume:
            from course_lib.data import load_tokenizer
            tokenizer = load_tokenizer(out / "tokenizer.json")
        else:
            tokenizer = init[1] if init else _shared_tokenizer()
        model = init[0] if init else GPT(GPTConfig.from_preset(args.preset, tokenizer.vocab_size))
        block = model.config.block_size
        try:
            tokens, _ = encode_corpus(args.corpus, tokenizer)
        except ValueError as e:
            raise CLIError(f"--corpus {args.corpus} does not fit the model's tokenizer: {e}") from None
        train_tokens, val_tokens = train_val_split(tokens, 0.1, block)
        batches = RandomWindowBatches(train_tokens, block, args.micro_batch, seed=args.seed * world + rank)
        eval_data = eval_windows(val_tokens, block, args.micro_batch, max_batches=args.eval_batches)

        if args.checkpointing:
            from course_lib.memory import enable_gradient_checkpointing
            enable_gradient_checkpointing(model)
        if args.lora_rank is not None:
            from course_lib.lora import apply_lora, mark_only_lora_trainable
            apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
            mark_only_lora_trainable(model)
        model.to(device)
        trained = model
        if world > 1 and args.fsdp:
            from course_lib.parallel import apply_fsdp
            trained = apply_fsdp(model)  # every rank built the same weights (same seed)
        elif world > 1:
            from course_lib.parallel import apply_ddp
            trained = apply_ddp(model, device)

        peak = args.peak_flops
        if peak is None:
            from course_lib.monitoring import datasheet_peak_flops
            peak = datasheet_peak_flops(device, args.precision)
        config = TrainConfig(
            steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
            min_lr_ratio=args.min_lr_ratio, grad_accum=args.grad_accum, clip_grad_norm=args.clip_grad_norm,
            precision=args.precision, eval_every=args.eval_every, eval_batches=args.eval_batches,
            checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
            log_every=args.log_every, out_dir=str(out), seed=args.seed, peak_flops=peak,
            progress=not args.no_progress, compile=args.compile,
        )
        extra = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(),
                 "lora": None if args.lora_rank is None else {"rank": args.lora_rank, "alpha": args.lora_alpha}}

        loggers = []
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if args.resume:
                ckpt = latest_checkpoint(out)
                step = checkpoint_step(ckpt)
                print(f"resuming from {ckpt.name} (step {step})", flush=True)
                _truncate_metrics(out / "metrics.jsonl", step)
            else:
                (out / "metrics.jsonl").unlink(missing_ok=True)
                summary = {"args": vars(args), "model": model.config.to_dict(), "train": config.to_dict(),
                           "tokenizer": tokenizer.to_dict(), "world_size": world, "command": _command()}
                (out / "config.json").write_text(json.dumps(summary, indent=2) + "\n")
                tokenizer.save(out / "tokenizer.json")
            from course_lib.monitoring import JSONLLogger
            loggers.append(JSONLLogger(out / "metrics.jsonl"))
            if args.wandb != "disabled":
                from course_lib.monitoring import WandbLogger
                loggers.append(WandbLogger(project="llm-training-course", mode=args.wandb, dir=out, name=out.name,
                                           config={"args": vars(args), "model": model.config.to_dict()}))
        started = time.perf_counter()
        try:
            result = train(trained, batches, config, eval_data=eval_data, loggers=loggers, device=device,
                           resume=args.resume, extra_state=extra)
        finally:
            for logger in loggers:
                logger.close()
        if rank == 0:
            last = result.history[-1] if result.history else {}
            print(f"done: step {result.step}/{args.steps}, loss {last.get('loss', float('nan')):.4f}, "
                  f"val_loss {result.val_loss if result.val_loss is None else round(result.val_loss, 4)}, "
                  f"{time.perf_counter() - started:.1f} s, checkpoint {result.checkpoint}", flush=True)
        return 0
    finally:
        cleanup()


def _command() -> str:
    return " ".join(["python -m course_lib", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("__main__.py") \
        else " ".join(sys.argv)


def cmd_doctor(args: argparse.Namespace) -> int:
    """The ``doctor`` command: non-zero exit status when a check failed."""
    from course_lib.device import doctor

    return 0 if doctor() else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """The ``bench`` command: tokens/s and MFU of :func:`course_lib.training.train` per precision.

    MFU is measured against this device's best matrix-multiply rate
    (:func:`course_lib.monitoring.measure_matmul_flops`) in the precision's dtype or in fp32,
    whichever is higher (CPUs without 16-bit units emulate bf16/fp16 far below their fp32 rate).
    The peak is measured before and after each run and the best is kept, so a neighbour busy
    during one measurement cannot push MFU above 100%.
    """
    import torch

    from course_lib.data import RandomWindowBatches, encode_corpus
    from course_lib.device import supported_precisions
    from course_lib.model import GPT, GPTConfig
    from course_lib.monitoring import measure_matmul_flops
    from course_lib.precision import DTYPES
    from course_lib.training import TrainConfig, train

    device = _check_device(args.device)
    precisions = args.precision or supported_precisions(device)
    unsupported = [p for p in precisions if p not in supported_precisions(device)]
    if unsupported:
        raise CLIError(f"--precision {' '.join(unsupported)} not supported on {device}")
    tokenizer = _shared_tokenizer()
    config = GPTConfig.from_preset(args.preset, tokenizer.vocab_size)
    tokens, _ = encode_corpus("shakespeare", tokenizer)
    print(f"{args.preset}: {config.n_layer} layers x {config.n_embd} wide, micro-batch {args.micro_batch} x "
          f"{config.block_size} tokens, {args.steps} timed steps on {device}")
    print(f"{'precision':>9s} {'tokens/s':>10s} {'peak GFLOP/s':>13s} {'MFU':>6s}")

    def best_matmul(precision: str) -> float:
        return max(measure_matmul_flops(device, DTYPES[precision]), measure_matmul_flops(device, torch.float32))

    for precision in precisions:
        model = GPT(config).to(device)
        peak = best_matmul(precision)
        result = train(model, RandomWindowBatches(tokens, config.block_size, args.micro_batch, seed=0),
                       TrainConfig(steps=args.steps + 1, precision=precision, peak_flops=peak, progress=False),
                       device=device)
        rates = result.values("tokens_per_s")[1:]  # the first step pays for warm-up
        rate = sorted(rates)[len(rates) // 2]
        peak = max(peak, best_matmul(precision))
        utilisation = rate * model.flops_per_token() / peak
        print(f"{precision:>9s} {rate:10,.0f} {peak / 1e9:13,.1f} {utilisation:6.1%}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m course_lib``; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler = {"train": cmd_train, "doctor": cmd_doctor, "bench": cmd_bench}[args.command]
    if os.environ.get("COURSE_LIB_DEBUG"):
        return handler(args)
    from course_lib.checkpoint import CheckpointError

    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"interrupted; continue with the same command plus --resume (out: {getattr(args, 'out', '?')})",
              file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
