"""Which device and precisions to use, sizes per device, and an environment doctor."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

KEY_PACKAGES = (
    "torch", "numpy", "matplotlib", "ipywidgets", "jupyterlab", "nbgrader", "nbval",
    "transformers", "peft", "tokenizers", "safetensors", "wandb", "tqdm",
)
MIN_TORCH = (2, 11)  # the oldest torch the course is checked on (pyproject.toml says the same)


def torch_version() -> tuple[int, int]:
    """The installed torch's ``(major, minor)``."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def pick_device(prefer: str | None = None) -> torch.device:
    """Return ``cuda`` if available, else ``mps``, else ``cpu`` (or ``prefer`` if given).

    Under torchrun, ``LOCAL_RANK`` picks the GPU of this process (``cuda:{LOCAL_RANK}``),
    never the global rank, which exceeds the GPU count on a second node.
    """
    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cuda_bf16_native(device: torch.device | str | int | None = None) -> bool:
    """True when the CUDA GPU ``device`` computes in bf16 natively: compute capability 8.0+ (Ampere+).

    ``torch.cuda.is_bf16_supported()`` alone also says True on a T4 or V100 (sm75/sm70), which
    *emulate* bf16, far slower than their fp16 units; ``including_emulation=False`` and the
    capability of this very device (not of the current one) rule that out.
    """
    if device is None or isinstance(device, int):
        index = torch.cuda.current_device() if device is None else device
    else:
        device = torch.device(device)
        index = torch.cuda.current_device() if device.index is None else device.index
    if torch.cuda.get_device_capability(index)[0] < 8:
        return False
    # is_bf16_supported asks about the *current* device: make it the one in question
    switch = torch.cuda.device(index) if index != torch.cuda.current_device() else contextlib.nullcontext()
    with switch:
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a torch without the keyword: the capability (checked above) decides
            return True
