"""LoRA against full fine-tuning of the course's pretrained Shakespeare model on ``python_docs``.

    python benchmarks/lora_vs_full.py                # CPU: 100 steps each, batch 16 x 128
    python benchmarks/lora_vs_full.py --steps 500    # a longer run (GPU)

Every setting starts from the same pretrained weights (``course_lib.pretrained.load_pretrained``)
and trains for the same number of steps on the same batches with ``course_lib.training.train``.
The table gives trainable parameters, the AdamW state actually allocated (measured after a step),
median time per step, and the validation loss on both corpora before and after: the new domain should
improve, and the old one shows how much each method forgets.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from course_lib.data import RandomWindowBatches, encode_corpus, eval_windows, train_val_split
from course_lib.device import pick_device
from course_lib.lora import apply_lora, count_trainable_parameters
from course_lib.memory import state_bytes
from course_lib.pretrained import load_pretrained
from course_lib.training import TrainConfig, evaluate, make_optimizer, train

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")


def optimizer_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor], config: TrainConfig) -> int:
    """AdamW state bytes after one real step (on a copy, so the model is untouched)."""
    model = copy.deepcopy(model)
    opt = make_optimizer(model, config)
    model(batch["input_ids"], labels=batch["labels"]).loss.backward()
    opt.step()
    return state_bytes(model, opt)["optimizer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--full-lr", type=float, default=1e-3)
    parser.add_argument("--lora-lr", type=float, default=5e-3)
    parser.add_argument("--eval-batches", type=int, default=10)
    parser.add_argument("--pretrained-dir", default=None, help="default: the committed course_lib/pretrained")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))

    base, tokenizer = load_pretrained(directory=args.pretrained_dir, device=device)
    T = base.config.block_size
    splits = {name: train_val_split(encode_corpus(name, tokenizer)[0], 0.1, T) for name in ("shakespeare", "python_docs")}
    val = {name: [{k: v.to(device) for k, v in b.items()} for b in eval_windows(s[1], T, args.batch, args.eval_batches)]
           for name, s in splits.items()}

    def losses(model: torch.nn.Module) -> dict[str, float]:
        return {name: evaluate(model, batches, device=device) for name, batches in val.items()}

    before = losses(base)
    settings = [("full fine-tuning", None)] + [(f"LoRA rank {r} (all block linears)", r) for r in args.ranks]
    print(f"pretrained {base.num_params():,} params; fine-tune on python_docs, {args.steps} steps of "
          f"{args.batch} x {T} characters, device {device}")
    print(f"before: val loss shakespeare {before['shakespeare']:.3f}, python_docs {before['python_docs']:.3f}")
    print("| setting | trainable params | AdamW state | s/step | val python_docs before -> after "
          "| val shakespeare before -> after |")
    print("|---|---|---|---|---|---|")
    for name, rank in settings:
        model = copy.deepcopy(base).train()
        if rank:
            apply_lora(model, rank=rank, alpha=2 * rank, target_modules=BLOCK_LINEARS)
        config = TrainConfig(steps=args.steps, lr=args.lora_lr if rank else args.full_lr, warmup_steps=args.steps // 10,
                             weight_decay=0.0 if rank else 0.1, progress=False, seed=0)
        batches = RandomWindowBatches(splits["python_docs"][0], T, args.batch, seed=0)
        opt_bytes = optimizer_bytes(model, {k: v.to(device) for k, v in batches.batch(0).items()}, config)
        result = train(model, batches, config, device=device)
        # the median over steps of the logged throughput: robust to bursts of load on a shared machine
        per_step = args.batch * T / statistics.median(result.values("tokens_per_s"))
        after = losses(model)
        print(f"| {name} | {count_trainable_parameters(model):,} | {opt_bytes / 2**20:.2f} MiB | {per_step:.3f} "
              f"| {before['python_docs']:.3f} -> {after['python_docs']:.3f} "
              f"| {before['shakespeare']:.3f} -> {after['shakespeare']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
