"""Checkpoints: atomic writes, safe loads, RNG capture, pruning, pretrained export."""

import collections
import dataclasses
import enum
import io
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib import checkpoint as ck


class _Evil:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_save_and_load_round_trip(tmp_path):
    state = {"w": torch.randn(3, 4), "step": 7, "config": {"lr": 1e-3, "betas": [0.9, 0.95]}, "name": "x"}
    path = ck.save_checkpoint(tmp_path / "c.pt", **state)
    loaded = ck.load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7 and loaded["config"] == state["config"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


@pytest.mark.parametrize("fail_at", ["replace", "write"])
def test_crash_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "ckpt.pt"
    ck.save_checkpoint(path, w=torch.ones(1000), step=1)
    good = path.read_bytes()

    if fail_at == "replace":
        def boom(*args, **kwargs):
            raise OSError("simulated crash before the rename")
        monkeypatch.setattr(ck.os, "replace", boom)
    else:
        def half_write(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 half a zip file")  # some bytes reach the disk, then the crash
            raise KeyboardInterrupt("simulated kill mid-write")
        monkeypatch.setattr(ck.torch, "save", half_write)

    with pytest.raises((OSError, KeyboardInterrupt)):
        ck.save_checkpoint(path, w=torch.zeros(1000), step=2)
    monkeypatch.undo()
    assert path.read_bytes() == good
    loaded = ck.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_writing_in_place_would_have_lost_the_checkpoint(tmp_path):
    """The failure mode the atomic write prevents (Errata 12), shown with a truncated file."""
    path = tmp_path / "ckpt.pt"
    ck.save_checkpoint(path, w=torch.ones(1000), step=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a crash during an in-place write leaves
    with pytest.raises(ck.CheckpointError, match="ckpt.pt"):
        ck.load_checkpoint(path)


def test_garbage_and_missing_files_give_clear_errors(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ck.CheckpointError, match="garbage.pt"):
        ck.load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        ck.load_checkpoint(tmp_path / "nothing.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": {"w": torch.ones(2)}, "config": _Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(ck.UntrustedCheckpointError, match="evil.pt"):
        ck.load_checkpoint(path)
    assert not marker.exists()
    # the payload is live: a plain unpickle does run it (so the check above could fail)
    other = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Evil(other)))
    assert other.exists()


def test_rng_state_round_trip_through_a_safe_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    ck.save_checkpoint(tmp_path / "rng.pt", rng=ck.rng_state())

    def draw():
        return random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()

    expected = draw()
    draw()  # move every generator on
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draw() == expected


def test_latest_and_prune(tmp_path):
    assert ck.latest_checkpoint(tmp_path) is None
    assert ck.latest_checkpoint(tmp_path / "missing") is None
    for step in (5, 100, 20):
        ck.save_checkpoint(ck.checkpoint_path(tmp_path, step), step=step)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / ".ckpt_00000200.pt.x1y2.tmp").write_bytes(b"half")  # a writer killed mid-save
    assert ck.latest_checkpoint(tmp_path).name == "ckpt_00000100.pt"
    removed = ck.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["ckpt_00000005.pt", ".ckpt_00000200.pt.x1y2.tmp"]
    assert (tmp_path / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_00000020.pt", "ckpt_00000100.pt"]
    with pytest.raises(ValueError, match="keep"):
        ck.prune_checkpoints(tmp_path, keep=0)




@dataclasses.dataclass
class _Config:
    lr: float = 1e-3


class _Colour(enum.Enum):
    RED = 1


_Pair = collections.namedtuple("_Pair", "a b")

# What a training loop might try to save, next to what load_checkpoint must accept.
_VALUES = {
    "int": 3, "float": 1.5, "nan": float("nan"), "bool": True, "none": None, "str": "s", "bytes": b"x",
    "complex": 1j, "list": [1, 2.0], "tuple": (1, "a"), "dict": {"a": 1}, "int_keys": {1: 2}, "set": {1, 2},
    "ordered_dict": collections.OrderedDict(a=1), "counter": collections.Counter("aab"),
    "tensor": torch.ones(2), "parameter": torch.nn.Parameter(torch.ones(2)), "bf16": torch.ones(2, dtype=torch.bfloat16),
    "size": torch.Size([2, 3]), "dtype": torch.float16, "device": torch.device("cpu"),
    "rng": torch.get_rng_state(), "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1).state_dict(),
    "dataclass": _Config(), "enum": _Colour.RED, "namedtuple": _Pair(1, 2), "path": Path("runs/x"),
    "numpy_float": np.float64(1.0), "numpy_int": np.int64(2), "numpy_array": np.ones(2),
    "function": math.sqrt, "module": torch.nn.Linear(1, 1), "frozenset": frozenset([1]),
    "defaultdict": collections.defaultdict(int), "nested": {"ok": [1, {"deep": (2, _Config())}]},
}


def _torch_loads(value) -> bool:
    """The reference: does torch.load(weights_only=True) rebuild ``{"x": value}``?"""
    buffer = io.BytesIO()
    torch.save({"x": value}, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(_VALUES))
def test_save_refuses_exactly_what_load_refuses(tmp_path, name):
    value = _VALUES[name]
    path = tmp_path / "c.pt"
    if _torch_loads(value):
        ck.save_checkpoint(path, x=value)
        ck.load_checkpoint(path)
        return
    with pytest.raises(ck.UnloadableStateError, match=r"state\['x'\]") as error:
        ck.save_checkpoint(path, x=value)
    assert type(value).__qualname__ in str(error.value) or "_Config" in str(error.value)  # names the type
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing written


def test_unloadable_state_error_names_the_key_and_the_fix(tmp_path):
    with pytest.raises(ck.UnloadableStateError) as error:
        ck.save_checkpoint(tmp_path / "c.pt", model={"w": torch.ones(1)}, config={"train": _Config()})
    message = str(error.value)
    assert "state['config']['train']" in message and "test_checkpoint._Config" in message
    assert "dataclasses.asdict" in message and "weights_only" in message
    with pytest.raises(ck.UnloadableStateError, match=r"value\.item\(\)"):
        ck.save_checkpoint(tmp_path / "c.pt", loss=np.float32(2.0))
    with pytest.raises(ck.UnloadableStateError, match=r"state_dict\(\)"):
        ck.save_checkpoint(tmp_path / "c.pt", optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))


def test_classes_registered_as_safe_globals_are_accepted(tmp_path):
    with torch.serialization.safe_globals([_Config]):
        ck.save_checkpoint(tmp_path / "c.pt", config=_Config(lr=0.5))
        assert ck.load_checkpoint(tmp_path / "c.pt")["config"].lr == 0.5


class _Tagged(torch.Tensor):
    """A tensor subclass, as DTensor is one: weights_only rebuilds it only if it is allow-listed."""


def test_a_tensor_subclass_is_refused_with_the_dtensor_hint(tmp_path):
    value = torch.ones(2).as_subclass(_Tagged)
    assert not _torch_loads(value)
    with pytest.raises(ck.UnloadableStateError, match=r"full_tensor\(\)"):
        ck.save_checkpoint(tmp_path / "c.pt", w=value)
def test_sharded_checkpoint_directories_are_listed_pruned_and_loaded_in_one_process(tmp_path):
    """``ckpt_*.dcp`` directories (FSDP2, torch.distributed.checkpoint) sit beside ``ckpt_*.pt`` files."""
    import torch.distributed.checkpoint as dcp

    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    for step in (2, 4):
        path = tmp_path / f"ckpt_{step:08d}.dcp"
        dcp.save({"model": weights}, checkpoint_id=str(path), no_dist=True)  # one writer
        ck.save_checkpoint(path / ck.DCP_STATE_FILE, step=step)
    killed = tmp_path / ".ckpt_00000006.dcp.tmp"  # a sharded save killed before its rename
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes(b"half")
    assert ck.latest_checkpoint(tmp_path).name == "ckpt_00000004.dcp"
    assert ck.checkpoint_step(ck.latest_checkpoint(tmp_path)) == 4
    state = ck.load_checkpoint(tmp_path / "ckpt_00000004.dcp")
    assert state["step"] == 4 and torch.equal(state["model"]["w"], weights["w"])
    removed = ck.prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in removed) == [".ckpt_00000006.dcp.tmp", "ckpt_00000002.dcp"]
    assert not killed.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000004.dcp"]
