"""Release and autograde the course's graded work with nbgrader (``make release``, ``make grade``).

    python scripts/grade.py release
        Regenerate ``assessments/<assignment>/<name>.ipynb`` (student versions: solutions and
        hidden tests removed) from ``solutions/`` and record the tests in the gradebook.

    python scripts/grade.py grade SUBMISSIONS [--assignment A] [--lms-regex REGEX] [--jobs N] [--timeout S]
        Autograde every submission found in SUBMISSIONS, write feedback HTML and a grades CSV
        under ``grading/``, and print a summary. ``--jobs N`` grades N submissions at a time
        in N worker processes (they share the SQLite gradebook). SUBMISSIONS may be laid out as

        * ``SUBMISSIONS/<student>/<assignment>/<name>.ipynb`` (nbgrader's own layout),
        * ``SUBMISSIONS/<student>/<name>.ipynb`` (the assignment is found from the notebook name),
        * an LMS download (a ``.zip`` file, or a folder of zips and/or loose notebooks whose
          file names carry the student id) for one ``--assignment``: it goes through
          ``nbgrader zip_collect`` with ``--lms-regex`` (default: Canvas-style
          ``<student>_..._<name>.ipynb``).

        One broken submission (invalid file, infinite loop, crashed kernel, a kernel that never
        starts) is reported and skipped; every other submission is still graded. Every
        submission is graded in a worker process that must answer within ``--timeout`` seconds
        (default: the cell timeout for each code cell plus 180 s). Exit status 1 if any failed.

Everything nbgrader writes goes to the git-ignored ``grading/`` folder (see
``nbgrader_config.py``). The functions here are also what ``tests/test_grading.py`` drives.
"""

from __future__ import annotations

import argparse
import ast
import csv
import functools
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

REPO = Path(__file__).resolve().parent.parent

# Canvas names downloads "<login>_<late?>_<user id>_<submission id>_<original name>"; a
# re-submission of quiz.ipynb may arrive as "quiz-1.ipynb".
# nbgrader matches the regex against the file's absolute path, hence the leading (?:.*/)?.
DEFAULT_LMS_REGEX = r"^(?:.*/)?(?P<student_id>[^/_]+)_(?:[^/_]*_)*(?P<file_id>[A-Za-z0-9]+?)(?:-\d+)?\.ipynb$"

# nbgrader runs the `alembic` executable that sits beside this interpreter (also when the venv
# is not activated), and kernels must not download anything.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


# nbgrader's gradebook triggers SQLAlchemy autoflush warnings that say nothing to an instructor.
warnings.filterwarnings("ignore", message=".*not in session.*")


def load_config(root: Path | None = None, timeout_s: int | None = None) -> Config:
    """The repository's ``nbgrader_config.py``, optionally re-rooted (tests grade in a temp dir).

    Args:
        root: a course folder holding ``solutions/`` (and the grading folders nbgrader makes);
            ``None`` keeps the repository itself.
        timeout_s: per-cell execution limit overriding the configured one.
    """
    config = PyFileConfigLoader("nbgrader_config.py", path=str(REPO)).load_config()
    if root is not None:
        config.CourseDirectory.root = str(root)
        config.CourseDirectory.db_url = "sqlite:///" + str(Path(root) / "grading" / "gradebook.db")
    if timeout_s is not None:
        config.Execute.timeout = timeout_s
    # Parallel graders (--jobs) write to one SQLite gradebook: wait for its lock, don't fail.
    if config.CourseDirectory.db_url.startswith("sqlite:") and "?" not in config.CourseDirectory.db_url:
        config.CourseDirectory.db_url += "?timeout=60"
    return config


@functools.cache
def _alembic_head() -> str:
    """The gradebook schema version, read in-process.

    nbgrader asks for it by starting ``alembic heads`` in a subprocess for every new
    gradebook (seconds on a loaded machine); the answer is a constant of the installed nbgrader.
    """
    import nbgrader
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(nbgrader.__file__).parent / "alembic"))
    return ScriptDirectory.from_config(cfg).get_current_head()


def make_api(config: Config):
    """An ``NbGraderAPI`` on ``config`` (its grading folder created)."""
    import nbgrader.api
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    nbgrader.api.get_alembic_version = _alembic_head

    coursedir = CourseDirectory(config=config)
    (Path(coursedir.root) / "grading").mkdir(parents=True, exist_ok=True)
    return NbGraderAPI(coursedir=coursedir, config=config)


