"""Run time and peak memory of every lesson notebook, against the course's budget.

Each notebook runs top to bottom (nbclient, outputs discarded) in its own child process, so
its numbers are its own: wall time, the peak resident memory of the largest single process
(the kernel, or a worker it started; from ``wait4``), and the peak summed over the whole
process tree (kernel plus workers, sampled every 0.1 s). Over 2 minutes or 3 GB is flagged.

    python benchmarks/notebooks.py                 # every notebooks/NN_*.ipynb
    python benchmarks/notebooks.py notebooks/10_scaling_laws.ipynb --strict
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 120.0
BUDGET_BYTES = 3 * 2**30

# The child: execute one notebook in a fresh kernel from this environment, working directory
# notebooks/ (as in JupyterLab), and exit non-zero with the failing cell's error if any.
RUNNER = """
import sys, nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
path, timeout = sys.argv[1], int(sys.argv[2])
nb = nbformat.read(path, as_version=4)
client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[3]}})
try:
    client.execute()
except CellExecutionError as e:
    print(str(e)[-2000:], file=sys.stderr)
    sys.exit(1)
"""


@dataclass
class Result:
    notebook: str
    ok: bool
    wall_s: float
    peak_process_bytes: int
    peak_tree_bytes: int | None

    @property
    def over_budget(self) -> list[str]:
        why = []
        if self.wall_s > BUDGET_S:
            why.append(f"> {BUDGET_S / 60:.0f} min")
        if max(self.peak_process_bytes, self.peak_tree_bytes or 0) > BUDGET_BYTES:
            why.append(f"> {BUDGET_BYTES / 2**30:.0f} GB")
        return why


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_notebook(path: Path, timeout_s: int) -> tuple[Result, str]:
    """Execute one notebook in a child process; return its measurements and error text."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        import psutil  # noqa: F401  (sampling the whole tree is optional)
        sample = True
    except ImportError:
        sample = False
    errfile = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty child cannot block
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(path), str(timeout_s), str(path.parent)],
                            env=env, stdout=subprocess.DEVNULL, stderr=errfile)
    peak_tree = 0
    status = None
    while status is None:
        pid, status_code, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == 0:
            if sample:
                peak_tree = max(peak_tree, _tree_rss(proc.pid))
            if time.perf_counter() - t0 > timeout_s + 60:
                proc.kill()
            time.sleep(0.1)
            continue
        status = os.waitstatus_to_exitcode(status_code)
    wall = time.perf_counter() - t0
    proc.returncode = status
    errfile.seek(0)
    err = errfile.read()
    errfile.close()
    # ru_maxrss is in KiB on Linux; it covers the child and every descendant it reaped
    peak_process = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return Result(str(rel), status == 0, wall, peak_process, peak_tree if sample else None), err


def format_table(results: list[Result]) -> str:
    lines = ["| notebook | result | wall | peak RSS (largest process) | peak RSS (process tree) | budget |",
             "|---|---|---|---|---|---|"]
    for r in results:
        tree = "n/a" if r.peak_tree_bytes is None else f"{r.peak_tree_bytes / 2**30:.2f} GB"
        over = ", ".join(r.over_budget)
        lines.append(f"| {r.notebook} | {'ok' if r.ok else 'FAILED'} | {r.wall_s:.0f} s | "
                     f"{r.peak_process_bytes / 2**30:.2f} GB | {tree} | {'OVER ' + over if over else 'ok'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/NN_*.ipynb")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell before a notebook fails")
    p.add_argument("--strict", action="store_true", help="exit non-zero when a notebook is over budget")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    paths = [x.resolve() for x in args.notebooks] or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    missing = [str(x) for x in paths if not x.is_file()]
    if missing:
        p.error(f"no such notebook: {', '.join(missing)}")
    if not paths:
        p.error("no notebooks/NN_*.ipynb found")
    results = []
    for path in paths:
        result, err = run_notebook(path, args.timeout)
        results.append(result)
        print(f"  {result.notebook}: {'ok' if result.ok else 'FAILED'} in {result.wall_s:.0f} s", flush=True)
        if not result.ok:
            print(err.strip()[-1500:], file=sys.stderr)
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) | {"over_budget": r.over_budget} for r in results], indent=2))
    failed = [r.notebook for r in results if not r.ok]
    over = [r.notebook for r in results if r.over_budget]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    if over:
        print(f"over budget (2 min / 3 GB on a 2-core CPU): {', '.join(over)}", file=sys.stderr)
    return 1 if failed or (args.strict and over) else 0


if __name__ == "__main__":
    sys.exit(main())
