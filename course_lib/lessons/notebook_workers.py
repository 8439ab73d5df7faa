"""Run functions written in a notebook in other processes.

New processes (``spawn``, ``torch.multiprocessing``, :func:`course_lib.distributed.spawn`)
receive the function to run *by name* and import it from its module. A function defined in a
notebook lives in ``__main__``, which a new process cannot import, so it cannot be sent.

This module turns a notebook cell into a real module::

    %load_ext course_lib.lessons.notebook_workers

    %%worker_module my_workers
    import torch.distributed as dist

    def worker(rank, world_size):
        ...

The cell is saved as ``my_workers.py`` in a private temporary folder that is put on
``sys.path`` (which new processes inherit), imported, and its public names are copied into
the notebook's namespace. ``spawn(worker, 2)`` then works: ``worker.__module__`` is
``"my_workers"`` and the new processes import it from the file. Running the cell again
(after an edit) replaces the module everywhere, with no stale bytecode: every version gets its
own folder. The same is available without IPython as :func:`worker_module`.
"""

from __future__ import annotations

import atexit
import importlib.util
import keyword
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

_ROOT: Path | None = None
_FOLDERS: dict[str, str] = {}  # module name -> folder currently on sys.path for it


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="course-workers-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def worker_module(name: str, source: str) -> ModuleType:
    """Save ``source`` as module ``name`` where every new process finds it, and import it.

    Args:
        name: a valid Python identifier that does not shadow an installed module.
        source: the module's code.

    Returns:
        The freshly executed module (also in ``sys.modules[name]``).

    Raises:
        ValueError: ``name`` is not an identifier, or names a module that already exists.
        SyntaxError (and any exception the code raises on import): the source is broken.
    """
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"worker module name must be a Python identifier, e.g. my_workers; got {name!r}")
    existing = sys.modules.get(name)
    if name not in _FOLDERS and (existing is not None or importlib.util.find_spec(name) is not None):
        raise ValueError(f"a module called {name!r} already exists; pick another name for the worker module")
    folder = tempfile.mkdtemp(prefix=f"{name}-", dir=_root())
    path = Path(folder) / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    old = _FOLDERS.get(name)
    if old is not None and old in sys.path:
        sys.path.remove(old)
    sys.path.insert(0, folder)
    _FOLDERS[name] = folder
    importlib.invalidate_caches()
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def public_names(module: ModuleType) -> dict[str, Any]:
    """The names a ``from module import *`` would give (no leading underscore)."""
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    return {n: getattr(module, n) for n in names}


def load_ipython_extension(ipython: Any) -> None:
    """Register the ``%%worker_module NAME`` cell magic (``%load_ext course_lib.lessons.notebook_workers``)."""

    def _magic(line: str, cell: str) -> None:
        module = worker_module(line.strip(), cell)
        ipython.user_ns.update(public_names(module))
        ipython.user_ns[module.__name__] = module

    ipython.register_magic_function(_magic, magic_kind="cell", magic_name="worker_module")
