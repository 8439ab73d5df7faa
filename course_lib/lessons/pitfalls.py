"""The tutorial's buggy code, kept so the lessons and tests can show what goes wrong (the Errata).

Never use these: each docstring names the correct function in the mechanism.
"""

from __future__ import annotations


def tutorial_device_ids(n_layers: int, n_devices: int) -> list[int]:
    """The tutorial's placement ``i // (n_layers // n_devices)``, kept to show its bug (Errata 3).

    With 5 layers on 2 devices it returns ``[0, 0, 1, 1, 2]``: device 2 does not exist.
    (With fewer layers than devices it divides by zero.) Use :func:`course_lib.distributed.pipeline.partition_layers`.
    """
    per_device = n_layers // n_devices
    return [i // per_device for i in range(n_layers)]


def tutorial_stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """The tutorial's pipeline split, kept to show its bug (Errata 4): it drops the remainder.

    ``n_layers // n_stages`` layers per stage: 5 layers on 2 stages keeps layers 0-3 and
    silently loses layer 4. Use :func:`course_lib.distributed.pipeline.partition_layers`.
    """
    per_stage = n_layers // n_stages
    return [range(s * per_stage, min((s + 1) * per_stage, n_layers)) for s in range(n_stages)]