def assignment_notebooks(root: Path) -> dict[str, list[str]]:
    """``{assignment: [notebook names without .ipynb]}`` found under ``root/solutions``."""
    found = {}
    for folder in sorted((Path(root) / "solutions").iterdir()):
        names = sorted(p.stem for p in folder.glob("*.ipynb"))
        if folder.is_dir() and names:
            found[folder.name] = names
    return found


def _check(result: dict, what: str) -> None:
    if not result["success"]:
        raise RuntimeError(f"{what} failed:\n{result.get('log', '')}\n{result.get('error', '')}")


def release(api, assignments: list[str] | None = None) -> None:
    """Generate the student version of each assignment into the release folder."""
    root = Path(api.coursedir.root)
    for assignment in assignments or list(assignment_notebooks(root)):
        _check(api.generate_assignment(assignment, force=True, create=True), f"generate_assignment {assignment}")


# ---------------------------------------------------------------------------------------------
# Collecting submissions


def _student_id(name: str) -> str:
    """A folder-safe student id (nbgrader uses it as a directory name)."""
    cleaned = re.sub(r"[^A-Za-z0-9@.+-]+", "-", name).strip("-.")
    if not cleaned:
        raise ValueError(f"cannot make a student id from folder name {name!r}")
    return cleaned


def collect(api, submissions: Path) -> list[tuple[str, str]]:
    """Copy a folder of per-student submissions into nbgrader's submitted folder.

    Accepts ``<student>/<assignment>/<name>.ipynb`` and ``<student>/<name>.ipynb``. Returns the
    ``(assignment, student)`` pairs found. Notebooks whose name matches no assignment are
    reported and skipped.
    """
    root = Path(api.coursedir.root)
    by_name = {name: a for a, names in assignment_notebooks(root).items() for name in names}
    submitted = Path(api.coursedir.format_path(api.coursedir.submitted_directory, ".", "."))
    pairs: set[tuple[str, str]] = set()
    students = sorted(p for p in Path(submissions).iterdir() if p.is_dir() and not p.name.startswith("."))
    if not students:
        raise SystemExit(
            f"no student folders in {submissions}: expected {submissions}/<student>/<notebook>.ipynb, "
            f"{submissions}/<student>/<assignment>/<notebook>.ipynb, or an LMS download with --assignment"
        )
    for folder in students:
        student = _student_id(folder.name)
        for nb in sorted(folder.rglob("*.ipynb")):
            if ".ipynb_checkpoints" in nb.parts:
                continue
            assignment = by_name.get(nb.stem)
            if assignment is None:
                print(f"skipped {nb}: no assignment has a notebook called {nb.name} "
                      f"(expected one of {sorted(n + '.ipynb' for n in by_name)})")
                continue
            dest = submitted / student / assignment / nb.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(nb, dest)
            pairs.add((assignment, student))
    return sorted(pairs)


def zip_collect(api, download: Path, assignment: str, lms_regex: str = DEFAULT_LMS_REGEX) -> list[tuple[str, str]]:
    """Unpack an LMS download (zip files and/or loose notebooks) with ``nbgrader zip_collect``."""
    root = Path(api.coursedir.root)
    archive = root / "grading" / "downloaded" / assignment / "archive"
    shutil.rmtree(archive.parent, ignore_errors=True)
    archive.mkdir(parents=True)
    files = [download] if Path(download).is_file() else sorted(p for p in Path(download).iterdir() if p.is_file())
    for f in files:
        shutil.copyfile(f, archive / f.name)
    nbgrader = Path(sys.executable).with_name("nbgrader")
    subprocess.run(
        [str(nbgrader), "zip_collect", assignment, "--force", "--strict",
         "--ZipCollectApp.downloaded_directory=" + os.path.join("grading", "downloaded"),
         "--FileNameCollectorPlugin.named_regexp=" + lms_regex,
         "--CourseDirectory.root=" + str(root),
         "--CourseDirectory.release_directory=" + api.coursedir.release_directory],
        cwd=REPO, check=True,
    )
    submitted = Path(api.coursedir.format_path(api.coursedir.submitted_directory, ".", "."))
    return sorted((assignment, s.name) for s in submitted.iterdir() if (s / assignment).is_dir())


