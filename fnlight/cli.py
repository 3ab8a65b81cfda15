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
from . import data as fd
from .data.datamodule import DataModule


def _scale(sample: Any) -> Any:
    """Digits pixels are 0..16: scale them to [0, 1]."""
    x, y = sample
    return x / 16.0, y


def digits_datamodule(seed: int = 0, batch_size: int = 64) -> DataModule:
    """The bundled digits experiment's data: a stratified 80/10/10 split, scaled, shuffled.

    Example:
        >>> dm = digits_datamodule(seed=0)
        >>> dm.num_batches("train")
        23
    """
    pipeline = (fd.digits()
                >> fd.split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=0, stratify_by=1)
                >> fd.transform(_scale)
                >> fd.shuffle(on="train")
                >> fd.batch(batch_size))
    return DataModule(pipeline, seed=seed)


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
@click.option("--seed", default=0, show_default=True, help="Seed of shuffles and random transforms.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--max-epochs", default=1, show_default=True, type=click.IntRange(min=1))
def fit(seed: int, batch_size: int, max_epochs: int) -> None:
    """Run the bundled digits experiment.

    The functional trainer is not built yet: for now this runs the
    experiment's data pipeline end to end (every split, every epoch) and
    reports what it produced.
    """
    click.echo("fnlight fit: the trainer is not available yet; running the digits data pipeline.")
    dm = digits_datamodule(seed, batch_size)
    t0 = time.perf_counter()
    dm.prepare()
    click.echo(f"pipeline (fingerprint {dm.fingerprint[:16]}):\n{_tree(dm.pipeline.describe())}")
    samples = 0
    with dm:
        for epoch in range(max_epochs):
            for split in dm.split_names:
                counts = torch.zeros(10, dtype=torch.int64)
                for _, y in dm.batches(split, epoch):
                    counts += torch.bincount(y, minlength=10)
                samples += int(counts.sum())
                click.echo(f"epoch {epoch} {split:>5}: {dm.num_batches(split):3d} batches, "
                           f"{int(counts.sum()):4d} samples, per class {counts.tolist()}")
    dt = time.perf_counter() - t0
    click.echo(f"{samples} samples in {dt:.2f} s ({samples / dt:,.0f} samples/s)")


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
