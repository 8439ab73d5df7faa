"""Release and autograde the course's graded work with nbgrader (``make release``, ``make grade``).

    python scripts/grade.py release
        Regenerate ``assessments/<assignment>/<name>.ipynb`` (student versions: solutions and
        hidden tests removed) from ``solutions/`` and record the tests in the gradebook.

    python scripts/grade.py grade SUBMISSIONS [--assignment A] [--lms-regex REGEX]
        Autograde every submission found in SUBMISSIONS, write feedback HTML and a grades CSV
        under ``grading/``, and print a summary. SUBMISSIONS may be laid out as

        * ``SUBMISSIONS/<student>/<assignment>/<name>.ipynb`` (nbgrader's own layout),
        * ``SUBMISSIONS/<student>/<name>.ipynb`` (the assignment is found from the notebook name),
        * an LMS download (a ``.zip`` file, or a folder of zips and/or loose notebooks whose
          file names carry the student id) for one ``--assignment``: it goes through
          ``nbgrader zip_collect`` with ``--lms-regex`` (default: Canvas-style
          ``<student>_..._<name>.ipynb``).

        One broken submission (invalid file, infinite loop, crashed kernel) is reported and
        skipped; every other submission is still graded. Exit status 1 if any failed.

Everything nbgrader writes goes to the git-ignored ``grading/`` folder (see
``nbgrader_config.py``). The functions here are also what ``tests/test_grading.py`` drives.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

REPO = Path(__file__).resolve().parent.parent

# Canvas names downloads "<login>_<late?>_<user id>_<submission id>_<original name>"; a
# re-submission of quiz.ipynb may arrive as "quiz-1.ipynb".
DEFAULT_LMS_REGEX = r"^(?P<student_id>[^_]+)_(?:[^_]*_)*(?P<file_id>[A-Za-z0-9]+?)(?:-\d+)?\.ipynb$"

# nbgrader runs the `alembic` executable that sits beside this interpreter (also when the venv
# is not activated), and kernels must not download anything.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


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
    return config


@functools.lru_cache(maxsize=None)
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
# Grading


@dataclass
class Outcome:
    """One student's result on one assignment."""

    assignment: str
    student: str
    ok: bool
    auto_score: float = 0.0
    auto_max: float = 0.0
    manual_max: float = 0.0
    error: str = ""
    feedback: str = ""


def _scores(api, assignment: str, student: str) -> tuple[float, float, float]:
    """(autograded score, autograded maximum, points awaiting a human) for one submission."""
    auto, auto_max, manual = 0.0, 0.0, 0.0
    with api.gradebook as gb:
        submission = gb.find_submission(assignment, student)
        for notebook in submission.notebooks:
            for grade in notebook.grades:
                if grade.cell.cell_type == "markdown" or grade.needs_manual_grade and grade.auto_score is None:
                    manual += grade.max_score
                else:
                    auto += grade.auto_score or 0.0
                    auto_max += grade.max_score
    return auto, auto_max, manual


def _last_error_line(result: dict) -> str:
    text = (result.get("error") or result.get("log") or "").strip().splitlines()
    errors = [line for line in text if "ERROR" in line or "Error" in line]
    return (errors or text or ["unknown error"])[-1][:300]


def grade_one(api, assignment: str, student: str) -> Outcome:
    """Autograde one submission and write its feedback; never raises for a bad submission."""
    root = Path(api.coursedir.root)
    log_dir = root / "grading" / "logs" / assignment
    log_dir.mkdir(parents=True, exist_ok=True)
    result = api.autograde(assignment, student, force=True, create=True)
    (log_dir / f"{student}.log").write_text((result.get("log") or "") + (result.get("error") or ""))
    if not result["success"]:
        return Outcome(assignment, student, ok=False, error=_last_error_line(result))
    auto, auto_max, manual = _scores(api, assignment, student)
    feedback = api.generate_feedback(assignment, student, force=True)
    path = ""
    if feedback["success"]:
        folder = Path(api.coursedir.format_path(api.coursedir.feedback_directory, student, assignment))
        path = ", ".join(str(p.relative_to(root)) for p in sorted(folder.glob("*.html")))
    return Outcome(assignment, student, ok=True, auto_score=auto, auto_max=auto_max, manual_max=manual,
                   feedback=path, error="" if feedback["success"] else "feedback: " + _last_error_line(feedback))


def write_csv(outcomes: list[Outcome], path: Path) -> None:
    """One row per (student, assignment): autograded points, points left for a human, status."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "assignment", "status", "auto_score", "auto_max", "manual_points_pending",
                    "feedback", "error"])
        for o in sorted(outcomes, key=lambda o: (o.student, o.assignment)):
            w.writerow([o.student, o.assignment, "graded" if o.ok else "FAILED",
                        f"{o.auto_score:g}" if o.ok else "", f"{o.auto_max:g}" if o.ok else "",
                        f"{o.manual_max:g}" if o.ok else "", o.feedback, o.error])


def summary(outcomes: list[Outcome]) -> str:
    """A short table: per assignment, how many were graded, failed, and the mean score."""
    lines = [f"{'assignment':<18}{'graded':>7}{'failed':>7}{'mean auto score':>18}{'manual pts pending':>20}"]
    for assignment in sorted({o.assignment for o in outcomes}):
        rows = [o for o in outcomes if o.assignment == assignment]
        graded = [o for o in rows if o.ok]
        mean = sum(o.auto_score for o in graded) / len(graded) if graded else float("nan")
        top = graded[0].auto_max if graded else float("nan")
        manual = graded[0].manual_max if graded else 0
        lines.append(f"{assignment:<18}{len(graded):>7}{len(rows) - len(graded):>7}"
                     f"{f'{mean:.2f} / {top:g}':>18}{manual:>20g}")
    for o in outcomes:
        if not o.ok or o.error:
            lines.append(f"  {o.student}/{o.assignment}: {'FAILED ' if not o.ok else ''}{o.error}")
    return "\n".join(lines)


def grade_all(api, pairs: list[tuple[str, str]]) -> list[Outcome]:
    """Grade every ``(assignment, student)`` pair, one at a time, printing progress."""
    outcomes = []
    for i, (assignment, student) in enumerate(pairs, start=1):
        outcome = grade_one(api, assignment, student)
        status = f"{outcome.auto_score:g}/{outcome.auto_max:g}" if outcome.ok else "FAILED: " + outcome.error
        print(f"[{i}/{len(pairs)}] {student} {assignment}: {status}", flush=True)
        outcomes.append(outcome)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("release", help="regenerate assessments/ from solutions/")
    g = sub.add_parser("grade", help="autograde a folder of submissions or an LMS download")
    g.add_argument("submissions", type=Path)
    g.add_argument("--assignment", help="the assignment of an LMS download (zip or flat folder)")
    g.add_argument("--lms-regex", default=DEFAULT_LMS_REGEX,
                   help="regex with (?P<student_id>...) and (?P<file_id>...) for LMS file names")
    g.add_argument("--csv", type=Path, default=REPO / "grading" / "grades.csv")
    args = parser.parse_args(argv)

    api = make_api(load_config())
    if args.command == "release":
        release(api)
        print(f"released {', '.join(assignment_notebooks(REPO))} into {api.coursedir.release_directory}/")
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
    outcomes = grade_all(api, pairs)
    write_csv(outcomes, args.csv)
    print()
    print(summary(outcomes))
    print(f"\ngrades: {args.csv}\nfeedback: {Path(api.coursedir.root) / 'grading' / 'feedback'}/")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
