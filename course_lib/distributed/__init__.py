"""Distributed training on ``torch.distributed``: launch, data, pipeline, tensor and sharded parallelism.

Every strategy runs on a CPU laptop (gloo, several processes started by :func:`spawn`) and,
unchanged, on GPUs (nccl) or several machines (torchrun + :func:`init_from_env`).
"""

from course_lib.distributed.launch import (
    WorkerFailed,
    cleanup,
    get_rank,
    get_world_size,
    init_from_env,
    is_distributed,
    is_main_process,
    rank_device,
    spawn,
)

__all__ = [
    "WorkerFailed",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "rank_device",
    "spawn",
]
