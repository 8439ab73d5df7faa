"""train(..., optimizer=...) uses the optimizer it is given (muP groups, Muon), under the schedule."""

import torch

from course_lib.model import GPT, GPTConfig
from course_lib.muon import Muon, muon_param_groups
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


def test_a_given_optimizer_factory_is_used_with_the_schedule():
    model, batches = _setup()
    reference = GPT(model.config)
    reference.load_state_dict(model.state_dict())
    config = TrainConfig(steps=4, lr=0.5, warmup_steps=2, clip_grad_norm=None, progress=False)
    result = train(model, batches, config, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
    # the same run by hand: plain SGD, warmup 0 -> 0.25 -> then cosine
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    from course_lib.schedulers import lr_at

    for step, batch in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, base_lr=0.5, warmup_steps=2, total_steps=4, min_lr_ratio=0.1)
        opt.zero_grad()
        reference(batch["input_ids"], labels=batch["labels"]).loss.backward()
        opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert result.values("lr")[:2] == [0.0, 0.25]


def test_muon_trains_through_train():
    model, batches = _setup()
    result = train(model, batches * 5, TrainConfig(steps=20, lr=1.0, clip_grad_norm=None, progress=False),
                   optimizer=lambda m: Muon(muon_param_groups(m, lr=0.02, adam_lr=3e-3)))
    losses = result.values("loss")
    assert losses[-1] < losses[0] - 0.1
    assert result.values("lr")[0] == 0.02  # the schedule scales Muon's own learning rate, not config.lr
