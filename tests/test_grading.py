"""The autograder, checked like code: nbgrader itself releases, validates and grades the course's
assignments, and every kind of submission must get exactly the points it deserves.

Everything runs in a temporary course folder (a copy of ``solutions/``) through nbgrader's
Python API (``scripts/grade.py`` wraps it; the CLI is only used for ``zip_collect``).
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import nbformat
import pytest

# The module-scoped `graded` fixture autogrades every scenario (about 16 submissions) in the set-up of its first
# test: 3-5 minutes on a loaded two-core machine, more than the suite's default per-test limit.
pytestmark = [pytest.mark.grading, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("course_grade", REPO / "scripts" / "grade.py")
grade = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = grade  # dataclasses look their module up while the class is built
_spec.loader.exec_module(grade)

ASSIGNMENTS = grade.assignment_notebooks(REPO)
QUIZ_TIMEOUT_S = 10  # per cell, for the quiz's students (the infinite loop must not wait 180 s)

# A partial submission per assignment: the answer cells it solves, the test cells those answers
# (and only those) must pass, and one test cell of an unsolved part that the student "fixed"
# by editing the test itself.
PARTIAL = {
    "quiz": ({f"q{i:02d}-answer" for i in range(1, 6)}, {f"q{i:02d}-test" for i in range(1, 6)}, "q10-test"),
    "ex1_distributed": ({"pipeline-answer"}, {"pipeline-grads-test", "pipeline-bubble-test"}, "dp-grads-test"),
    "ex2_memory": ({"accumulate-answer", "checkpoint-answer"}, {"accumulate-test", "checkpoint-test"},
                   "step-test-fp16"),
    "ex3_peft": ({"lora-layer-answer"}, {"lora-layer-test", "lora-merge-test"}, "lora-model-test"),
}
EDITED_TEST_SOURCE = "# I fixed this test\nprint('all tests passed')"
SHADOW_SOURCE = "def check_step(*args, **kwargs):\n    pass"


def _nb_path(root: Path, folder: str, assignment: str) -> Path:
    (name,) = ASSIGNMENTS[assignment]
    return root / folder / assignment / f"{name}.ipynb"


def _meta(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


def _cells(nb) -> dict:
    return {_meta(c)["grade_id"]: c for c in nb.cells if "grade_id" in _meta(c)}


def _strip_markers(source: str) -> str:
    return "\n".join(line for line in source.splitlines()
                     if line.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION"))


def _regions(source: str, begin: str, end: str) -> list[str]:
    return re.findall(rf"{re.escape(begin)}\n(.*?){re.escape(end)}", source, flags=re.S)


def _points(assignment: str) -> dict[str, tuple[float, str]]:
    """{grade cell id: (points, cell type)} from the source notebook."""
    nb = nbformat.read(_nb_path(REPO, "solutions", assignment), as_version=4)
    return {_meta(c)["grade_id"]: (float(_meta(c)["points"]), c.cell_type) for c in nb.cells if _meta(c).get("grade")}


# ------------------------------------------------------------------------------------------
# Static checks of the sources and the committed release (no kernel)


@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_source_cells_carry_complete_nbgrader_metadata(assignment):
    nb = nbformat.read(_nb_path(REPO, "solutions", assignment), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    ids = [_meta(c)["grade_id"] for c in nb.cells if _meta(c)]
    assert len(ids) == len(set(ids)), "grade_ids must be unique"
    kinds = {"tests": 0, "answers": 0}
    for cell in nb.cells:
        m = _meta(cell)
        if not m:
            continue
        assert m["schema_version"] == 3 and {"grade", "solution", "locked", "grade_id", "task"} <= set(m)
        if m["grade"]:
            assert m["points"] > 0, f"{m['grade_id']} has no points"
        if m["grade"] and cell.cell_type == "code":  # an autograder test
            kinds["tests"] += 1
            assert m["locked"] and not m["solution"], f"{m['grade_id']} must be a locked test cell"
            assert "### BEGIN HIDDEN TESTS" in cell.source, f"{m['grade_id']} has no hidden tests"
            assert "### BEGIN SOLUTION" not in cell.source
        elif m["solution"]:  # an answer: autograded code, or a written answer graded by hand
            kinds["answers"] += 1
            assert not m["locked"] and "### BEGIN SOLUTION" in cell.source, m["grade_id"]
            assert m["grade"] == (cell.cell_type == "markdown"), f"{m['grade_id']}: only written answers are graded cells"
        else:
            assert m["locked"], f"{m['grade_id']}: instructions and set-up cells are locked"
    assert kinds["tests"] >= 3 and kinds["answers"] >= 3


@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_points_announced_to_students_match_the_metadata(assignment):
    title = nbformat.read(_nb_path(REPO, "solutions", assignment), as_version=4).cells[0].source
    points = _points(assignment).values()
    auto = sum(p for p, kind in points if kind == "code")
    written = sum(p for p, kind in points if kind == "markdown")
    if assignment == "quiz":
        assert f"{auto:g} questions, one point each" in title and written == 0
    else:
        announced = re.search(r"\((\d+) points \+ (\d+) for the analysis\)", title)
        assert announced and (int(announced[1]), int(announced[2])) == (auto, written), title.splitlines()[0]


BEYOND_THE_MODULE = ("12", "13", "14", "15", "16")  # profiling, attention memory, ZeRO, context parallelism, MoE


def _quiz() -> list[dict]:
    """The quiz's questions from the source: lesson, options (text by letter) and the key of each."""
    nb = nbformat.read(_nb_path(REPO, "solutions", "quiz"), as_version=4)
    cells = _cells(nb)
    questions = []
    for gid in sorted(g for g in cells if g.endswith("-question")):
        text = cells[gid].source
        answer = _regions(cells[gid.replace("-question", "-answer")].source, "### BEGIN SOLUTION", "### END SOLUTION")[0]
        questions.append({
            "id": gid[:3], "text": text, "lesson": re.search(r"\(lesson (\d\d)\b", text).group(1),
            "options": dict(re.findall(r"^- \*\*([A-Z])\.\*\* (.*)$", text, flags=re.M)),
            "key": ast.literal_eval(answer.split("=", 1)[1].strip()),
            "test": cells[gid.replace("-question", "-test")].source,
        })
    return questions