def synchronize(device: torch.device | str) -> None:
    """Wait until the work queued on ``device`` has finished (a no-op on CPU).

    The one place the library waits for a device: GPU kernels run asynchronously, so a timer
    read without it measures only how fast the host queued the work. Every call stalls the
    host, so the training loop calls it only on logged steps.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def supported_precisions(device: torch.device | str | None = None) -> list[str]:
    """Precisions that train correctly on ``device``: always fp32, plus bf16/fp16 where usable.

    On CPU both bf16 and fp16 autocast run (slowly: they are for learning the numerics);
    on CUDA bf16 needs compute capability 8.0 or newer (Ampere+, see :func:`cuda_bf16_native`).
    """
    device = pick_device() if device is None else torch.device(device)
    out = ["fp32"]
    if device.type == "cuda":
        if cuda_bf16_native(device):
            out.append("bf16")
        out.append("fp16")
    elif device.type == "mps":
        out += ["bf16", "fp16"] if torch.backends.mps.is_macos_or_newer(14, 0) else ["fp16"]
    else:
        out += ["bf16", "fp16"]
    return out


def best_precision(device: torch.device | str | None = None) -> str:
    """The mixed precision to train in on ``device``.

    bf16 on GPUs with bf16 units (no loss scaling needed); fp16, which trains with a
    ``GradScaler``, on older CUDA GPUs (T4, V100); fp32 elsewhere (a CPU is slower in 16 bits).
    """
    device = pick_device() if device is None else torch.device(device)
    if device.type == "cuda":
        return "bf16" if "bf16" in supported_precisions(device) else "fp16"
    return "fp32"


def backend_for(device: torch.device | str) -> str:
    """The collective backend for tensors on ``device``: ``"nccl"`` for CUDA (where this torch has
    NCCL), ``"gloo"`` for everything else (CPU tensors, and MPS, which has no collective backend).

    The one place the course chooses a backend: a ``--device cpu`` run on a GPU machine must
    use gloo, since NCCL only moves CUDA tensors.
    """
    device = torch.device(device)
    dist = torch.distributed
    if device.type == "cuda" and dist.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def device_profile(device: torch.device | str | None = None) -> str:
    """``"gpu"`` on CUDA, else ``"cpu"``: notebooks size their models and runs by this."""
    device = pick_device() if device is None else torch.device(device)
    return "gpu" if device.type == "cuda" else "cpu"


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"[{'OK' if self.ok else 'FAIL'}] {self.name}: {self.detail}"
        if not self.ok and self.fix:
            text += f"  -> {self.fix}"
        return text


def _memory_gib() -> float | None:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def gpu_checks() -> list[Check]:
    """The GPUs this process sees: name, total and free memory of each, or why there are none."""
    if torch.cuda.is_available():
        checks = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            checks.append(Check(
                f"gpu {i}", free >= 2**30,
                f"{props.name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free), "
                f"compute capability {props.major}.{props.minor}",
                "less than 1 GiB free: another process holds this GPU (see `nvidia-smi`); stop it, "
                "or pick a free GPU with CUDA_VISIBLE_DEVICES",
            ))
        return checks
    if torch.version.cuda is None and shutil.which("nvidia-smi"):
        return [Check("gpu", False, "an NVIDIA driver is installed but this torch is a CPU-only build",
                      "install the CUDA build of the pinned torch in the venv: `pip install torch=="
                      + torch.__version__.split("+")[0] + " --index-url <URL>`, with the URL for your "
                      "driver's CUDA version from https://pytorch.org/get-started/locally/")]
    if pick_device().type == "mps":
        return [Check("gpu", True, "Apple MPS: single-process lessons run on it; the distributed "
                                   "lessons run on CPU with gloo (MPS has no collective backend)")]
    return [Check("gpu", True, "none: every lesson runs on the CPU with the small 'cpu' profile; "
                               "for GPU speed open the notebooks on Colab with a GPU runtime")]


def backend_checks() -> list[Check]:
    """Collective backends: gloo (CPU, needed by the distributed lessons) and NCCL (several GPUs)."""
    dist = torch.distributed
    available = dist.is_available()
    gloo = available and dist.is_gloo_available()
    nccl = available and dist.is_nccl_available()
    checks = [Check("gloo", gloo, "available" if gloo else "unavailable",
                    "this torch build lacks torch.distributed: install the official wheel "
                    "(`pip install -r requirements.txt`); the distributed lessons need gloo")]
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus == 0:
        checks.append(Check("nccl", True, ("available" if nccl else "unavailable") +
                            " (not needed without CUDA GPUs: gloo carries the distributed lessons)"))
    else:
        checks.append(Check(
            "nccl", nccl or n_gpus < 2,
            "available" if nccl else f"unavailable ({'not needed with one GPU' if n_gpus < 2 else f'{n_gpus} GPUs'})",
            "NCCL ships only in Linux CUDA builds (not on Windows): the course falls back to gloo, which "
            "is correct but slower; for NCCL use Linux or WSL2",
        ))
    return checks


def run_checks() -> list[Check]:
    """Collect the environment checks (no printing)."""
    checks = [Check("python", sys.version_info >= (3, 10), platform.python_version(),
                    "the course needs Python 3.10+ (3.11 recommended): install it, then `make clean lab`")]
    torch_ok = torch_version() >= MIN_TORCH
    checks.append(Check("torch", torch_ok, f"{torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'})",
                        f"the course needs torch {MIN_TORCH[0]}.{MIN_TORCH[1]}+: `pip install -r requirements.txt` "
                        "in a fresh venv"))
    device = pick_device()
    detail = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        detail += f" ({props.name}, {props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} GPU(s))"
    checks.append(Check("device", True, detail))
    checks += gpu_checks()
    precisions = supported_precisions(device)
    precision_fix = {
        "bf16": "this GPU predates bf16 (needs compute capability 8.0+): use --precision fp16, which "
                "needs loss scaling (lesson 04), or fp32",
        "fp16": "use --precision fp32",
    }
    for p in ("bf16", "fp16"):
        checks.append(Check(p, p in precisions, "supported" if p in precisions else "not supported",
                            precision_fix[p]))
    cores = os.cpu_count() or 1
    checks.append(Check("cpu cores", cores >= 2, f"{cores} (torch threads {torch.get_num_threads()})",
                        "distributed lessons want 2+ cores; they still run, slowly"))
    mem = _memory_gib()
    checks.append(Check("memory", mem is None or mem >= 3, "unknown" if mem is None else f"{mem:.1f} GiB",
                        "lessons need about 3 GiB free; close other programs"))
    checks += backend_checks()
    for pkg in KEY_PACKAGES[1:]:
        try:
            checks.append(Check(pkg, True, importlib.metadata.version(pkg)))
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(pkg, False, "not installed", "run `make lab` (or pip install -r requirements.txt)"))
    return checks


def doctor(print_fn: Callable[[str], object] = print) -> bool:
    """Print one ``[OK]``/``[FAIL]`` line per check; return True when all passed."""
    checks = run_checks()
    for c in checks:
        print_fn(c.line())
    return all(c.ok for c in checks)
