"""The CLI under torchrun: DDP and FSDP2, recovery from a killed worker, and two "nodes" on one machine.

Every run trains the nano GPT for a few steps on 2 ranks (gloo, CPU). The uninterrupted
single-node run is the reference: a run that loses a worker and is restarted by torchrun, and a
run spread over two torchrun agents, must both end with bitwise the same parameters. The same
holds with ``--fsdp`` (sharded checkpoints written with torch.distributed.checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from course_lib.checkpoint import latest_checkpoint, load_checkpoint
from course_lib.distributed.faults import maybe_inject_fault

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
TRAIN = ["-m", "course_lib", "train", "--preset", "nano", "--steps", str(STEPS), "--micro-batch", "2",
         "--checkpoint-every", "2", "--eval-every", "0", "--eval-batches", "1", "--device", "cpu",
         "--precision", "fp32", "--no-progress"]
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--monitor-interval=0.2", *options,
            *TRAIN, "--out", str(out)]


@dataclass
class Run:
    """One launched command: its run directory, exit status and output."""

    out: Path
    returncode: int
    text: str

    def check(self) -> str:
        assert self.returncode == 0, f"exit status {self.returncode}\n{self.text[-3000:]}"
        return self.text


def _run_at_once(commands: dict[str, tuple[list[str], Path, dict[str, str]]], logs: Path) -> dict[str, Run]:
    """Start every command at once, each in its own process group, and wait for all of them.

    ``commands`` maps a name to ``(argv, out_dir, extra_env)``. Whatever still runs after
    ``TIMEOUT_S`` is killed (with its whole process group) and reported as failed.
    """
    base_env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, (argv, _, env) in commands.items():
            with open(logs / f"{name}.log", "w") as log:
                procs[name] = subprocess.Popen(argv, cwd=REPO, env={**base_env, **env}, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return {name: Run(out=commands[name][1], returncode=p.returncode, text=(logs / f"{name}.log").read_text())
            for name, p in procs.items()}


def _final_state(out: Path, suffix: str = ".pt") -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"ckpt_{STEPS:08d}{suffix}", f"no final checkpoint in {out}"
    return load_checkpoint(ckpt)["model"]


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _assert_bitwise_equal(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert state.keys() == ref.keys()
    different = [k for k in ref if not torch.equal(state[k], ref[k])]
    assert not different, f"parameters differ from the uninterrupted run: {different}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """All the runs the tests compare, started together (they mostly wait on each other).

    * ``reference``: one uninterrupted 2-process run on one node;
    * ``faulty``: the same, but rank 1 SIGKILLs itself when step 4 starts (the last checkpoint
      is step 2's) and torchrun may restart the workers once;
    * ``fsdp_reference``/``fsdp_faulty``: the first two with ``--fsdp``;
    * ``node0``/``node1``: two torchrun agents, one worker each, meeting at a c10d rendezvous
      on 127.0.0.1. With c10d the agents agree on their order themselves (``--node-rank`` is for
      the static backend); ``is_host`` says which agent hosts the rendezvous store.
    """
    root = tmp_path_factory.mktemp("torchrun")
    single = ["--standalone", "--nproc_per_node=2"]
    port = _free_port()
    node = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id=course-{port}"]
    fault = {"COURSE_FAULT_INJECT_STEP": "4", "COURSE_FAULT_INJECT_RANK": "1"}
    commands = {
        "reference": (_torchrun(root / "reference", *single), root / "reference", {}),
        "faulty": (_torchrun(root / "faulty", *single, "--max-restarts=1"), root / "faulty", fault),
        "node0": (_torchrun(root / "two_nodes", *node, "--rdzv-conf=is_host=1"), root / "two_nodes", {}),
        "node1": (_torchrun(root / "two_nodes", *node, "--rdzv-conf=is_host=0"), root / "two_nodes", {}),
        "fsdp_reference": (_torchrun(root / "fsdp_reference", *single) + ["--fsdp"], root / "fsdp_reference", {}),
        "fsdp_faulty": (_torchrun(root / "fsdp_faulty", *single, "--max-restarts=1") + ["--fsdp"],
                        root / "fsdp_faulty", fault),
    }
    return _run_at_once(commands, root)


def test_fault_injection_fires_only_when_asked(monkeypatch):
    """Every case below must return (a wrong one would SIGKILL the test process itself)."""
    maybe_inject_fault(4, 1)  # nothing asked
    monkeypatch.setenv("COURSE_FAULT_INJECT_STEP", "4")
    maybe_inject_fault(3, 1)  # another step
    maybe_inject_fault(4, 0)  # another rank (the default is rank 1)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    maybe_inject_fault(4, 1)  # already restarted once


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_trains_with_ddp_on_the_right_ranks(runs):
    text = runs["reference"].check()
    for rank in (0, 1):
        assert f"rank {rank} of 2 (local rank {rank})" in text
    assert [s for s, _ in _losses(runs["reference"].out)] == list(range(1, STEPS + 1))


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_bitwise_equal(runs):
    text = runs["faulty"].check()
    assert "exitcode: -9" in text, "the worker was not killed:\n" + text[-3000:]
    assert "resuming from ckpt_00000002.pt (step 2)" in text, text[-3000:]
    _assert_bitwise_equal(_final_state(runs["faulty"].out), _final_state(runs["reference"].out))
    # the metrics were cut back to the checkpoint and continued: each step once, same losses
    assert _losses(runs["faulty"].out) == _losses(runs["reference"].out)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_on_one_machine_match_the_single_node_run(runs):
    texts = [runs["node0"].check(), runs["node1"].check()]
    # one worker per node: global ranks 0 and 1, each with local rank 0 (the GPU index on its node)
    ranks = [[r for r in (0, 1) if f"rank {r} of 2 (local rank 0)" in text] for text in texts]
    assert sorted(ranks) == [[0], [1]], "\n----\n".join(texts)
    _assert_bitwise_equal(_final_state(runs["node0"].out), _final_state(runs["reference"].out))


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_under_torchrun_trains_like_ddp_and_a_killed_worker_resumes_bitwise(runs):
    text = runs["fsdp_faulty"].check()
    runs["fsdp_reference"].check()
    assert "exitcode: -9" in text, "the worker was not killed:\n" + text[-3000:]
    assert "resuming from ckpt_00000002.dcp (step 2)" in text, text[-3000:]
    reference = _final_state(runs["fsdp_reference"].out, ".dcp")
    _assert_bitwise_equal(_final_state(runs["fsdp_faulty"].out, ".dcp"), reference)
    assert _losses(runs["fsdp_faulty"].out) == _losses(runs["fsdp_reference"].out)
    # FSDP2 and DDP train the same model on the same batches: equal up to float summation order
    ddp = _losses(runs["reference"].out)
    fsdp = _losses(runs["fsdp_reference"].out)
    assert [s for s, _ in fsdp] == [s for s, _ in ddp]
    assert [x for _, x in fsdp] == pytest.approx([x for _, x in ddp], rel=1e-5)
    ddp_state = _final_state(runs["reference"].out)
    for name, p in ddp_state.items():
        torch.testing.assert_close(reference[name], p, rtol=1e-4, atol=1e-5, msg=name)
