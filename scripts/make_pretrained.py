"""Build the course's pretrained model: ``make pretrained`` (CPU, about 10 minutes on 2 cores).

Trains the ``tiny`` GPT on the bundled ``shakespeare`` corpus through the course's own CLI
(``python -m course_lib train``), then exports the final weights as
``course_lib/pretrained/shakespeare_tiny.safetensors`` plus ``shakespeare_tiny.json`` (model
config, tokenizer, validation loss, training time and the exact command). Later lessons load it
with ``course_lib.pretrained.load_pretrained()``.

The tokenizer covers the characters of *every* bundled corpus, so the model can be fine-tuned
on ``python_docs`` (the domain-shift lessons) without unknown characters.

Usage: ``python scripts/make_pretrained.py [--steps N] [--out runs/pretrain]``. Each build starts
a fresh run directory; an interrupted build continues with ``--resume`` instead.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from course_lib import cli
from course_lib.checkpoint import latest_checkpoint, load_checkpoint
from course_lib.data import tokenizer_from_dict
from course_lib.model import GPT, GPTConfig
from course_lib.monitoring import read_jsonl
from course_lib.pretrained import PRETRAINED_DIR, export_pretrained

NAME = "shakespeare_tiny"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default="runs/pretrain", help="run directory (checkpoints, metrics.jsonl)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted build")
    args = parser.parse_args()

    train_args = ["train", "--corpus", "shakespeare", "--preset", "tiny", "--steps", str(args.steps),
                  "--micro-batch", "16", "--lr", "2e-3", "--eval-every", "250", "--eval-batches", "20",
                  "--checkpoint-every", "100", "--log-every", "10", "--seed", "0", "--device", "cpu",
                  "--out", args.out]
    if not args.resume and Path(args.out).exists():
        shutil.rmtree(args.out)  # a previous build's run directory: start again from scratch
    command = "python -m course_lib " + " ".join(train_args)
    print(command, flush=True)
    start = time.perf_counter()
    status = cli.main(train_args + (["--resume"] if args.resume else []))
    elapsed = time.perf_counter() - start
    if status != 0:
        return status

    state = load_checkpoint(latest_checkpoint(args.out))
    extra = state["extra"]
    model = GPT(GPTConfig(**extra["model_config"]))
    model.load_state_dict(state["model"])
    records = read_jsonl(Path(args.out) / "metrics.jsonl")
    val = [r["val_loss"] for r in records if "val_loss" in r]
    path = export_pretrained(
        model, tokenizer_from_dict(extra["tokenizer"]), PRETRAINED_DIR, NAME,
        val_loss=val[-1], train_loss=records[-1]["loss"], steps=int(state["step"]),
        train_time_s=round(elapsed, 1), trained_on=f"{platform.machine()} CPU, torch {torch.__version__}, "
                                                   f"{torch.get_num_threads()} threads",
        corpus="shakespeare", val_fraction=0.1, command=command,
        regenerate="make pretrained  (or: python scripts/make_pretrained.py)",
    )
    print(json.dumps({"weights": str(path), "val_loss": val[-1], "train_time_s": round(elapsed, 1),
                      "size_mb": round(path.stat().st_size / 2**20, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
