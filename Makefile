# The course's commands. `make lab` to learn, `make test` to check everything.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNEL := llm-course
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

# One BLAS thread per process: the suite's models are tiny and many tests start 2-4 processes,
# so extra threads only contend for the cores.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest

.PHONY: venv lab instructor-lab test test-fast test-notebooks test-browser course pretrained release grade bench doctor clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --user --name $(KERNEL) --display-name "Python (LLM course)" >/dev/null
	touch $(STAMP)

## Learners: start JupyterLab on the lessons
# (as root, e.g. in a container, Jupyter refuses to start without --allow-root)
lab: venv
	JUPYTER_CONFIG_PATH=$(CURDIR)/binder $(VENV)/bin/jupyter lab --notebook-dir=notebooks \
		$(if $(filter 0,$(shell id -u)),--allow-root,) $(LAB_ARGS)

## Instructors: JupyterLab on the whole repository with nbgrader's Formgrader and Create Assignment panels
instructor-lab: venv
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root,) $(LAB_ARGS)

doctor: venv
	$(PY) -m course_lib doctor

## The whole suite (unit, distributed, notebooks, grading); what CI runs
test: venv
	$(PYTEST) -q --durations=15 tests

## Unit tests only, for quick iteration
test-fast: venv
	$(PYTEST) -q -m "not slow and not distributed and not notebooks and not grading and not browser" tests

test-notebooks: venv
	$(PYTEST) -q -m notebooks tests

## Headless Chromium: notebook 00 runs in the learner's lab; the Formgrader works on a fresh clone (needs /usr/bin/chromium)
test-browser: venv
	$(PYTEST) -q -rs -m browser tests/test_browser.py

## Re-execute every lesson notebook in place (commits their outputs)
course: venv
	for nb in notebooks/[0-9][0-9]_*.ipynb; do \
		echo "== $$nb"; \
		$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=600 --ExecutePreprocessor.kernel_name=python3 "$$nb" || exit 1; \
	done

## Train the tiny GPT on Shakespeare that later lessons fine-tune (CPU, minutes)
pretrained: venv
	$(PY) scripts/make_pretrained.py

## Instructors: regenerate the student versions in assessments/ from solutions/ (nbgrader)
release: venv
	$(PY) scripts/grade.py release

## Instructors: autograde SUBMISSIONS=DIR (per-student folders, or an LMS download with ASSIGNMENT=...)
grade: venv
	@test -n "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=DIR [ASSIGNMENT=quiz] [LMS_REGEX='...'] [JOBS=N] [TIMEOUT=S]"; exit 2; }
	$(PY) scripts/grade.py grade "$(SUBMISSIONS)" $(if $(ASSIGNMENT),--assignment "$(ASSIGNMENT)") \
		$(if $(LMS_REGEX),--lms-regex '$(value LMS_REGEX)') $(if $(JOBS),--jobs $(JOBS)) $(if $(TIMEOUT),--timeout $(TIMEOUT))

bench: venv
	@for b in benchmarks/throughput.py benchmarks/memory.py benchmarks/notebooks.py; do \
		if [ -f $$b ]; then echo "== $$b"; $(PY) $$b || exit 1; fi; \
	done

clean:
	rm -rf $(VENV) .pytest_cache runs