# ---------------------------------------------------------------------------------------------
# Review flags: code that could fool a hidden test

def _python(source: str) -> ast.Module | None:
    """A cell's code as a syntax tree (IPython magics and shell lines dropped); None if it does not parse."""
    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def _bindings(tree: ast.Module) -> dict[str, str]:
    """Names a cell binds in the notebook's namespace (not its functions' locals).

    Maps each name to what an import binds it to (``"torch.nn"``, ``"course_lib.model.GPT"``), or
    to ``""`` for any other binding (assignment, ``def``, ``class``, loop variable).
    """
    names: dict[str, str] = {}

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = ""
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names[node.id] = ""
        elif isinstance(node, ast.Lambda):
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    for statement in tree.body:
        visit(statement)
    return names


def _attribute_root(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


@functools.cache
def _locked_names(source_path: Path) -> tuple[frozenset[str], dict[str, str], frozenset[str]]:
    """From an assignment's source notebook (read once per grading run): the grade ids of its
    locked cells, the names those cells bind (see :func:`_bindings`), and the names the model
    solution's answer cells bind."""
    import nbformat

    locked: dict[str, str] = {}
    allowed: set[str] = set()
    locked_ids: set[str] = set()
    for cell in nbformat.read(source_path, as_version=4).cells:
        meta = cell.metadata.get("nbgrader", {})
        tree = _python(cell.source) if cell.cell_type == "code" else None
        if tree is None:
            continue
        if meta.get("locked"):
            if meta.get("grade_id"):
                locked_ids.add(meta["grade_id"])
            locked.update(_bindings(tree))
        elif meta.get("solution"):
            allowed |= set(_bindings(tree))
    return frozenset(locked_ids), locked, frozenset(allowed)


def review_flags(source_path: Path, submitted_path: Path) -> list[str]:
    """Why a person should look at a submission, found by reading its code (nothing is run).

    nbgrader restores the locked and test cells before grading, but not the names they define:
    a student's cell that rebinds a name from a locked cell (a helper a hidden test calls, a
    reference result), assigns into something a locked cell imported
    (``torch.testing.assert_close = ...``, ``GPT.forward = ...``, also through ``setattr``) or
    calls ``globals``/``exec``/``eval`` could make a test pass. Names the model solution binds
    in its own answer cells, and re-imports of the same object, are not flagged.
    """
    import nbformat

    locked_ids, locked, allowed = _locked_names(Path(source_path))
    try:
        submitted = nbformat.read(submitted_path, as_version=4)
    except Exception:  # an unreadable submission fails grading with its own error
        return []
    imported = {name for name, target in locked.items() if target}  # modules, classes, functions
    flags: list[str] = []
    for index, cell in enumerate(submitted.cells, start=1):
        if cell.cell_type != "code" or cell.metadata.get("nbgrader", {}).get("grade_id") in locked_ids:
            continue  # locked and test cells are replaced by the source's before grading
        tree = _python(cell.source)
        if tree is None:
            continue
        where = f"cell {index}"
        for name, target in sorted(_bindings(tree).items()):
            if name in locked and name not in allowed and not (target and target == locked[name]):
                flags.append(f"{where} redefines {name!r} from a locked cell")
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                if isinstance(target, ast.Attribute) and _attribute_root(target) in imported:
                    flags.append(f"{where} assigns {ast.unparse(target)}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in ("globals", "exec", "eval") or (
                        node.func.id == "setattr" and node.args and _attribute_root(node.args[0]) in imported):
                    flags.append(f"{where} calls {node.func.id}()")
    return list(dict.fromkeys(flags))


# ---------------------------------------------------------------------------------------------
# Grading


@dataclass
class Outcome:
    """One student's result on one assignment.

    ``score`` counts every point awarded so far (autograded tests, written answers left blank
    score 0); ``pending`` is the points of written answers that wait for a person
    (``nbgrader formgrader``); ``seconds`` is the autograding time; ``review`` lists the
    places in the student's code a person should look at (:func:`review_flags`).
    """

    assignment: str
    student: str
    ok: bool
    score: float = 0.0
    max_score: float = 0.0
    pending: float = 0.0
    seconds: float = 0.0
    error: str = ""
    feedback: str = ""
    review: list[str] = field(default_factory=list)


def cell_scores(api, assignment: str, student: str) -> dict[str, tuple[float | None, float, bool]]:
    """``{grade cell id: (score or None if a person must grade it, max points, needs manual grade)}``."""
    with api.gradebook as gb:
        submission = gb.find_submission(assignment, student)
        return {g.name: (g.score if not g.needs_manual_grade else None, g.max_score, g.needs_manual_grade)
                for notebook in submission.notebooks for g in notebook.grades}


def _last_error_line(result: dict) -> str:
    text = (result.get("error") or result.get("log") or "").strip().splitlines()
    errors = [line for line in text if "ERROR" in line or "Error" in line]
    return (errors or text or ["unknown error"])[-1][:300]


def grade_one(api, assignment: str, student: str) -> Outcome:
    """Autograde one submission and write its feedback; never raises for a bad submission."""
    root = Path(api.coursedir.root)
    log_dir = root / "grading" / "logs" / assignment
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    result = api.autograde(assignment, student, force=True, create=True)
    seconds = time.monotonic() - start
    (log_dir / f"{student}.log").write_text((result.get("log") or "") + (result.get("error") or ""))
    source = Path(api.coursedir.format_path(api.coursedir.source_directory, ".", assignment))
    submitted = Path(api.coursedir.format_path(api.coursedir.submitted_directory, student, assignment))
    review = [flag for name in assignment_notebooks(root)[assignment]
              for flag in review_flags(source / f"{name}.ipynb", submitted / f"{name}.ipynb")]
    if not result["success"]:
        return Outcome(assignment, student, ok=False, seconds=seconds, error=_last_error_line(result),
                       review=review)
    cells = cell_scores(api, assignment, student).values()
    feedback = api.generate_feedback(assignment, student, force=True)
    path = ""
    if feedback["success"]:
        folder = Path(api.coursedir.format_path(api.coursedir.feedback_directory, student, assignment))
        path = ", ".join(str(p.relative_to(root)) for p in sorted(folder.glob("*.html")))
    return Outcome(
        assignment, student, ok=True,
        score=sum(score or 0.0 for score, _, _ in cells),
        max_score=sum(top for _, top, _ in cells),
        pending=sum(top for _, top, manual in cells if manual),
        seconds=seconds, feedback=path,
        error="" if feedback["success"] else "feedback: " + _last_error_line(feedback),
        review=review,
    )


def write_csv(outcomes: list[Outcome], path: Path) -> None:
    """One row per (student, assignment): points so far, maximum, points waiting for a person, status,
    and the places in the code a person should review."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "assignment", "status", "score", "max_score", "manual_points_pending",
                    "feedback", "error", "review"])
        for o in sorted(outcomes, key=lambda o: (o.student, o.assignment)):
            w.writerow([o.student, o.assignment, "graded" if o.ok else "FAILED",
                        f"{o.score:g}" if o.ok else "", f"{o.max_score:g}" if o.ok else "",
                        f"{o.pending:g}" if o.ok else "", o.feedback, o.error, "; ".join(o.review)])


def summary(outcomes: list[Outcome]) -> str:
    """A short table: per assignment, how many were graded or failed, and the mean score."""
    lines = [f"{'assignment':<18}{'graded':>7}{'failed':>7}{'mean score':>16}{'to grade by hand':>18}"]
    for assignment in sorted({o.assignment for o in outcomes}):
        rows = [o for o in outcomes if o.assignment == assignment]
        graded = [o for o in rows if o.ok]
        mean = sum(o.score for o in graded) / len(graded) if graded else float("nan")
        top = max((o.max_score for o in graded), default=float("nan"))
        pending = sum(o.pending > 0 for o in graded)
        lines.append(f"{assignment:<18}{len(graded):>7}{len(rows) - len(graded):>7}"
                     f"{f'{mean:.2f} / {top:g}':>16}{f'{pending} students':>18}")
    for o in outcomes:
        if not o.ok or o.error:
            lines.append(f"  {o.student}/{o.assignment}: {'FAILED ' if not o.ok else ''}{o.error}")
    flagged = [o for o in outcomes if o.review]
    if flagged:
        lines.append(f"{len(flagged)} submission(s) to review (code that could fool a test; see the CSV's review column):")
        lines += [f"  {o.student}/{o.assignment}: {'; '.join(o.review)}" for o in flagged]
    return "\n".join(lines)


def submission_timeout(api, assignment: str) -> float:
    """Seconds a grader process may take to answer for one submission of ``assignment``.

    Every code cell may run for the configured cell timeout; the kernel's start, the restore of the
    test cells and the feedback page get a fixed allowance on top.
    """
    import nbformat

    source = Path(api.coursedir.format_path(api.coursedir.source_directory, ".", assignment))
    cells = sum(sum(c.cell_type == "code" for c in nbformat.read(nb, as_version=4).cells)
                for nb in sorted(source.glob("*.ipynb")))
    return STARTUP_ALLOWANCE_S + cells * float(api.config.Execute.timeout)


STARTUP_ALLOWANCE_S = 180.0


def worker_command(api) -> list[str]:
    """The command line of one ``grade-worker`` process for ``api``'s course folder and settings."""
    return [sys.executable, __file__, "--root", str(api.coursedir.root), "grade-worker",
            "--release-directory", api.coursedir.release_directory,
            "--cell-timeout", str(api.config.Execute.timeout)]


class _Worker:
    """One ``grade-worker`` process; its answers are read by a thread, so every wait has a deadline."""

    def __init__(self, command: list[str], log) -> None:
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     text=True, cwd=REPO)
        self.answers: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.answers.put(line)
        self.answers.put("")  # end of output: the process died or closed its stdout

    def ask(self, pair: tuple[str, str], timeout_s: float) -> str | None:
        """Send one submission; its JSON answer, ``""`` if the process died, ``None`` after ``timeout_s``."""
        try:
            self.proc.stdin.write(json.dumps(list(pair)) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return ""
        try:
            return self.answers.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def kill(self) -> None:
        self.proc.kill()  # its kernel notices that its parent is gone and exits too
        self.proc.wait()

    def close(self, timeout_s: float = 60) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=timeout_s)
        except (subprocess.TimeoutExpired, OSError):
            self.kill()


