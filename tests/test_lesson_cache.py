"""The header and the atomic write every cached sweep of the lessons uses."""

import json
import shlex

import torch

from course_lib.lessons.cache import cache_header, write_cache


def test_the_header_names_a_command_that_can_be_pasted_back():
    header = cache_header("scripts/transfer_sweep.py", ["--widths", "32", "64", "--out", "a b.json"])
    assert shlex.split(header["command"]) == ["python", "scripts/transfer_sweep.py", "--widths", "32", "64",
                                              "--out", "a b.json"]
    assert cache_header("scripts/x.py", [])["command"] == "python scripts/x.py"
    assert header["torch"] == torch.__version__ and len(header["created"]) == len("2026-12-03")


def test_write_cache_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "data" / "sweep.json"
    write_cache(path, {"runs": [1]})
    write_cache(path, {"runs": [1, 2]}, indent=1)
    assert json.loads(path.read_text()) == {"runs": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["sweep.json"]
