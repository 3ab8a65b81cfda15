"""The ```python blocks of README.md and docs/*.md run, as a reader would paste them: the blocks of one
page in order, in one namespace, in a fresh directory (with its own ``$FNLIGHT_HOME``).

A block that cannot run here says so in an HTML comment on the line before it (invisible in the docs):
``<!-- snippet: skip REASON -->`` (a GPU, a cluster, the network: keep these rare), or
``<!-- snippet: needs PACKAGE ... -->`` (skipped where an optional package is not installed).
A ``>>>`` session runs its statements (the outputs it shows are not compared). What a fragment
assumes (a small model, a batch) can be defined in a hidden setup, run in its place::

    <!-- snippet: setup
    model = torch.nn.Linear(4, 2)
    -->
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
SETUP = re.compile(r"^\s*<!--\s*snippet:\s*setup\s*$")
MARK = re.compile(r"^\s*<!--\s*snippet:\s*(?P<what>skip|needs)\b\s*(?P<rest>.*?)\s*-->\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the code's first line
    code: str
    skip: str | None = None  # why it does not run
    needs: tuple[str, ...] = ()
    hidden: bool = False  # a setup comment's code


def python_blocks(text: str) -> list[Block]:
    """The page's ```python blocks (indented ones too, as inside a list), with their markers."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        if SETUP.match(lines[i]):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->"), len(lines))
            out.append(Block(i + 2, "\n".join(lines[i + 1:end]), hidden=True))
            i = end + 1
            continue
        m = FENCE.match(lines[i])
        if not m or not m["lang"]:
            i += 1
            continue
        indent, start = m["indent"], i + 1
        end = next((j for j in range(start, len(lines)) if lines[j].strip() == "```"), len(lines))
        if m["lang"] == "python":
            mark = MARK.match(lines[i - 1]) if i > 0 else None
            body = "\n".join(line[len(indent):] if line.startswith(indent) else line.lstrip()
                             for line in lines[start:end])
            block = Block(start + 1, body)
            if mark and mark["what"] == "skip":
                block.skip = mark["rest"] or "marked skip"
            elif mark:
                block.needs = tuple(mark["rest"].split())
            out.append(block)
        i = end + 1
    return out


def test_the_block_parser_reads_markers_and_indented_blocks():
    page = ("text\n```python\nx = 1\n```\n<!-- snippet: skip needs a GPU -->\n```python\ncuda()\n```\n"
            "- item\n\n  ```python\n  y = x + 1\n  ```\n<!-- snippet: needs mlflow -->\n```python\nimport mlflow\n```\n"
            "```console\n$ fnlight fit\n```\n<!-- snippet: setup\nz = 2\n-->\n")
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.skip, b.needs, b.hidden) for b in blocks] == [
        (3, "x = 1", None, (), False), (7, "cuda()", "needs a GPU", (), False), (12, "y = x + 1", None, (), False),
        (16, "import mlflow", None, ("mlflow",), False), (22, "z = 2", None, (), True)]


def fixtures(fn, request) -> dict:
    """The pytest fixtures a page's test function asks for (the ones pages use)."""
    import fnlight

    made = {"tmp_path": lambda: request.getfixturevalue("tmp_path_factory").mktemp("test"),
            "tmp_path_factory": lambda: request.getfixturevalue("tmp_path_factory"),
            "fnlight_seed": lambda: 0, "fnlight_key": lambda: fnlight.random.key(0),
            "fnlight_run_dir": lambda: request.getfixturevalue("tmp_path_factory").mktemp("run"),
            "fnlight_home": lambda: request.getfixturevalue("fnlight_home")}
    params = inspect.signature(fn).parameters
    unknown = [p for p in params if p not in made]
    if unknown:
        raise AssertionError(f"{fn.__name__} asks for fixtures the snippet runner does not have: {unknown}")
    return {p: made[p]() for p in params}


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_the_python_blocks_of_the_page_run(page, tmp_path, monkeypatch, request):
    blocks = python_blocks(page.read_text())
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(page)])
    namespace: dict = {"__name__": "__main__"}
    ran, skipped, done = 0, [], set()
    # hypothesis as a reader has it (this suite's conftest turns its deadline off)
    from hypothesis import settings

    settings.load_profile("default")
    request.addfinalizer(lambda: settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fnlight")))
    for b in blocks:
        missing = [p for p in b.needs if importlib.util.find_spec(p) is None]
        if b.skip or missing:
            skipped.append(f"line {b.line}: {b.skip or 'needs ' + ', '.join(missing)}")
            continue
        if b.code.lstrip().startswith(">>>"):  # a session: its statements run (the outputs shown are not compared)
            b.code = "\n".join(line[4:] for line in b.code.split("\n") if line.startswith((">>> ", "... ")))
        # a real file: functions defined in it have their source (pipelines fingerprint them)
        src = tmp_path / f"{page.stem}_line{b.line}.py"
        src.write_text(b.code + "\n")
        try:
            exec(compile(b.code, str(src), "exec"), namespace)
        except Exception:
            tb = traceback.format_exc()
            pytest.fail(f"{page.relative_to(ROOT)}: the python block at line {b.line} fails:\n{tb}", pytrace=False)
        ran += not b.hidden
        for name, fn in list(namespace.items()):  # the page's pytest tests run too, as pytest would run them
            if name.startswith("test_") and callable(fn) and name not in done:
                done.add(name)
                try:
                    fn(**fixtures(fn, request))
                except Exception:
                    pytest.fail(f"{page.relative_to(ROOT)}: {name} (from the python block at line {b.line}) fails:\n"
                                f"{traceback.format_exc()}", pytrace=False)
    if not ran:
        pytest.skip("; ".join(skipped))
