"""The tutorial's learning-rate scheduler, reproduced exactly (Errata 8), for lesson 06's pitfalls.

DO NOT USE. Its real bugs: it has no ``state_dict`` (the tutorial's own checkpoint code calls
``scheduler.state_dict()``); its ``step()`` is called *after* the optimizer's, so the first
update runs at the optimizer's full base learning rate and warmup starts one step late; past
``total_steps`` the cosine climbs back up to the base rate. It does have a floor
(``min_lr_ratio``), and ``warmup_steps=0`` does not divide by zero in it. Use
:func:`course_lib.schedulers.warmup_cosine`.
"""

import math


class WarmupCosineScheduler:
    def __init__(self, optimizer, warmup_steps, total_steps, min_lr_ratio=0.1):
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.base_lr = optimizer.param_groups[0]['lr']
        self.step_count = 0

    def step(self):
        """Update learning rate"""
        self.step_count += 1

        if self.step_count <= self.warmup_steps:
            # Warmup phase
            lr = self.base_lr * (self.step_count / self.warmup_steps)
        else:
            # Cosine annealing phase
            progress = (self.step_count - self.warmup_steps) / (self.total_steps - self.warmup_steps)
            lr = self.base_lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

        # Update learning rate
        for param_group in self.optimizer.param_groups:
            param_group['lr'] = lr

        return lr