def test_quiz_covers_every_lesson_and_the_module_questions():
    questions = _quiz()
    assert len(questions) >= 30
    lessons = [q["lesson"] for q in questions]
    assert set(lessons) == {f"{i:02d}" for i in range(17)}
    for lesson in BEYOND_THE_MODULE:
        assert lessons.count(lesson) >= 2, f"lesson {lesson} needs at least two questions"
    module = [q for q in questions if "from the module" in q["text"]]
    for wanted in ("main challenges in training large language models", "gradient accumulation help",
                   "purpose of mixed precision training"):
        assert any(wanted in q["text"] for q in module), wanted
    for q in questions:
        assert "print('Explanation:'" in q["test"] and re.search(r"[Ll]esson \d\d", q["test"]), (
            f"{q['id']}: every answer explains itself and points to its lesson")
        keys = q["key"] if isinstance(q["key"], set) else {q["key"]}
        assert not any("all of the above" in q["options"].get(k, "").lower() for k in keys), q["id"]
    sets = [q for q in questions if isinstance(q["key"], set)]
    assert all(q["key"] != set(q["options"]) for q in sets), "'every option' must not be a set question's key"


def test_quiz_keys_are_spread_over_positions_and_lengths():
    """A student who picks the longest option, or always the same letter, scores near chance."""
    single = [q for q in _quiz() if isinstance(q["key"], str)]
    assert len(single) >= 12
    positions = Counter(q["key"] for q in single)
    letters = sorted({letter for q in single for letter in q["options"]})
    assert max(positions[x] for x in letters) - min(positions[x] for x in letters) <= 1, positions
    # length rank of the key: how many options are strictly shorter (0 = shortest, 3 = longest of four)
    ranks = Counter(sum(len(o) < len(q["options"][q["key"]]) for o in q["options"].values()) for q in single)
    assert max(ranks.values()) <= len(single) / 4 + 1, f"length ranks of the keys: {dict(ranks)}"
    always_longest = sum(all(len(q["options"][q["key"]]) >= len(o) for o in q["options"].values()) for q in single)
    assert always_longest <= len(single) / 3, f"the key is the longest option in {always_longest} questions"


