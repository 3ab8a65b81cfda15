"""fnlight.testing: tools for your own test suite.

- :func:`assert_reproducible`: a function gives bitwise the same result on
  every call and leaves its inputs (and torch's global RNG) untouched.
- :func:`assert_resume_equivalent`: a training setup interrupted at given steps
  and resumed from its checkpoint ends bitwise where the uninterrupted run does.
- Hypothesis strategies (:func:`models`, :func:`datasets`, :func:`pipelines`,
  :func:`optimizers`, :func:`interruption_points`) and :class:`OptimizerConfig`;
  the strategies need ``pip install 'fnlight[testing]'``.
- A pytest plugin (loaded automatically where fnlight is installed) with the
  fixtures ``fnlight_seed``, ``fnlight_key``, ``fnlight_run_dir`` and
  ``fnlight_home``, and the option ``--fnlight-seed``.

Names are imported on first use, so ``import fnlight.testing`` (and the pytest
plugin) stays cheap and works without hypothesis installed.

Example:
    ```python
    from fnlight.testing import assert_reproducible
    new_state, metrics = assert_reproducible(train_step, state, batch)
    ```
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .assertions import assert_reproducible, assert_resume_equivalent
    from .configs import OptimizerConfig
    from .strategies import datasets, interruption_points, models, optimizers, pipelines

#: public name -> the submodule defining it
_EXPORTS = {
    "OptimizerConfig": "configs",
    "assert_reproducible": "assertions",
    "assert_resume_equivalent": "assertions",
    "datasets": "strategies",
    "interruption_points": "strategies",
    "models": "strategies",
    "optimizers": "strategies",
    "pipelines": "strategies",
}

__all__ = [
    "OptimizerConfig",
    "assert_reproducible",
    "assert_resume_equivalent",
    "datasets",
    "interruption_points",
    "models",
    "optimizers",
    "pipelines",
]
assert __all__ == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return list(__all__)
