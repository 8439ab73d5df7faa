"""The harness for every lesson notebook.

Two layers:

* static checks (fast, run by ``make test-fast``): each committed ``notebooks/NN_*.ipynb`` is saved
  from one clean top-to-bottom run (outputs present, no error output, execution counts 1, 2, 3, ...),
  starts with the standard Colab install cell, and links only to notebooks that exist;
* the nbval run (marked ``notebooks``, run by ``make test``): each notebook is executed again, cell
  by cell, in this environment with ``pytest --nbval-lax``; cells marked ``# NBVAL_CHECK_OUTPUT``
  must reproduce their stored output after sanitising (``tests/nbval_sanitize.cfg``).

The nbval run happens in a child pytest per notebook, so one notebook's kernel cannot leak state
into another's, each gets its own time limit, and a failure names the notebook and the cell.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
# With no notebook at all, every parametrised test below still runs once, on a path that does not
# exist, and fails: an empty parameter set would only be skipped, and a skip is green.
NOTEBOOK_PARAMS = NOTEBOOKS or [NOTEBOOK_DIR / "NN_no_notebook_found.ipynb"]

# The lessons the syllabus fixes (SYLLABUS.md, "Lessons" table).
SYLLABUS_NOTEBOOKS = (
    "00_setup_and_challenges", "01_data_parallelism", "02_model_and_pipeline_parallelism",
    "03_gradient_checkpointing", "04_mixed_precision", "05_gradient_accumulation",
    "06_lr_scheduling", "07_lora", "08_data_pipeline", "09_monitoring_and_checkpoints",
    "10_scaling_laws", "11_capstone",
)

# First code cell of every notebook: installs the course on Colab, does nothing elsewhere.
COLAB_CELL = """\
# On Colab, install the course first (does nothing anywhere else).
import sys
if "google.colab" in sys.modules:
    %pip install -q "course_lib[course] @ git+https://github.com/llm-training-course/llm-training-course\""""

# Budget on a 2-core CPU is 2 minutes per notebook; the limits below leave room for a busy CI host
# while still catching a notebook that hangs.
CELL_TIMEOUT_S = 240
NOTEBOOK_TIMEOUT_S = 600


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _load(path: Path) -> dict:
    assert path.is_file(), f"{path} does not exist: no lesson notebooks matched notebooks/[0-9][0-9]_*.ipynb"
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def saved_run_problems(nb: dict) -> list[str]:
    """Why a saved notebook is not the product of one clean top-to-bottom run (empty: it is)."""
    problems = []
    code = [c for c in _code_cells(nb) if _source(c).strip()]
    if not code:
        return ["has no code cells"]
    if not any(c.get("outputs") for c in code):
        problems.append("has no outputs: execute it and commit it with its outputs")
    counts = [c.get("execution_count") for c in code]
    if None in counts:
        first = counts.index(None)
        problems.append(f"code cell {first + 1} was never executed")
    elif counts != list(range(1, len(counts) + 1)):
        problems.append(f"cells executed out of order (execution counts {counts}); "
                        "re-run it top to bottom with a fresh kernel")
    for i, cell in enumerate(code, start=1):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"code cell {i} was saved with an error: {out.get('ename')}: {out.get('evalue')}")
    return problems


@pytest.mark.parametrize("name", SYLLABUS_NOTEBOOKS)
def test_every_syllabus_lesson_has_a_notebook(name: str) -> None:
    assert (NOTEBOOK_DIR / f"{name}.ipynb").is_file(), f"notebooks/{name}.ipynb is missing (SYLLABUS.md)"


@pytest.mark.parametrize("path", NOTEBOOK_PARAMS, ids=lambda p: p.name)
def test_notebook_saved_from_a_clean_run(path: Path) -> None:
    problems = saved_run_problems(_load(path))
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("path", NOTEBOOK_PARAMS, ids=lambda p: p.name)
def test_notebook_starts_with_the_colab_cell(path: Path) -> None:
    nb = _load(path)
    code = _code_cells(nb)
    assert code, f"{path.name} has no code cells"
    assert _source(code[0]).strip() == COLAB_CELL, (
        f"{path.name}: the first code cell must be the standard Colab install cell:\n{COLAB_CELL}")
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", (
        f"{path.name}: kernelspec name must be 'python3' so it runs in any environment")


