"""A real browser against JupyterLab: in the learner's lab notebook 00 runs and its calculator responds; in the
instructor's lab on a fresh clone nbgrader's Formgrader lists the assignments and the autograded scores.

The lab starts as ``make lab`` starts it (learner lab config from ``binder/``), but headless: on
127.0.0.1, a free port, a random token, its own config and runtime directories. Debian's Chromium
(``/usr/bin/chromium``, installed by ``.ci/run``) is driven by Playwright; Playwright's own browser
downloads are never used. The notebook is served from a temporary copy, so the lab's autosave
cannot touch the committed file. A screenshot lands in ``test-artifacts/browser/``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from course_lib.memory import memory_breakdown
from course_lib.widgets import format_gb

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "00_setup_and_challenges.ipynb"
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
RUN_TIMEOUT_S = 300

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=(
        "/usr/bin/chromium is absent: `apt-get install -y --no-install-recommends chromium` "
        "(.ci/run does this in CI)")),
]


@dataclass
class Lab:
    url: str
    token: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _running_lab(base: Path, notebook_dir: Path, cwd: Path, learner: bool) -> Iterator[Lab]:
    """JupyterLab serving ``notebook_dir``, started in ``cwd``: the learner's lab (``make lab``'s config from
    ``binder/``, instructor panels hidden) or the instructor's (``make instructor-lab``: every nbgrader panel)."""
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTER_RUNTIME_DIR=str(base / "runtime"),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline", PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    env.pop("JUPYTER_CONFIG_PATH", None)
    if learner:
        env["JUPYTER_CONFIG_PATH"] = str(ROOT / "binder")  # the learner's lab, as `make lab` sets it
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = ARTIFACTS / ("jupyterlab.log" if learner else "jupyterlab-instructor.log")
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser",
             f"--notebook-dir={notebook_dir}", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             "--LabApp.expose_app_in_browser=True",
             *(["--ServerApp.allow_root=True"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
            cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                if server.poll() is not None:
                    pytest.fail(f"jupyter lab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer /api/status in 90 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield Lab(url=url, token=token, log=log)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("lab")
    served = base / "notebooks"
    served.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, served / NOTEBOOK)
    with _running_lab(base, served, ROOT, learner=True) as running:
        yield running


# Progress of "run all" from the notebook's model: error output, or every non-empty code cell executed
# and the kernel idle again.
_RUN_STATE = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const cells = panel.content.model.cells;
  let pending = 0;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code' || !cell.sharedModel.getSource().trim()) continue;
    const outputs = cell.outputs.toJSON();
    const error = outputs.find(o => o.output_type === 'error');
    if (error) return {error: `cell ${i}: ${error.ename}: ${error.evalue}`};
    if (!cell.executionCount) pending += 1;
  }
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return {pending, status: kernel ? kernel.status : 'none'};
}"""


def _wait_for_run(page, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    state: dict = {}
    while time.monotonic() < deadline:
        state = page.evaluate(_RUN_STATE)
        assert "error" not in state, f"notebook 00 failed in the browser: {state['error']}"
        if state["pending"] == 0 and state["status"] == "idle":
            return
        time.sleep(1)
    pytest.fail(f"notebook 00 did not finish in {timeout_s} s (last state {state})")


def _expected_total(billions: float, optimizer: str, precision: str) -> str:
    return "Total: " + format_gb(memory_breakdown(billions * 1e9, optimizer=optimizer, precision=precision)["total"])


@pytest.mark.timeout(RUN_TIMEOUT_S + 240)
def test_notebook_00_runs_and_calculator_responds(lab: Lab) -> None:
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -r requirements.txt` (it pins playwright); "
                    "never `playwright install` (it downloads browsers)")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            # Own workspace, reset: tabs from earlier sessions must not come back.
            page.goto(f"{lab.url}/lab/workspaces/browser-test/tree/{NOTEBOOK}?reset&token={lab.token}")
            # The toolbar says idle before the kernel exists; the status bar names the kernel once it does.
            page.wait_for_function(
                "() => /\\| Idle/.test((document.querySelector('#jp-main-statusbar') || {}).innerText || '')",
                timeout=120_000,
            )
            assert page.evaluate("window.jupyterapp.hasPlugin('@jupyter/nbgrader:validate-assignment')"), (
                "nbgrader's lab extension is not loaded, so the check below would prove nothing")
            hidden = ["@jupyter/nbgrader:create-assignment", "@jupyter/nbgrader:formgrader",
                      "@jupyter/nbgrader:course-list", "@jupyter/nbgrader:menu"]
            shown = [p for p in hidden if page.evaluate(f"window.jupyterapp.hasPlugin('{p}')")]
            assert not shown, f"the learner's lab shows instructor panels: {shown}"

            page.evaluate("window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            _wait_for_run(page, RUN_TIMEOUT_S)

            result = page.locator(".memory-result")
            result.scroll_into_view_if_needed()
            expect(result).to_contain_text(_expected_total(7.0, "adamw", "mixed"), timeout=30_000)

            params = page.locator(".memory-params input")
            params.fill("70")
            params.press("Enter")
            expect(result).to_contain_text(_expected_total(70.0, "adamw", "mixed"), timeout=30_000)

            page.locator(".memory-optimizer select").select_option("sgd")
            expect(result).to_contain_text(_expected_total(70.0, "sgd", "mixed"), timeout=30_000)
            for part in ("weights", "gradients", "optimizer"):
                expect(result).to_contain_text(format_gb(memory_breakdown(70e9, "sgd", "mixed")[part]))
        finally:
            calculator = page.locator(".memory-calculator")
            if calculator.count():
                calculator.scroll_into_view_if_needed()
                calculator.screenshot(path=str(ARTIFACTS / "notebook00_calculator.png"))
            page.screenshot(path=str(ARTIFACTS / "notebook00_lab.png"))
            browser.close()


# ------------------------------------------------------------------------------------------
# The instructor's lab on a fresh clone: nbgrader's Formgrader lists the assignments and shows an autograded score

ASSIGNMENT_NAMES = ("ex1_distributed", "ex2_memory", "ex3_peft", "quiz")


def _fresh_clone(dest: Path) -> Path:
    """``git clone`` of this repository's committed HEAD: no grading/ folder, no .venv, nothing untracked."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True, timeout=120)
    assert not (dest / "grading").exists()
    return dest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_formgrader_on_a_fresh_clone_lists_the_assignments_and_an_autograded_score(tmp_path: Path) -> None:
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -r requirements.txt` (it pins playwright)")
    course = _fresh_clone(tmp_path / "course")
    # two students hand in the quiz: the model solution and the untouched student version
    for student, folder in (("alice", "solutions"), ("bob", "assessments")):
        (tmp_path / "submissions" / student).mkdir(parents=True)
        shutil.copy(course / folder / "quiz" / "quiz.ipynb", tmp_path / "submissions" / student / "quiz.ipynb")

    with _running_lab(tmp_path / "lab", course, course, learner=False) as lab, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            # before any make target: the instructor's panels are there and the Formgrader opens its gradebook
            page.goto(f"{lab.url}/lab/workspaces/instructor-test?reset&token={lab.token}")
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.commands.hasCommand('nbgrader:open-formgrader')",
                                   timeout=120_000)
            for plugin in ("@jupyter/nbgrader:formgrader", "@jupyter/nbgrader:create-assignment"):
                assert page.evaluate(f"window.jupyterapp.hasPlugin('{plugin}')"), f"the instructor's lab lacks {plugin}"
            page.evaluate("window.jupyterapp.commands.execute('nbgrader:open-formgrader')")
            formgrader = page.frame_locator("#formgrader-iframe iframe")
            for name in ASSIGNMENT_NAMES:  # Manage Assignments: every assignment of solutions/
                expect(formgrader.locator("#main-table")).to_contain_text(name, timeout=60_000)
            expect(formgrader.locator("body")).not_to_contain_text("error accessing the nbgrader database")
            page.screenshot(path=str(ARTIFACTS / "formgrader_assignments.png"))

            graded = subprocess.run(  # what `make grade SUBMISSIONS=...` runs, in the clone
                [sys.executable, "scripts/grade.py", "grade", str(tmp_path / "submissions")],
                cwd=course, capture_output=True, text=True, timeout=600,
            )
            assert graded.returncode == 0, graded.stdout[-3000:] + graded.stderr[-3000:]

            # the quiz's submissions: alice's autograded score is full marks, bob's zero
            top = _quiz_points(course)
            page.goto(f"{lab.url}/formgrader/manage_submissions/quiz?token={lab.token}")
            rows = page.locator("#main-table tr")
            expect(rows.filter(has_text="alice").locator(".score")).to_have_text(f"{top:g} / {top:g}", timeout=60_000)
            expect(rows.filter(has_text="bob").locator(".score")).to_have_text(f"0 / {top:g}", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "formgrader_quiz_submissions.png"))
        finally:
            browser.close()


def _quiz_points(course: Path) -> float:
    import nbformat

    nb = nbformat.read(course / "solutions" / "quiz" / "quiz.ipynb", as_version=4)
    return sum(c.metadata.get("nbgrader", {}).get("points", 0) for c in nb.cells)
