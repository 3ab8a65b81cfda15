"""The ``fnlight`` command line (click). The only place that parses user input.

Example:
    $ fnlight fit                 # the bundled digits experiment
    $ fnlight data describe       # its pipeline, hyperparameters and fingerprint
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import torch

from . import __version__
from .experiment import digits, digits_datamodule
from .train import ConsoleLogger, CSVLogger, JSONLLogger, Trainer


def _tree(desc: dict[str, Any]) -> str:
    lines = []
    for i, st in enumerate(desc["stages"]):
        params = ", ".join(f"{k}={json.dumps(v)}" for k, v in st.items() if k != "stage")
        lines.append(f"  {i}. {st['stage']}({params})")
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fnlight")
def main() -> None:
    """fnlight: pure-functional, reproducible training for PyTorch."""


@main.command()
@click.option("--max-epochs", type=click.IntRange(min=1), default=None, help="Epochs (default: the experiment's).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps.")
@click.option("--seed", default=0, show_default=True, help="Seed of the weights, shuffles and dropout.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA if available).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Where logs go (default: runs/version_<n>).")
@click.option("--compile", "compile_", is_flag=True, help="Run the step through torch.compile.")
@click.option("--precision", type=click.Choice(["32", "bf16-mixed"]), default="32", show_default=True)
def fit(max_epochs: int | None, max_steps: int | None, seed: int, device: str | None, run_dir: str | None,
        compile_: bool, precision: str) -> None:
    """Train the bundled digits experiment and report its test metrics."""
    try:
        torch.device(device) if device is not None else None
    except RuntimeError as e:
        raise click.BadParameter(str(e), param_hint="--device") from None
    exp = digits(seed=seed, **({"max_epochs": max_epochs} if max_epochs else {}))
    trainer = Trainer(max_epochs=exp.max_epochs, max_steps=max_steps, run_dir=run_dir, device=device,
                      loggers=(CSVLogger(), JSONLLogger(), ConsoleLogger()))
    click.echo(f"fit: digits MLP, {exp.init_state().num_params:,} parameters, "
               f"data fingerprint {exp.datamodule.fingerprint[:16]}, device {trainer.torch_device}")
    t0 = time.perf_counter()
    result, test = exp.run(trainer, compile=compile_, precision=precision)
    wall = time.perf_counter() - t0
    click.echo(f"test accuracy {test['acc']:.4f}  test loss {test['loss']:.4f}")
    click.echo(f"{int(result.state.step)} steps in {wall:.1f} s; run directory: {result.run_dir}")


@main.group()
def data() -> None:
    """Inspect data pipelines."""


@data.command("describe")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def data_describe(as_json: bool) -> None:
    """Print the digits pipeline: every stage, hyperparameter, and the fingerprint."""
    dm = digits_datamodule()
    if as_json:
        click.echo(json.dumps({"description": dm.pipeline.describe(),
                               "fingerprint": dm.fingerprint}, indent=2))
        return
    click.echo(_tree(dm.pipeline.describe()))
    click.echo(f"seed: {dm.seed}\nfingerprint: {dm.fingerprint}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