@pytest.mark.parametrize("path", NOTEBOOK_PARAMS, ids=lambda p: p.name)
def test_notebook_links_resolve(path: Path) -> None:
    nb = _load(path)
    text = "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    targets = re.findall(r"\]\(([^)#\s]+\.ipynb)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if not t.startswith("http") and not (path.parent / t).is_file()]
    assert not missing, f"{path.name} links to notebooks that do not exist: {missing}"


def test_static_checks_catch_a_bad_notebook() -> None:
    """The checker itself: a notebook run out of order, half-run or saved with an error is flagged."""
    def cell(n, outputs=()):
        return {"cell_type": "code", "source": "x = 1", "execution_count": n, "outputs": list(outputs)}

    ok = {"cells": [cell(1, [{"output_type": "stream", "text": "hi"}]), cell(2)]}
    assert saved_run_problems(ok) == []
    assert "out of order" in " ".join(saved_run_problems({"cells": [cell(2, [{"output_type": "stream"}]), cell(1)]}))
    assert "never executed" in " ".join(saved_run_problems({"cells": [cell(1, [{"output_type": "stream"}]), cell(None)]}))
    assert "no outputs" in " ".join(saved_run_problems({"cells": [cell(1), cell(2)]}))
    err = {"output_type": "error", "ename": "ValueError", "evalue": "boom", "traceback": []}
    assert "ValueError: boom" in " ".join(saved_run_problems({"cells": [cell(1, [err])]}))


# ------------------------------------------------------------------ output hygiene

STALE_PROGRESS = re.compile(r"(?<![\d.])0%\|")                       # a tqdm bar saved before it moved
MACHINE_PATH = re.compile(r"(/tmp/|/var/folders/|/work/|/home/\w|/root/|/Users/\w|[A-Z]:\\Users\\)")
WANDB_RUN = re.compile(r"run-\d{8}_\d{6}-\w+")                       # offline-run-20261128_173718-tx3tefu6
RANK_PREFIX = re.compile(r"^\[(?:rank|default)(\d+)\]:", re.MULTILINE)  # torchrun's per-rank line tags
GLUED_RANK = re.compile(r"\S(?:\[rank\d+\]:|rank \d+ of \d+)")         # a rank's line written into another's
DATACLASS_REPR = re.compile(r"^[A-Z]\w*\(\w+=", re.MULTILINE)          # SomeClass(field=..., ...)
LEGEND_CALL = re.compile(r"\.legend\(([^()]*(?:\([^()]*\)[^()]*)*)\)")
LOG_AXIS = re.compile(r"""(set_[xy]scale\(\s*["']log|[xy]scale\s*=\s*["']log|\.loglog\(|\.semilog[xy]\()""")
EXPLICIT_TICKS = re.compile(r"(readable_log_ticks\(|set_[xy]ticks\(|[xy]ticks\s*=|\.ticker\.|LogLocator|FixedLocator|ScalarFormatter)")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _finished_widget_bars(nb: dict) -> set[str]:
    """Model ids of the tqdm widgets whose saved state shows the bar finished (value == max).

    A notebook tqdm bar is an HBox whose ``text/plain`` fallback is frozen at the moment it was
    displayed ("0%"); what a reader sees is the widget state saved in the notebook's metadata.
    """
    state = nb.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    models = state.get("state", {})
    finished = set()
    for model_id, model in models.items():
        children = model.get("state", {}).get("children", []) if model.get("model_name") == "HBoxModel" else []
        for child in children:
            bar = models.get(str(child).removeprefix("IPY_MODEL_"), {})
            if bar.get("model_name") == "FloatProgressModel" and bar["state"].get("value") == bar["state"].get("max"):
                finished.add(model_id)
    return finished


def _output_texts(out: dict) -> list[str]:
    if out.get("output_type") == "stream":
        text = out.get("text", "")
        return ["".join(text) if isinstance(text, list) else text]
    data = out.get("data", {})
    text = data.get("text/plain", "")
    return ["".join(text) if isinstance(text, list) else text] if text else []


def output_hygiene_problems(nb: dict) -> list[str]:
    """What a committed notebook's outputs and plot code do that a clean lesson must not (empty: clean).

    Rules: no progress bar saved at 0% (a widget bar whose saved state reached its end is fine); no machine-specific path (temporary or home folders); no
    W&B run name (a timestamp and an id); no output holding the lines of several ranks (torchrun
    ``[rankN]:`` tags of more than one rank, or a rank's line glued into another's); no dataclass
    repr as a cell's result or a printed line; every ``legend(...)`` placed with ``loc=`` or ``bbox_to_anchor=``
    (matplotlib's default may cover data); every log axis with explicit ticks in the same cell.
    """
    problems = []
    finished_bars = _finished_widget_bars(nb)
    for i, cell in enumerate(_code_cells(nb), start=1):
        for out in cell.get("outputs", []):
            widget = out.get("data", {}).get(WIDGET_VIEW, {}).get("model_id")
            for text in _output_texts(out):
                if STALE_PROGRESS.search(text) and widget not in finished_bars:
                    problems.append(f"code cell {i}: a progress bar saved at 0%: {STALE_PROGRESS.search(text).string[:60]!r}")
                if MACHINE_PATH.search(text):
                    problems.append(f"code cell {i}: a machine-specific path in the output: "
                                    f"{text[max(0, MACHINE_PATH.search(text).start() - 20):][:80]!r}")
                if WANDB_RUN.search(text):
                    problems.append(f"code cell {i}: a W&B run name (timestamp and id): {WANDB_RUN.search(text).group()!r}")
                if len(set(RANK_PREFIX.findall(text))) > 1 or GLUED_RANK.search(text):
                    problems.append(f"code cell {i}: the output interleaves several ranks' lines")
                shown = DATACLASS_REPR.search(text) if out.get("output_type") == "stream" else DATACLASS_REPR.match(text)
                if WIDGET_VIEW not in out.get("data", {}) and shown:
                    problems.append(f"code cell {i}: a dataclass repr as the result: {text[:60]!r}")
        source = _source(cell)
        for args in LEGEND_CALL.findall(source):
            if "loc=" not in args and "bbox_to_anchor=" not in args:
                problems.append(f"code cell {i}: legend({args}) without loc= or bbox_to_anchor=")
        if LOG_AXIS.search(source) and not EXPLICIT_TICKS.search(source):
            problems.append(f"code cell {i}: a log axis without explicit ticks at the plotted values")
    return problems


@pytest.mark.parametrize("path", NOTEBOOK_PARAMS, ids=lambda p: p.name)
def test_notebook_outputs_are_clean(path: Path) -> None:
    problems = output_hygiene_problems(_load(path))
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_hygiene_checks_catch_bad_outputs() -> None:
    def nb(source="x = 1", text=None, result=None):
        outputs = []
        if text is not None:
            outputs.append({"output_type": "stream", "name": "stdout", "text": text})
        if result is not None:
            outputs.append({"output_type": "execute_result", "data": {"text/plain": result}, "execution_count": 1})
        return {"cells": [{"cell_type": "code", "source": source, "execution_count": 1, "outputs": outputs}]}

    assert output_hygiene_problems(nb(text="loss 1.0\nrank 0 of 2 on cpu\nrank 1 of 2 on cpu\n")) == []
    assert output_hygiene_problems(nb(source="ax.legend(loc='best')\nax.set_yscale('log')\nax.set_yticks([1, 10])")) == []
    bad = {
        "0%": nb(text="train:   0%|          | 0/50 [00:00<?, ?step/s]"),
        "path": nb(text="checkpoint /tmp/ddp-run-bqj3l2p5/ckpt_3.pt"),
        "W&B": nb(text="wandb sync logged_run/wandb/offline-run-20261128_173718-tx3tefu6"),
        "interleaves": nb(text="rank 0 of 2 (local rank 0) on cpurank 1 of 2 (local rank 1) on cpu"),
        "interleaves ": nb(text="[rank0]: loss 1.0\n[rank1]: loss 1.1\n"),
        "dataclass": nb(result="StepTiming(step_s=0.004, compute_s=0.003)"),
        "dataclass ": nb(text="loss 1.0\nOverflowDemo(scale_before=65536.0, skipped=True)\n"),
        "legend": nb(source="ax.legend()"),
        "log axis": nb(source="ax.set(yscale='log')\nax.legend(loc='best')"),
    }
    for what, notebook in bad.items():
        found = " ".join(output_hygiene_problems(notebook))
        assert what.strip() in found or (what == "0%" and "0%" in found), (what, found)

    # a tqdm widget: its text/plain is frozen at 0%; the saved widget state decides
    def widget_nb(value):
        out = {"output_type": "display_data", "metadata": {},
               "data": {WIDGET_VIEW: {"model_id": "box"}, "text/plain": "runs:   0%|          | 0/2 [00:00<?, ?it/s]"}}
        models = {"box": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_bar"]}},
                  "bar": {"model_name": "FloatProgressModel", "state": {"value": value, "max": 2.0}}}
        return {"cells": [{"cell_type": "code", "source": "", "outputs": [out]}],
                "metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {"state": models}}}}

    assert output_hygiene_problems(widget_nb(2.0)) == []
    assert "0%" in " ".join(output_hygiene_problems(widget_nb(0.0)))


def nbval_command(notebook: Path) -> list[str]:
    """The pytest command that re-runs one notebook with nbval in this environment."""
    return [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "--nbval-lax", "--nbval-current-env",
        "--nbval-sanitize-with", str(SANITIZE),
        f"--nbval-cell-timeout={CELL_TIMEOUT_S}",
        str(notebook),
    ]


def nbval_summary(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line, e.g. ``12 passed, 1 skipped in 30.1s``."""
    lines = [l for l in output.strip().splitlines() if re.search(r"\d+ (passed|failed|error)|no tests ran", l)]
    if not lines:
        return {}
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", lines[-1])}


def test_nbval_summary_parser() -> None:
    assert nbval_summary("...\n12 passed, 1 skipped in 30.10s\n") == {"passed": 12, "skipped": 1}
    assert nbval_summary("1 failed, 3 passed in 2s") == {"failed": 1, "passed": 3}
    assert nbval_summary("no tests ran in 0.01s") == {}


@pytest.mark.notebooks
@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S + 30)
@pytest.mark.parametrize("path", NOTEBOOK_PARAMS, ids=lambda p: p.name)
def test_notebook_runs_with_nbval(path: Path) -> None:
    code_cells = [c for c in _code_cells(_load(path)) if _source(c).strip()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
               WANDB_SILENT="true", PYDEVD_DISABLE_FILE_VALIDATION="1")
    start = time.perf_counter()
    proc = subprocess.run(nbval_command(path), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=NOTEBOOK_TIMEOUT_S)
    wall = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    summary = nbval_summary(proc.stdout)
    # Exit code 5 means nbval collected nothing: that is a failure here, never a pass.
    assert proc.returncode == 0, f"nbval failed on {path.name} (exit {proc.returncode}):\n{out[-6000:]}"
    assert summary.get("passed", 0) + summary.get("skipped", 0) >= len(code_cells), (
        f"nbval ran {summary} for {path.name} but it has {len(code_cells)} code cells:\n{out[-3000:]}")
    print(f"{path.name}: {summary.get('passed')} cells passed in {wall:.1f} s")