def _lesson_output_text(lesson: str = "[0-9][0-9]") -> str:
    """Every text output committed in the lesson notebooks (streams, text/* and JSON data; no images).

    ``lesson`` ("07") limits it to one lesson's notebook.
    """
    parts = []
    for path in sorted((REPO / "notebooks").glob(f"{lesson}_*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            for out in cell.get("outputs", []):
                parts.append(out.get("text", ""))
                parts += [v if isinstance(v, str) else json.dumps(v) for k, v in out.get("data", {}).items()
                          if k.startswith("text/") or k.endswith("json")]
    return "\n".join(parts)


def test_quiz_number_answers_need_a_calculation_no_lesson_prints():
    """No numeric key is printed by the lesson its question belongs to (where a copied answer would be).

    Other lessons are not searched: their live measurements (timings, losses) change on every
    re-execution and match a three-digit key by coincidence, not by copying.
    """
    numeric = [q for q in _quiz() if isinstance(q["key"], (int, float))]
    assert len(numeric) >= 8, "at least eight transfer questions with a calculated answer"
    assert "bubble" in _lesson_output_text("02"), "the lessons' outputs were not found: this test would prove nothing"
    for q in numeric:
        printed = _lesson_output_text(q["lesson"])
        assert printed, f"{q['id']}: lesson {q['lesson']} has no committed outputs"
        v = float(q["key"])
        forms = {f"{v:g}", f"{v:.3g}", f"{v:.4g}"} | ({f"{v:,.0f}"} if v >= 1000 and v == int(v) else set())
        for form in forms:
            found = re.search(rf"(?<![\d.]){re.escape(form)}(?![\d])", printed)
            assert not found, f"{q['id']}: its answer {form} is printed by a lesson: {printed[found.start() - 80:found.end()]!r}"


def test_exercise_3_says_what_replacing_modules_during_named_modules_does():
    """Exercise 3's note on the tutorial's pattern (replace children while `named_modules()` walks), checked."""
    import torch.nn as nn

    from course_lib.model import GPT, GPTConfig

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    def walk_and_replace(model, wanted, make):
        visited = []
        for name, module in model.named_modules():
            visited.append(name)
            if name.rsplit(".", 1)[-1] == wanted:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, make(module))
        return visited

    config = GPTConfig.from_preset("nano", vocab_size=40)
    # swapping single layers in place works: every target is replaced, the walk never enters a wrapper
    model = GPT(config)
    visited = walk_and_replace(model, "q_proj", Wrapper)
    assert all(isinstance(b.attn.q_proj, Wrapper) for b in model.blocks)
    assert not any(name.endswith(".inner") for name in visited)
    # the walk goes on into the replaced module's children, not its replacement's
    model = GPT(config)
    visited = walk_and_replace(model, "attn", Wrapper)
    assert "blocks.0.attn.q_proj" in visited and "blocks.0.attn.inner" not in visited
    # adding a child to a module whose children the walk is going through raises
    model = GPT(config)
    with pytest.raises(RuntimeError, match="dictionary changed size during iteration"):
        for name, _ in model.named_modules():
            if name.endswith("q_proj"):
                model.get_submodule(name.rpartition(".")[0]).add_module("q_extra", nn.Identity())
    text = nbformat.read(_nb_path(REPO, "solutions", "ex3_peft"), as_version=4)
    part2 = next(c.source for c in text.cells if _meta(c).get("grade_id") == "md-002")
    assert "happens to work" in part2 and "dictionary changed size during iteration" in part2.replace("\n", " ")


@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_release_hides_solutions_and_hidden_tests(assignment):
    source_text = _nb_path(REPO, "solutions", assignment).read_text()
    release_nb = nbformat.read(_nb_path(REPO, "assessments", assignment), as_version=4)
    release = "\n".join(c.source for c in release_nb.cells)
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in release
    source_nb = nbformat.read(_nb_path(REPO, "solutions", assignment), as_version=4)
    secret, public = [], []
    for cell in source_nb.cells:
        regions = (_regions(cell.source, "### BEGIN SOLUTION", "### END SOLUTION")
                   + _regions(cell.source, "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"))
        secret += regions
        outside = cell.source
        for r in regions:
            outside = outside.replace(r, "")
        public.append(outside)
    public_text = "\n".join(public)
    distinctive = {line.strip() for r in secret for line in r.splitlines()
                   if len(line.strip()) >= 20 and line.strip() not in public_text}
    assert secret and distinctive
    leaked = [line for line in distinctive if line in release]
    assert not leaked, f"solution or hidden-test lines in the release: {leaked[:3]}"
    assert "### BEGIN SOLUTION" in source_text


@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_review_flags_are_silent_on_the_solution_and_the_blank_release(assignment):
    source = _nb_path(REPO, "solutions", assignment)
    assert grade.review_flags(source, source) == []
    assert grade.review_flags(source, _nb_path(REPO, "assessments", assignment)) == []


def test_review_flags_name_each_way_to_fool_a_test(tmp_path):
    source = _nb_path(REPO, "solutions", "ex2_memory")
    nb = nbformat.read(source, as_version=4)
    added = [
        "import torch\nfrom course_lib.model import GPT",  # re-imports of the same objects: harmless
        "def check_step(*args, **kwargs):\n    pass",
        "torch.testing.assert_close = lambda *args, **kwargs: None",
        "def patch():\n    setattr(GPT, 'forward', None)",
        "globals()['window'] = []",
        "from math import copysign as copy",  # a different object under a locked name
        "%%time\nx = (",  # does not parse: graded as it is, not flagged
    ]
    nb.cells += [nbformat.v4.new_code_cell(code) for code in added]
    path = tmp_path / "memory.ipynb"
    nbformat.write(nb, path)
    first = len(nb.cells) - len(added) + 1  # 1-based index of the first added cell
    assert grade.review_flags(source, path) == [
        f"cell {first + 1} redefines 'check_step' from a locked cell",
        f"cell {first + 2} assigns torch.testing.assert_close",
        f"cell {first + 3} calls setattr()",
        f"cell {first + 4} calls globals()",
        f"cell {first + 5} redefines 'copy' from a locked cell",
    ]
    (tmp_path / "broken.ipynb").write_text("{ not a notebook")
    assert grade.review_flags(source, tmp_path / "broken.ipynb") == []


# ------------------------------------------------------------------------------------------
# nbgrader itself: release, validate, autograde


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A temporary course folder: solutions/ copied, student versions generated by nbgrader."""
    root = tmp_path_factory.mktemp("course")
    shutil.copytree(REPO / "solutions", root / "solutions")
    api = grade.make_api(grade.load_config(root))
    grade.release(api)
    return root, api


@pytest.mark.slow
def test_committed_assessments_equal_a_fresh_release(course):
    root, _ = course
    fresh = sorted(p.relative_to(root / "assessments") for p in (root / "assessments").rglob("*") if p.is_file())
    committed = sorted(p.relative_to(REPO / "assessments") for p in (REPO / "assessments").rglob("*") if p.is_file())
    assert fresh == committed, "assessments/ is out of date: run `make release`"
    for rel in fresh:
        if rel.suffix != ".ipynb":
            assert (root / "assessments" / rel).read_bytes() == (REPO / "assessments" / rel).read_bytes()
            continue
        a = nbformat.read(root / "assessments" / rel, as_version=4)
        b = nbformat.read(REPO / "assessments" / rel, as_version=4)
        assert a.metadata.get("kernelspec") == b.metadata.get("kernelspec")
        assert len(a.cells) == len(b.cells), f"{rel}: run `make release`"
        for x, y in zip(a.cells, b.cells, strict=True):
            assert (x.cell_type, x.source, x.metadata) == (y.cell_type, y.source, y.metadata), (
                f"{rel}: cell {_meta(x).get('grade_id')} differs from a fresh release: run `make release`")
            assert not y.get("outputs"), f"{rel}: a released cell has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_source_notebook_validates(course, assignment):
    from nbgrader.validator import Validator

    root, api = course
    results = Validator(config=api.config).validate(str(_nb_path(root, "solutions", assignment)))
    assert results == {}, json.dumps(results, indent=1)[:3000]


@pytest.mark.slow
@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_blank_release_fails_every_test(course, assignment):
    from nbgrader.validator import Validator

    root, api = course
    results = Validator(config=api.config, invert=True).validate(str(_nb_path(root, "assessments", assignment)))
    assert results == {}, f"tests that pass on the blank notebook: {json.dumps(results, indent=1)[:3000]}"


def _write(nb, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def _submissions(root: Path, out: Path) -> list[tuple[str, str]]:
    """Write every scenario's notebooks under out/<student>/<name>.ipynb; return the grading order."""
    order = []
    # the quiz's hard cases go first: the students after them must still be graded
    quiz = nbformat.read(_nb_path(root, "solutions", "quiz"), as_version=4)

    def quiz_variant(student, edit):
        nb = nbformat.from_dict(json.loads(json.dumps(quiz)))
        edit(nb, _cells(nb))
        _write(nb, out / student / "quiz.ipynb")
        order.append(("quiz", student))

    quiz_variant("loop", lambda nb, c: c["q01-answer"].update(source="while True:\n    pass"))

    def broken(nb, c):
        c["q03-answer"].source = 'q3 = "D'  # a syntax error
        nb.cells.remove(c["q02-test"])  # a deleted test cell comes back at grading time
        nb.cells.remove(c["q04-answer"])  # a deleted answer scores nothing

    quiz_variant("broken", broken)
    (out / "garbage").mkdir()
    (out / "garbage" / "quiz.ipynb").write_text("{ this is not a notebook")
    order.append(("quiz", "garbage"))

    def edited_test(nb, c):
        key = ast.literal_eval(_regions(c["q06-answer"].source, "### BEGIN SOLUTION", "### END SOLUTION")[0].split("=")[1].strip())
        c["q06-answer"].source = f'q6 = "{"A" if key != "A" else "B"}"'  # wrong ...
        c["q06-test"].source = EDITED_TEST_SOURCE  # ... and the test "fixed" to pass it

    quiz_variant("tamper", edited_test)

    for assignment in sorted(ASSIGNMENTS):
        (name,) = ASSIGNMENTS[assignment]
        source = nbformat.read(_nb_path(root, "solutions", assignment), as_version=4)
        blank = nbformat.read(_nb_path(root, "assessments", assignment), as_version=4)
        _write(source, out / "solution" / f"{name}.ipynb")
        _write(blank, out / "blank" / f"{name}.ipynb")
        answers, _, tampered = PARTIAL[assignment]
        partial = nbformat.from_dict(json.loads(json.dumps(blank)))
        solved = _cells(source)
        for gid, cell in _cells(partial).items():
            if gid in answers:
                cell.source = _strip_markers(solved[gid].source)
            elif gid == tampered:
                cell.source = EDITED_TEST_SOURCE
        _write(partial, out / "partial" / f"{name}.ipynb")
        order += [(assignment, "solution"), (assignment, "blank"), (assignment, "partial")]
    # a blank exercise 2 whose added cell replaces the helper the step tests call
    shadow = nbformat.read(_nb_path(root, "assessments", "ex2_memory"), as_version=4)
    after = next(i for i, c in enumerate(shadow.cells) if _meta(c).get("grade_id") == "step-reference")
    shadow.cells.insert(after + 1, nbformat.v4.new_code_cell(SHADOW_SOURCE))
    _write(shadow, out / "shadow" / "memory.ipynb")
    order.append(("ex2_memory", "shadow"))
    return order


@pytest.fixture(scope="module")
def graded(course, tmp_path_factory):
    """Autograde every scenario once; returns {(assignment, student): Outcome}."""
    root, api = course
    submissions = tmp_path_factory.mktemp("submissions")
    order = _submissions(root, submissions)
    collected = grade.collect(api, submissions)
    assert sorted(collected) == sorted(order)
    quiz_api = grade.make_api(grade.load_config(root, timeout_s=QUIZ_TIMEOUT_S))
    return {(a, s): grade.grade_one(quiz_api if a == "quiz" else api, a, s) for a, s in order}


def _scores(course, assignment, student):
    return grade.cell_scores(course[1], assignment, student)


@pytest.mark.slow
@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_solution_earns_full_marks_in_under_two_minutes(course, graded, assignment):
    outcome = graded[(assignment, "solution")]
    assert outcome.ok, outcome.error
    scores = _scores(course, assignment, "solution")
    for gid, (points, cell_type) in _points(assignment).items():
        score, top, manual = scores[gid]
        assert top == points
        if cell_type == "markdown":  # a written answer: waits for a person
            assert manual and score is None, gid
        else:
            assert score == points, f"{gid}: {score} of {points}"
    assert outcome.seconds < 120, f"autograding the solution took {outcome.seconds:.0f} s"


@pytest.mark.slow
@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_blank_release_earns_zero(course, graded, assignment):
    assert graded[(assignment, "blank")].ok
    scores = _scores(course, assignment, "blank")
    assert set(scores) == set(_points(assignment))
    assert all(score == 0 and not manual for score, _, manual in scores.values()), scores


@pytest.mark.slow
@pytest.mark.parametrize("assignment", sorted(ASSIGNMENTS))
def test_partial_submission_earns_exactly_its_parts(course, graded, assignment):
    _, passing, tampered = PARTIAL[assignment]
    outcome = graded[(assignment, "partial")]
    assert outcome.ok, outcome.error
    scores = _scores(course, assignment, "partial")
    points = _points(assignment)
    for gid, (score, top, _) in scores.items():
        assert score == (top if gid in passing else 0), f"{gid}: {score} of {top}"
    assert scores[tampered][0] == 0, "editing a test cell must not earn its points"
    assert outcome.score == sum(points[g][0] for g in passing) > 0


@pytest.mark.slow
def test_edited_test_cell_is_restored_and_earns_nothing(course, graded):
    scores = _scores(course, "quiz", "tamper")
    assert scores["q06-test"][0] == 0
    assert graded[("quiz", "tamper")].score == sum(p for p, _ in _points("quiz").values()) - 1
    autograded = nbformat.read(course[0] / "grading" / "autograded" / "tamper" / "quiz" / "quiz.ipynb", as_version=4)
    assert _cells(autograded)["q06-test"].source != EDITED_TEST_SOURCE


@pytest.mark.slow
def test_infinite_loop_is_stopped_scored_and_others_still_graded(course, graded):
    outcome = graded[("quiz", "loop")]
    assert outcome.ok, outcome.error
    scores = _scores(course, "quiz", "loop")
    assert scores["q01-test"][0] == 0
    assert outcome.score == sum(p for p, _ in _points("quiz").values()) - 1
    autograded = nbformat.read(course[0] / "grading" / "autograded" / "loop" / "quiz" / "quiz.ipynb", as_version=4)
    errors = [o.ename for o in _cells(autograded)["q01-answer"].outputs if o.output_type == "error"]
    assert errors, "the looping cell should carry the timeout error"
    assert outcome.seconds < 6 * QUIZ_TIMEOUT_S
    later = [k for k in graded if k != ("quiz", "loop")]
    assert all(graded[k].ok for k in later if k[1] != "garbage")


@pytest.mark.slow
def test_syntax_error_and_deleted_cells_are_graded(course, graded):
    outcome = graded[("quiz", "broken")]
    assert outcome.ok, outcome.error
    scores = _scores(course, "quiz", "broken")
    assert scores["q03-test"][0] == 0  # syntax error in its answer
    assert scores["q04-test"][0] == 0  # its answer cell was deleted
    assert scores["q02-test"][0] == 1  # the deleted test cell was put back and passed
    assert outcome.score == sum(p for p, _ in _points("quiz").values()) - 2


@pytest.mark.slow
def test_shadowed_helper_is_flagged_for_review(course, graded, tmp_path):
    shadow, blank = graded[("ex2_memory", "shadow")], graded[("ex2_memory", "blank")]
    assert shadow.ok and shadow.score > blank.score  # the fooled tests did pass ...
    assert any("redefines 'check_step'" in flag for flag in shadow.review)  # ... and a person is told
    assert not blank.review and not graded[("ex2_memory", "solution")].review
    grade.write_csv([shadow, blank], tmp_path / "grades.csv")
    rows = {r["student"]: r for r in csv.DictReader(open(tmp_path / "grades.csv"))}
    assert "check_step" in rows["shadow"]["review"] and rows["blank"]["review"] == ""
    assert "shadow/ex2_memory: cell" in grade.summary([shadow, blank])


@pytest.mark.slow
def test_unreadable_submission_fails_alone_with_a_reason(graded):
    outcome = graded[("quiz", "garbage")]
    assert not outcome.ok and outcome.error
    assert graded[("quiz", "tamper")].ok and graded[("quiz", "solution")].ok


@pytest.mark.slow
def test_feedback_explains_the_quiz_answers_and_csv_lists_everyone(course, graded, tmp_path):
    root, _ = course
    html = (root / graded[("quiz", "blank")].feedback).read_text()
    assert html.count("Explanation:") >= 15 and "6*N*D" in html.replace("&#42;", "*")
    for outcome in graded.values():
        if outcome.ok:
            assert outcome.feedback and (root / outcome.feedback).is_file()
    grade.write_csv(list(graded.values()), tmp_path / "grades.csv")
    rows = {(r["student"], r["assignment"]): r for r in csv.DictReader(open(tmp_path / "grades.csv"))}
    assert len(rows) == len(graded)
    assert rows[("garbage", "quiz")]["status"] == "FAILED"
    assert float(rows[("solution", "ex3_peft")]["manual_points_pending"]) == 3
    text = grade.summary(list(graded.values()))
    assert "garbage/quiz: FAILED" in text


@pytest.mark.slow
def test_make_grade_collects_an_lms_zip_download(tmp_path):
    """`make grade SUBMISSIONS=download.zip ASSIGNMENT=quiz` end to end, in a scratch course folder."""
    root = tmp_path / "course"
    shutil.copytree(REPO / "solutions", root / "solutions")
    download = tmp_path / "download.zip"
    with zipfile.ZipFile(download, "w") as z:
        z.write(_nb_path(REPO, "solutions", "quiz"), "alice_12345_678_quiz.ipynb")
        z.write(_nb_path(REPO, "assessments", "quiz"), "bob_LATE_23456_789_quiz-1.ipynb")
    code = grade.main(["--root", str(root), "grade", str(download), "--assignment", "quiz"])
    assert code == 0
    rows = {r["student"]: r for r in csv.DictReader(open(root / "grading" / "grades.csv"))}
    assert set(rows) == {"alice", "bob"}
    top = sum(p for p, _ in _points("quiz").values())
    assert float(rows["alice"]["score"]) == top and float(rows["bob"]["score"]) == 0
    assert not (root / "assessments").exists(), "grading must not rewrite the student versions"


@pytest.mark.slow
def test_parallel_grading_gives_the_sequential_scores(graded, tmp_path):
    """`make grade ... JOBS=2`: two worker processes share the gradebook and agree with one-at-a-time grading."""
    root = tmp_path / "course"
    shutil.copytree(REPO / "solutions", root / "solutions")
    submissions = tmp_path / "submissions"
    for assignment in ("quiz", "ex2_memory"):
        (name,) = ASSIGNMENTS[assignment]
        for student, folder in (("solution", "solutions"), ("blank", "assessments")):
            dest = submissions / student / f"{name}.ipynb"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_nb_path(REPO, folder, assignment), dest)
    assert grade.main(["--root", str(root), "grade", str(submissions), "--jobs", "2"]) == 0
    rows = {(r["student"], r["assignment"]): r for r in csv.DictReader(open(root / "grading" / "grades.csv"))}
    assert len(rows) == 4
    for (student, assignment), row in rows.items():
        sequential = graded[(assignment, student)]
        assert row["status"] == "graded"
        assert float(row["score"]) == sequential.score and float(row["max_score"]) == sequential.max_score
    assert (root / "grading" / "logs" / "worker-1.log").is_file()


