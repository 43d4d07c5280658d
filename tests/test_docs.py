"""The README and docs/ run as written.

Every ```python block is run with ``exec`` in a fresh namespace, and every shell block or table
cell whose commands start with ``vitgraph `` is run with the venv's ``vitgraph`` entry point, each
document in its own temporary directory, in document order (so a later command may read what an
earlier one wrote).  A ```text block right after a Python block is its expected output.

A block that is not run carries a reason on the line before its fence, ``<!-- no-test: why -->``
(or is the install/test block ``.ci/run`` reads); a table row carries it in the row.  The test
fails on a code block with neither.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 10_000
SHELL_LANGS = {"", "sh", "bash", "shell", "console"}
NO_TEST = re.compile(r"<!--\s*no-test:\s*(\S[^>]*?)\s*-->")
CI_MARKERS = ("<!-- install -->", "<!-- test -->")  # blocks .ci/run extracts and runs itself
TIMEOUT_S = 180


@dataclass
class Snippet:
    doc: Path
    line: int
    kind: str  # "python", "shell", "text" (output or a tree: never run) or "row" (a table cell)
    code: str
    reason: str | None  # why it is not run (no-test comment, or the CI marker)
    expected: str | None = None  # a python block's printed output, from the ```text block after it

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def snippets(doc: Path) -> list[Snippet]:
    """The fenced blocks and table-row commands of ``doc``, in order."""
    lines = doc.read_text().splitlines()
    out: list[Snippet] = []
    last_end = -1  # index of the line after the previous fenced block
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            lang = fence.group(1).lower()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            before = lines[i - 1].strip() if i else ""
            m = NO_TEST.search(before)
            reason = m.group(1) if m else ("run by .ci/run" if before in CI_MARKERS else None)
            kind = "python" if lang == "python" else "shell" if lang in SHELL_LANGS else "text"
            code = "\n".join(lines[i + 1:j])
            directly_after = last_end >= 0 and not any(ln.strip() for ln in lines[last_end:i])
            if kind == "text" and directly_after and out and out[-1].kind == "python":
                out[-1].expected = code
            out.append(Snippet(doc, i + 1, kind, code, reason))
            i = last_end = j + 1
            continue
        if line.startswith("|"):
            m = NO_TEST.search(line)
            for cmd in re.findall(r"`(vitgraph [^`]+)`", line):
                out.append(Snippet(doc, i + 1, "row", cmd, m.group(1) if m else None))
        i += 1
    return out


def commands(code: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]


def runnable(s: Snippet) -> bool:
    if s.reason is not None or s.kind == "text":
        return False
    if s.kind == "python":
        return True
    return all(c.startswith("vitgraph ") for c in commands(s.code))


def run_command(cmd: str, cwd: Path, where: Snippet) -> None:
    exe = Path(sys.executable).parent / "vitgraph"
    argv = [str(exe), *shlex.split(cmd)[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, f"{where}: `{cmd}` exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"


def run_python(s: Snippet) -> None:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(s.code, str(s), "exec"), {"__name__": "__docs__"})  # noqa: S102 - the docs' own examples
    if s.expected is not None:
        got = [ln.rstrip() for ln in buf.getvalue().strip().splitlines()]
        want = [ln.rstrip() for ln in s.expected.strip().splitlines()]
        assert got == want, f"{s}: printed output differs from the block after it:\n" + "\n".join(got)


def test_readme_is_short_and_keeps_the_ci_blocks():
    text = README.read_text()
    assert len(text) <= README_LIMIT, f"README.md has {len(text)} characters (at most {README_LIMIT})"
    for marker in ("<!-- install -->", "<!-- /install -->", "<!-- test -->", "<!-- /test -->"):
        assert marker in text, f"README.md lost {marker} (.ci/run reads it)"


def test_no_issue_numbers_or_outside_paths():
    for doc in DOCS:
        text = doc.read_text()
        assert not re.search(r"\bissues? \d+", text, re.IGNORECASE), f"{doc.name} cites an issue number"
        assert "../shared" not in text and "shared/models.txt" not in text, f"{doc.name} cites a path outside the repository"


def test_every_block_is_run_or_says_why_not():
    unexplained = [f"{s} ({s.kind})" for doc in DOCS for s in snippets(doc)
                   if s.kind != "text" and s.reason is None and not runnable(s)]
    assert not unexplained, ("code blocks the test cannot run need <!-- no-test: reason --> on the line before: "
                             + ", ".join(unexplained))
    assert any(runnable(s) for s in snippets(README)), "the README's example must run"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_examples_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = 0
    for s in snippets(doc):
        if not runnable(s):
            continue
        if s.kind == "python":
            run_python(s)
        else:
            for cmd in commands(s.code):
                run_command(cmd, tmp_path, s)
        ran += 1
    if ran == 0:
        pytest.skip(f"{doc.name}: every block needs data or time (each says why)")
