"""course_lib.lessons.notebook_workers: code written in a notebook cell runs in spawned processes."""

from __future__ import annotations

import pickle
import sys

import pytest

from course_lib.lessons.notebook_workers import load_ipython_extension, public_names, worker_module

WORKER_SOURCE = '''
import torch
import torch.distributed as dist


def rank_sum(rank, world_size, scale):
    t = torch.tensor([float(rank + 1) * scale])
    dist.all_reduce(t)
    return t.item()
'''


def test_module_is_importable_by_name_and_its_functions_pickle():
    module = worker_module("nbw_basic", "def f(x):\n    return x + 1\n")
    assert sys.modules["nbw_basic"] is module and module.f(1) == 2
    assert module.f.__module__ == "nbw_basic"
    assert pickle.loads(pickle.dumps(module.f))(2) == 3  # by reference: the module is importable


def test_running_the_cell_again_replaces_the_module_everywhere():
    first = worker_module("nbw_edit", "def f():\n    return 1\n")
    second = worker_module("nbw_edit", "def f():\n    return 2\n")  # same size, same second
    assert second.f() == 2 and first is not second
    assert pickle.loads(pickle.dumps(second.f))() == 2
    assert sum("nbw_edit-" in p for p in sys.path) == 1, "only the newest version stays on sys.path"


@pytest.mark.parametrize("name", ["not-an-identifier", "class", "", "json"])
def test_bad_or_clashing_names_are_refused(name):
    with pytest.raises(ValueError, match="worker module"):
        worker_module(name, "x = 1\n")


def test_broken_source_raises_and_leaves_nothing_behind():
    with pytest.raises(SyntaxError):
        worker_module("nbw_broken", "def f(:\n")
    assert "nbw_broken" not in sys.modules


def test_cell_magic_defines_names_in_the_notebook():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    load_ipython_extension(shell)
    shell.run_cell_magic("worker_module", "nbw_magic", "def answer():\n    return 42\n_hidden = 1\n")
    assert shell.user_ns["answer"]() == 42 and shell.user_ns["nbw_magic"].answer is shell.user_ns["answer"]
    assert "_hidden" not in shell.user_ns
    assert set(public_names(sys.modules["nbw_magic"])) == {"answer"}


@pytest.mark.distributed
@pytest.mark.slow
def test_spawned_processes_run_a_function_written_in_a_cell():
    from course_lib.distributed import spawn

    module = worker_module("nbw_spawn", WORKER_SOURCE)
    assert spawn(module.rank_sum, 2, 0.5, timeout_s=120) == [1.5, 1.5]