def _grade_with_workers(api, pairs: list[tuple[str, str]], jobs: int, report, command: list[str] | None = None,
                        timeout_s: float | None = None) -> dict[tuple[str, str], Outcome]:
    """Grade ``pairs`` in ``jobs`` worker processes (``grade-worker``), each taking the next pair when free.

    A worker reads one JSON ``[assignment, student]`` per line and answers one JSON outcome per
    line; its other output goes to ``grading/logs/worker-<k>.log``. No wait is unbounded: a worker
    that dies, or gives no answer within ``timeout_s`` (default :func:`submission_timeout`: stuck
    in a kernel's start, say), fails only the submission it held and is replaced.
    """
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for pair in pairs:
        todo.put(pair)
    done: dict[tuple[str, str], Outcome] = {}
    lock = threading.Lock()
    command = command or worker_command(api)
    logs = Path(api.coursedir.root) / "grading" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    limits = {a: timeout_s or submission_timeout(api, a) for a in {a for a, _ in pairs}
              if (Path(api.coursedir.root) / api.coursedir.source_directory / a).is_dir()}

    def work(k: int) -> None:
        with open(logs / f"worker-{k}.log", "w") as log:
            worker = None
            while True:
                try:
                    assignment, student = todo.get_nowait()
                except queue.Empty:
                    break
                if worker is None:
                    worker = _Worker(command, log)
                limit = limits.get(assignment, timeout_s or STARTUP_ALLOWANCE_S)
                line = worker.ask((assignment, student), limit)
                if line:
                    outcome = Outcome(**json.loads(line))
                else:  # dead or silent: this submission fails, the next one gets a new worker
                    worker.kill()
                    worker = None
                    why = "grader process died" if line == "" else f"no result within {limit:.0f} s, grader process stopped"
                    outcome = Outcome(assignment, student, ok=False, error=f"{why} (see {log.name})")
                with lock:
                    done[(assignment, student)] = outcome
                    report(len(done), outcome)
            if worker is not None:
                worker.close()

    with ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(work, k) for k in range(jobs)]:
            future.result()
    return done