@pytest.mark.slow
def test_a_dead_worker_fails_only_its_submission_and_is_restarted(course, graded):
    _, api = course
    seen = []
    # grading an assignment that does not exist raises inside the worker process, which dies
    done = grade._grade_with_workers(api, [("no_such_assignment", "solution"), ("quiz", "solution")], 1,
                                     lambda i, outcome: seen.append(outcome.student))
    dead, alive = done[("no_such_assignment", "solution")], done[("quiz", "solution")]
    assert not dead.ok and "grader process died" in dead.error
    assert alive.ok and alive.score == graded[("quiz", "solution")].score
    assert seen == ["solution", "solution"]


# A grader process that hangs before it answers (as a kernel stuck in its start-up would), but only the
# first time it is started: its replacement is the real worker.
HANG_ONCE = """import os, sys, time
marker = sys.argv[1]
if not os.path.exists(marker):
    open(marker, "w").close()
    time.sleep(600)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def test_submission_timeout_allows_every_code_cell_its_limit(course):
    _, api = course
    nb = nbformat.read(_nb_path(REPO, "solutions", "ex2_memory"), as_version=4)
    cells = sum(c.cell_type == "code" for c in nb.cells)
    assert grade.submission_timeout(api, "ex2_memory") == grade.STARTUP_ALLOWANCE_S + cells * api.config.Execute.timeout


@pytest.mark.slow
def test_a_worker_that_never_answers_fails_its_submission_in_bounded_time(course, tmp_path, monkeypatch):
    _, api = course
    _write(nbformat.read(_nb_path(REPO, "solutions", "quiz"), as_version=4), tmp_path / "in" / "on-time" / "quiz.ipynb")
    assert grade.collect(api, tmp_path / "in") == [("quiz", "on-time")]
    limit_s = 5.0
    monkeypatch.setattr(grade, "submission_timeout", lambda api, a: limit_s if a == "ex2_memory" else 600.0)
    command = grade.worker_command(api)
    hanging = [sys.executable, "-c", HANG_ONCE, str(tmp_path / "started"), *command[1:]]
    start = time.monotonic()
    done = grade._grade_with_workers(api, [("ex2_memory", "stuck"), ("quiz", "on-time")], 1,
                                     lambda i, outcome: None, command=hanging)
    stuck, next_one = done[("ex2_memory", "stuck")], done[("quiz", "on-time")]
    assert (tmp_path / "started").exists(), "the hanging worker never ran: the test proves nothing"
    assert not stuck.ok and f"no result within {limit_s:.0f} s" in stuck.error
    assert next_one.ok and next_one.score == sum(p for p, _ in _points("quiz").values()), next_one.error
    assert time.monotonic() - start < limit_s + 120


@pytest.mark.slow
def test_nbgraders_own_commands_work_on_a_fresh_clone(tmp_path):
    """A new instructor's first commands, in a `git clone` (no grading/ folder), the venv not activated."""
    clone = tmp_path / "course"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    assert not (clone / "grading").exists()
    nbgrader = str(Path(sys.executable).with_name("nbgrader"))
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if Path(p).resolve() != Path(sys.executable).parent.resolve())

    def run(*args):
        done = subprocess.run([nbgrader, *args], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "error accessing the nbgrader database" not in done.stdout + done.stderr, (
            f"nbgrader {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done.stdout + done.stderr

    assert "There are 0 assignments" in run("db", "assignment", "list")
    run("generate_assignment", "quiz", "--force")
    listed = run("db", "assignment", "list")
    assert "There are 1 assignments" in listed and "quiz" in listed
    changed = subprocess.run(["git", "status", "--porcelain", "--", "assessments"], cwd=clone,
                             capture_output=True, text=True, check=True).stdout
    assert changed == "", f"nbgrader's release differs from the committed assessments/:\n{changed}"
