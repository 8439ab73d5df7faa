"""binder/ (mybinder.org) builds the same learner environment as requirements.txt, with CPU torch."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# In requirements.txt for CI only; Binder never runs the browser test.
CI_ONLY = {"playwright"}


def pins(path: Path) -> dict[str, str]:
    """``name -> version`` for every ``name==version`` line (comments and options skipped)."""
    out = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\],]+)\s*==\s*([^\s;]+)", line)
        assert m, f"{path.relative_to(ROOT)}: {raw!r} is not an exact pin (name==version)"
        name = re.sub(r"[-_.]+", "-", m.group(1).split("[")[0]).lower()
        assert name not in out, f"{path.relative_to(ROOT)} pins {name} twice"
        out[name] = m.group(2)
    return out


def test_binder_pins_agree_with_requirements():
    root, binder = pins(ROOT / "requirements.txt"), pins(BINDER / "requirements.txt")
    missing = set(root) - set(binder) - CI_ONLY
    assert not missing, f"binder/requirements.txt lacks {sorted(missing)} (pinned in requirements.txt)"
    extra = set(binder) - set(root)
    assert not extra, f"binder/requirements.txt pins {sorted(extra)}, which requirements.txt does not"
    for name, version in binder.items():
        if name == "torch":
            base, _, variant = version.partition("+")
            assert base == root["torch"].split("+")[0], f"torch {version} on Binder vs {root['torch']}"
            assert variant == "cpu", "Binder has no GPU: pin the CPU build, torch==X+cpu"
        else:
            assert version == root[name], f"{name}: binder pins {version}, requirements.txt pins {root[name]}"


def test_binder_takes_torch_from_the_cpu_index():
    lines = [l.strip() for l in (BINDER / "requirements.txt").read_text().splitlines()]
    assert f"--extra-index-url {CPU_INDEX}" in lines


def test_binder_python_is_supported():
    runtime = (BINDER / "runtime.txt").read_text().strip()
    m = re.fullmatch(r"python-3\.(\d+)", runtime)
    assert m and int(m.group(1)) >= 10, f"binder/runtime.txt says {runtime!r}; the course needs python-3.10+"


def test_postbuild_installs_course_lib_and_learner_lab():
    post = BINDER / "postBuild"
    assert os.access(post, os.X_OK), "binder/postBuild must be executable (git update-index --chmod=+x)"
    text = post.read_text()
    assert text.startswith("#!/bin/bash") and "set -euo pipefail" in text
    assert re.search(r"pip install --no-deps -e \.\s", text), "postBuild must install course_lib from the checkout"
    assert "binder/labconfig/page_config.json" in text


def test_learner_lab_hides_only_real_instructor_plugins():
    """Every plugin id we disable exists in the installed nbgrader lab extension (ids do change)."""
    disabled = json.loads((BINDER / "labconfig" / "page_config.json").read_text())["disabledExtensions"]
    ext = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "@jupyter" / "nbgrader" / "static"
    if not ext.is_dir():
        pytest.skip("nbgrader's lab extension is not installed in this environment")
    bundle = "".join(p.read_text(errors="ignore") for p in ext.glob("*.js"))
    for plugin, off in disabled.items():
        assert off is True
        assert f'"{plugin}"' in bundle, f"nbgrader has no plugin {plugin}: update binder/labconfig/page_config.json"
    assert "@jupyter/nbgrader:validate-assignment" not in disabled, "learners keep the Validate button"


def test_readme_launch_links_open_notebook_00():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    binder = re.search(r"https://mybinder\.org/v2/gh/llm-training-course/llm-training-course/[^)\s]+", readme)
    assert binder, "README.md needs a Binder badge for llm-training-course/llm-training-course"
    assert "urlpath=lab/tree/notebooks/00_setup_and_challenges.ipynb" in binder.group(0)
    colab = re.search(r"https://colab\.research\.google\.com/github/llm-training-course/llm-training-course/"
                      r"blob/main/notebooks/(\S+?\.ipynb)", readme)
    assert colab and (ROOT / "notebooks" / colab.group(1)).is_file()
