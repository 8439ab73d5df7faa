"""train(..., optimizer=...) uses the optimizer it is given (muP groups, Muon), under the schedule."""

import torch

from course_lib.model import GPT, GPTConfig
from course_lib.muon import Muon, muon_param_groups
from course_lib.schedulers import warmup_stable_decay, wsd_lr_at
from course_lib.training import TrainConfig, train


def _setup():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 20, (2, 8), generator=g)
        batches.append({"input_ids": ids, "labels": ids.roll(-1, 1)})
    return model, batches


def test_a_given_scheduler_replaces_warmup_cosine():
    model, batches = _setup()
    config = TrainConfig(steps=4, lr=0.5, clip_grad_norm=None, progress=False)
    result = train(model, batches, config,
                   scheduler=lambda o: warmup_stable_decay(o, warmup_steps=1, decay_start=2, decay_steps=2))
    expected = [wsd_lr_at(s, base_lr=0.5, warmup_steps=1, decay_start=2, decay_steps=2) for s in range(4)]
    assert result.values("lr") == expected == [0.0, 0.5, 0.5, 0.25]


def test_muon_trains_through_train():
    model, batches = _setup()
    result = train(model, batches * 5, TrainConfig(steps=20, lr=1.0, clip_grad_norm=None, progress=False),
                   optimizer=lambda m: Muon(muon_param_groups(m, lr=0.02, adam_lr=3e-3)))
    losses = result.values("loss")
    assert losses[-1] < losses[0] - 0.1
    assert result.values("lr")[0] == 0.02  # the schedule scales Muon's own learning rate, not config.lr
