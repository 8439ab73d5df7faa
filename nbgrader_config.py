"""nbgrader settings for the course's graded work (exercises 1-3 and the quiz).

Layout (paths relative to this file, whatever the current directory):

* ``solutions/<assignment>/<name>.ipynb``: instructor sources, with solutions and hidden tests;
* ``assessments/<assignment>/<name>.ipynb``: the student versions, made by ``make release``;
* ``grading/``: git-ignored working folder for the gradebook, submissions, autograded copies
  and feedback (``make grade SUBMISSIONS=DIR``).
"""

import os
import sys

c = get_config()  # noqa: F821 - provided by traitlets when it loads this file

HERE = os.path.dirname(os.path.abspath(__file__))

# nbgrader's own commands (`nbgrader generate_assignment`, `nbgrader db ...`) and JupyterLab's Formgrader
# and Create Assignment panels open the gradebook below. SQLite creates the file but not its folder, and
# nbgrader reports a missing folder as "run nbgrader db upgrade": so the folder is made whenever this
# configuration is loaded, and a fresh clone works without any make target.
os.makedirs(os.path.join(HERE, "grading"), exist_ok=True)
# A new gradebook asks the `alembic` executable for its schema version; it sits beside the interpreter that
# runs nbgrader (.venv/bin), which is not on PATH when the virtual environment is not activated.
_bin = os.path.dirname(sys.executable)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = os.pathsep.join([_bin, os.environ.get("PATH", "")])

c.CourseDirectory.course_id = "llm-training"
c.CourseDirectory.root = HERE
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "assessments"
c.CourseDirectory.submitted_directory = os.path.join("grading", "submitted")
c.CourseDirectory.autograded_directory = os.path.join("grading", "autograded")
c.CourseDirectory.feedback_directory = os.path.join("grading", "feedback")
c.CourseDirectory.solution_directory = os.path.join("grading", "solution")
c.CourseDirectory.source_with_tests_directory = os.path.join("grading", "source_with_tests")
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(HERE, "grading", "gradebook.db")

# Per-cell execution limit while autograding. nbgrader's default (30 s) is too short for the
# exercises' training cells on a busy shared CPU; each whole solution runs in well under this.
# An infinite loop is interrupted after this long, the cell scores zero and grading goes on.
c.Execute.timeout = 180
c.Execute.interrupt_on_timeout = True

# A student who deletes a test cell gets it back (and run) at grading time.
c.OverwriteCells.add_missing_cells = True

# Only notebooks are assignments; caches and scratch files never travel to students.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "*.pt", "*.safetensors"]
