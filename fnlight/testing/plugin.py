"""The fnlight pytest plugin: fixtures for testing training code.

Installed with fnlight (entry point ``pytest11``: ``fnlight``), so every
pytest run in an environment with fnlight has it; ``-p no:fnlight`` turns it
off. Its fixtures import torch and fnlight only when a test uses them.

Fixtures:
    fnlight_seed: an int, 0 unless ``--fnlight-seed N`` is given.
    fnlight_key: ``fnlight.random.key(fnlight_seed)``.
    fnlight_run_dir: a fresh, empty directory for a run (``run_dir`` / ``ckpt_dir``).
    fnlight_home: a fresh directory set as ``$FNLIGHT_HOME`` for the test, so
        downloads and caches never touch ``~/.cache/fnlight``.

Example:
    >>> def test_training(fnlight_key, fnlight_run_dir):
    ...     state = fnlight.TrainState.create(model, opt).replace(key=fnlight_key)
    ...     result = fnlight.Trainer(max_epochs=1, run_dir=fnlight_run_dir).fit(state, step, dm)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fnlight")
    group.addoption("--fnlight-seed", type=int, default=None, dest="fnlight_seed", metavar="N",
                    help="the seed of the fnlight_seed and fnlight_key fixtures (default: 0)")


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("fnlight_seed", None)
    return None if seed is None else f"fnlight: --fnlight-seed={seed}"


@pytest.fixture
def fnlight_seed(request: pytest.FixtureRequest) -> int:
    """The run's seed: 0, or the value of ``--fnlight-seed``.

    Example:
        >>> def test_split(fnlight_seed):
        ...     dm = fnlight.DataModule(pipeline, seed=fnlight_seed)
    """
    seed = request.config.getoption("fnlight_seed", None)
    return 0 if seed is None else int(seed)


@pytest.fixture
def fnlight_key(fnlight_seed: int) -> torch.Tensor:
    """``fnlight.random.key(fnlight_seed)``.

    Example:
        >>> def test_noise(fnlight_key):
        ...     assert fnlight.random.normal(fnlight_key, (3,)).shape == (3,)
    """
    from fnlight.random import key

    return key(fnlight_seed)


@pytest.fixture
def fnlight_run_dir(tmp_path: Path) -> Path:
    """A fresh, empty directory for a run's logs and checkpoints.

    Example:
        >>> def test_fit(fnlight_run_dir):
        ...     fnlight.Trainer(run_dir=fnlight_run_dir, ckpt_dir=fnlight_run_dir / "ckpt").fit(state, step, dm)
    """
    path = tmp_path / "fnlight_run"
    path.mkdir()
    return path


@pytest.fixture
def fnlight_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh directory set as ``$FNLIGHT_HOME`` (the default root of downloads and caches) for the test.

    It lies next to the test's ``tmp_path``, not in it, so ``tmp_path`` stays empty.
    Use it in a test, or make it autouse in your ``conftest.py``::

        @pytest.fixture(autouse=True)
        def _isolated_home(fnlight_home):
            pass
    """
    path = tmp_path_factory.mktemp("fnlight_home")
    monkeypatch.setenv("FNLIGHT_HOME", str(path))
    return path
