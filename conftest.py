"""The doctests of the fnlight package run with the tests: ``pytest`` (``testpaths`` holds ``fnlight``)
collects every module of the package as ``--doctest-modules`` would, and only those (the scripts in
tests/ are not imported for doctests). Each example runs in a fresh temp directory with its own
``$FNLIGHT_HOME``, and with ``torch``, ``fnlight``, ``fd`` (fnlight.data), ``fo`` (fnlight.optim) and
``Path`` at hand, as docs assume. Modules whose optional dependency is not installed are not collected."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem, DoctestModule

PACKAGE = Path(__file__).resolve().parent / "fnlight"

#: optional dependency -> the modules that import it at import time
_NEEDS = {"lightning": ["fnlight/lightning/*.py"]}
collect_ignore_glob = [g for dep, globs in _NEEDS.items() if importlib.util.find_spec(dep) is None for g in globs]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".py" and PACKAGE in file_path.resolve().parents \
            and not parent.config.getoption("doctestmodules"):  # (with --doctest-modules pytest does it)
        return DoctestModule.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _doctest_sandbox(request: pytest.FixtureRequest) -> None:
    if not isinstance(request.node, DoctestItem):
        return
    import torch

    import fnlight
    import fnlight.data
    import fnlight.optim

    tmp = request.getfixturevalue("tmp_path")
    request.getfixturevalue("fnlight_home")
    request.getfixturevalue("monkeypatch").chdir(tmp)
    request.getfixturevalue("doctest_namespace").update(
        torch=torch, fnlight=fnlight, fd=fnlight.data, fo=fnlight.optim, Path=Path)