def grade_worker(api) -> None:
    """The ``grade-worker`` loop: grade each ``[assignment, student]`` read from stdin, answer in JSON."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything else printed goes to the log
    for line in sys.stdin:
        assignment, student = json.loads(line)
        answers.write(json.dumps(asdict(grade_one(api, assignment, student))) + "\n")
        answers.flush()


def grade_all(api, pairs: list[tuple[str, str]], jobs: int = 1, timeout_s: float | None = None) -> list[Outcome]:
    """Grade every ``(assignment, student)`` pair, ``jobs`` at a time, printing progress.

    Returns the outcomes in the order of ``pairs``. The submissions are graded by ``jobs`` worker
    processes (one by default), so that a submission that hangs anywhere (even before its first
    cell runs) is stopped after ``timeout_s`` (default :func:`submission_timeout`) and reported as
    failed while grading goes on. The distributed exercise's kernels start processes of their
    own, so keep ``jobs`` at or below half the CPU cores.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")

    def report(i: int, outcome: Outcome) -> None:
        status = (f"{outcome.score:g}/{outcome.max_score:g}" + (f" ({outcome.pending:g} to grade by hand)"
                  if outcome.pending else "") if outcome.ok else "FAILED: " + outcome.error)
        print(f"[{i}/{len(pairs)}] {outcome.student} {outcome.assignment}: {status}", flush=True)

    done = _grade_with_workers(api, pairs, jobs, report, timeout_s=timeout_s)
    return [done[pair] for pair in pairs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="course folder holding solutions/ (default: this repository)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("release", help="regenerate assessments/ from solutions/")
    g = sub.add_parser("grade", help="autograde a folder of submissions or an LMS download")
    g.add_argument("submissions", type=Path)
    g.add_argument("--assignment", help="the assignment of an LMS download (zip or flat folder)")
    g.add_argument("--lms-regex", default=DEFAULT_LMS_REGEX,
                   help="regex with (?P<student_id>...) and (?P<file_id>...) for LMS file names")
    g.add_argument("--csv", type=Path, default=None, help="default: <root>/grading/grades.csv")
    g.add_argument("--jobs", type=int, default=1,
                   help="submissions graded at once, by that many worker processes (at most half the CPU cores)")
    g.add_argument("--timeout", type=float, default=None,
                   help="seconds one submission may take (default: the cell timeout per code cell + 180 s)")
    worker = sub.add_parser("grade-worker", help="grade collected submissions named on stdin (used by --jobs)")
    worker.add_argument("--release-directory", default=None)
    worker.add_argument("--cell-timeout", type=int, default=None)
    args = parser.parse_args(argv)

    if args.root is not None and not (args.root / "solutions").is_dir():
        parser.error(f"--root {args.root} has no solutions/ folder (copy or clone the course's solutions/ there)")
    if args.command == "grade-worker":
        api = make_api(load_config(args.root, timeout_s=args.cell_timeout))
        if args.release_directory:
            api.coursedir.release_directory = args.release_directory
        grade_worker(api)
        return 0
    if args.command == "grade" and args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    api = make_api(load_config(args.root))
    root = Path(api.coursedir.root)
    if args.command == "release":
        release(api)
        print(f"released {', '.join(assignment_notebooks(root))} into {root / api.coursedir.release_directory}/")
        return 0

    if not args.submissions.exists():
        parser.error(f"{args.submissions} does not exist")
    # Record the current tests in the gradebook; the student versions go to a scratch folder so
    # that grading never rewrites the committed assessments/.
    api.coursedir.release_directory = os.path.join("grading", "release")
    release(api)
    lms = args.submissions.is_file() or not any(p.is_dir() for p in args.submissions.iterdir())
    if lms:
        if not args.assignment:
            parser.error("an LMS download (a zip, or a folder of files) needs --assignment / ASSIGNMENT=...")
        pairs = zip_collect(api, args.submissions, args.assignment, args.lms_regex)
    else:
        pairs = collect(api, args.submissions)
    if not pairs:
        print("no submissions found")
        return 1
    outcomes = grade_all(api, pairs, jobs=args.jobs, timeout_s=args.timeout)
    csv_path = args.csv or root / "grading" / "grades.csv"
    write_csv(outcomes, csv_path)
    print()
    print(summary(outcomes))
    print(f"\ngrades: {csv_path}\nfeedback: {root / api.coursedir.feedback_directory}/")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
