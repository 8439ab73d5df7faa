"""Small pieces the training, train-state and parallelism tests share (importable by spawned ranks)."""

import torch

from course_lib.model import GPT, GPTConfig

V = 40


def tiny_model(seed=0, dropout=0.0):
    """A 2-block, 32-wide GPT over a vocabulary of ``V``, seeded."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def learnable_stream(n=2000, seed=0):
    """Token ids that mostly count up modulo ``V`` (80%), the rest random: a model can learn it."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % V
    return torch.where(torch.rand(n, generator=g) < 0.8, base, torch.randint(0, V, (n,), generator=g)).long()


class CrashAt:
    """A logger that interrupts the run (as a kill would) when it sees ``step``."""

    def __init__(self, step):
        self.step = step

    def log(self, metrics, step):
        if step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {step}")


class Interleave:
    """One process seeing both ranks' batches: rank 0's, then rank 1's, then rank 0's, ..."""

    def __init__(self, streams):
        self.streams = streams

    def __iter__(self):
        while True:
            for s in self.streams:
                yield next(s)
