"""``fnlight inspect`` (a checkpoint) and ``fnlight plot`` (a run's logs): commands that read files.

Example:
    ```python
    info = checkpoint_info(Path("runs/version_0/checkpoints/step_000000920"))
    print("\\n".join(format_info(info)))
    plot_runs([Path("runs/version_0"), Path("runs/version_1")], Path("curves.png"))
    ```
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ._cli_common import CliError
from .train.checkpoint import META, TENSORS, load_checkpoint, tensor_names

# -- inspect ---------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def checkpoint_info(path: Path) -> dict[str, Any]:
    """Everything ``inspect`` shows, JSON-able. Loading verifies the checksum (CheckpointError otherwise)."""
    state, meta = load_checkpoint(path)  # reads every byte: the sha256 is checked against the recorded one
    doc = json.loads((path / META).read_text())
    tensors = tensor_names(state)  # the names the tensor files use, in the state's order
    rows = [{"name": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
             "bytes": t.numel() * t.element_size()} for k, t in tensors.items()]
    pipeline = meta.get("pipeline") if isinstance(meta.get("pipeline"), dict) else {}
    description = pipeline.get("description") or {}
    stages = [s.get("stage", "?") for s in description.get("pipeline", {}).get("stages", [])]
    history = meta.get("history") or []
    return {
        "path": str(path), "format": doc.get("format"), "version": doc.get("version"),
        "versions": doc.get("versions", {}), "step": doc.get("step"), "key": doc.get("key"),
        "epoch": meta.get("epoch"), "position": meta.get("position"),
        "pipeline": {"fingerprint": pipeline.get("fingerprint"), "stages": stages, "seed": description.get("seed")},
        "history": history, "callbacks": sorted(meta.get("callbacks") or {}),
        "hparams": meta.get("hparams"), "finished": meta.get("finished"),
        "tensors": rows, "total_bytes": sum(r["bytes"] for r in rows),
        "num_params": sum(t.numel() for k, t in tensors.items() if k.startswith("params/")),
        # sha256: the tensor file's in a format-1 checkpoint, else None; tensor_files: every file's checksum,
        # as recorded ("xxh128:<hex>", or a bare sha256 in checkpoints of formats 1 and 2)
        "sha256": doc.get("tensors_sha256"),
        "tensor_files": doc.get("tensor_files") or {TENSORS: doc.get("tensors_sha256")}, "checksum": "OK",
    }


def _metrics_text(row: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                     if k not in ("epoch", "step", "time_s"))


def _checksum_text(recorded: str) -> str:
    algorithm, _, digest = recorded.rpartition(":")
    return f"{algorithm or 'sha256'} {digest}"


def format_info(info: dict[str, Any]) -> list[str]:
    """The text of ``inspect``: metadata, then a table of tensors with totals, then the checksum."""
    v = info["versions"]
    lines = [f"checkpoint  {info['path']}",
             f"written by  fnlight {v.get('fnlight', '?')}, torch {v.get('torch', '?')}, python {v.get('python', '?')}"
             f" ({info['format']} v{info['version']})"]
    if info["step"] is not None:
        where = f"step {info['step']}"
        if info["epoch"] is not None:
            where += f", epoch {info['epoch']}, position {info['position']} in the epoch"
        lines.append(f"position    {where}, key {info['key']}")
    pipe = info["pipeline"]
    if pipe["fingerprint"]:
        lines.append(f"data        fingerprint {pipe['fingerprint']}")
        lines.append(f"            {' >> '.join(pipe['stages'])} (seed {pipe['seed']})")
    if info["history"]:
        lines.append(f"history     {len(info['history'])} epoch(s); last: {_metrics_text(info['history'][-1])}")
    if info["callbacks"]:
        lines.append(f"callbacks   {', '.join(info['callbacks'])}")
    if info["hparams"]:
        lines.append("hparams     " + " ".join(f"{k}={json.dumps(v)}" for k, v in info["hparams"].items()))
    if info["finished"]:
        lines.append(f"finished    {info['finished']} (the run ended here)")
    rows = info["tensors"]
    width = max([len(r["name"]) for r in rows] + [6])
    shapes = [str(r["shape"]) for r in rows]
    sw = max([len(s) for s in shapes] + [5])
    lines += ["", f"{'tensor':<{width}}  {'shape':<{sw}}  {'dtype':<9}  {'bytes':>12}"]
    lines += [f"{r['name']:<{width}}  {s:<{sw}}  {r['dtype']:<9}  {r['bytes']:>12,}" for r, s in zip(rows, shapes,
                                                                                                       strict=True)]
    lines += [f"total: {len(rows)} tensors, {_size(info['total_bytes'])}; {info['num_params']:,} parameters",
              *(f"checksum OK ({name}: {_checksum_text(c)})" for name, c in info["tensor_files"].items())]
    return lines


# -- plot ------------------------------------------------------------------------------------------

Series = dict[str, tuple[list[float], list[float]]]  # label -> (x, y)


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The logged rows (``kind`` step or epoch) from ``metrics.jsonl``, else ``metrics.csv`` + ``steps.csv``."""
    jsonl = run_dir / "metrics.jsonl"
    if jsonl.is_file():
        return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    rows = []
    for kind, name in (("epoch", "metrics.csv"), ("step", "steps.csv")):
        if (run_dir / name).is_file():
            with open(run_dir / name, newline="") as f:
                for r in csv.DictReader(f):
                    rows.append({"kind": kind, **{k: float(v) for k, v in r.items() if v not in ("", None)}})
    return rows


def curves(run_dir: Path) -> dict[str, Series]:
    """Panels of curves: per metric (``loss``, ``acc``...), its train/val values per epoch, and, when step
    rows were logged, its values per step. An ensemble's members (``val/acc/0``, ``val/acc/1``...) are
    lines of their metric's panel, beside the members' mean (``val/acc``).

    Example:
        ```python
        curves(Path("runs/version_0"))["loss"]["val/loss"]
        # ([0, 1, 2], [0.9, 0.5, 0.3])
        ```
    """
    if not run_dir.is_dir():
        raise CliError(f"no run directory {run_dir}")
    rows = _read_rows(run_dir)
    if not rows:
        raise CliError(f"no metrics in {run_dir}: expected metrics.jsonl or metrics.csv (written by the Trainer's "
                       "JSONL and CSV loggers)")
    panels: dict[str, Series] = {}
    for row in rows:
        per_step = row.get("kind") == "step"
        x = float(row["step"] if per_step else row["epoch"])
        for k, v in row.items():
            if k in ("kind", "step", "epoch", "time_s") or not isinstance(v, int | float):
                continue
            base = k.split("/", 1)[-1]
            if "/" in base and base.rsplit("/", 1)[1].isdigit():  # an ensemble member's: its metric's panel
                base = base.rsplit("/", 1)[0]
            panel = panels.setdefault(f"{base} per step" if per_step else base, {})
            xs, ys = panel.setdefault(k, ([], []))
            xs.append(x)
            ys.append(float(v))
    # epoch panels first, in the order their metrics were logged
    return dict(sorted(panels.items(), key=lambda kv: kv[0].endswith(" per step")))


def select(panels: dict[str, Series], metrics: list[str] | tuple[str, ...]) -> dict[str, Series]:
    """The panels ``--metric`` asks for: a name picks the panel of that title (``loss``, ``loss per step``) or,
    given without `` per step``, both the epoch and the step panel of that metric; none given: every panel.

    Example:
        >>> sorted(select({"loss": {}, "acc": {}, "loss per step": {}}, ["loss"]))
        ['loss', 'loss per step']
    """
    if not metrics:
        return panels
    picked = {t: s for t, s in panels.items() if any(t == m or t == f"{m} per step" for m in metrics)}
    missing = [m for m in metrics if not any(t == m or t == f"{m} per step" for t in panels)]
    if missing:
        raise CliError(f"no metric {', '.join(map(repr, missing))} in the runs' logs: the panels are "
                       f"{', '.join(panels)}")
    return picked


def plot_runs(run_dirs: list[Path], out: Path, metrics: list[str] | tuple[str, ...] = ()) -> Path:
    """:func:`figure` of the runs, saved as a PNG at ``out``.

    Example:
        ```python
        plot_runs([Path("runs/a"), Path("runs/b")], Path("ab.png"), metrics=["loss"])
        ```
    """
    fig = figure(run_dirs, metrics)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def figure(run_dirs: list[Path], metrics: list[str] | tuple[str, ...] = ()) -> Any:
    """A matplotlib Figure of the :func:`curves` of one or several runs (needs matplotlib): a panel per
    metric; with several runs, one colour per run (its lines told apart by dash style) and a legend naming
    both; whole-number epoch ticks; a dotted vertical line where a run was resumed (its ``resumes.jsonl``:
    at the resume's step in step panels, between the last epoch before it and the next in epoch panels).

    Example:
        ```python
        fig = figure([Path("runs/a"), Path("runs/b")], metrics=["loss"])
        ```
    """
    from .train.rundir import read_resumes

    if not run_dirs:
        raise CliError("plot needs at least one RUN directory")
    runs = {run: curves(run) for run in run_dirs}
    panels: dict[str, Series] = {}  # every panel of any run, in order
    for p in runs.values():
        for title in p:
            panels.setdefault(title, {})
    panels = dict(sorted(select(panels, metrics).items(), key=lambda kv: kv[0].endswith(" per step")))
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise CliError("plot needs matplotlib: pip install 'fnlight[plot]'") from None
    names = _short_names(run_dirs)
    colours = [f"C{i % 10}" for i in range(len(run_dirs))]
    dashes = ["-", "--", "-.", (0, (5, 1, 1, 1, 1, 1))]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows + 0.3 * (len(run_dirs) > 1)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, title in zip(axes, panels, strict=False):
        per_step = title.endswith(" per step")
        resumed = False
        for i, run in enumerate(run_dirs):
            series = runs[run].get(title, {})
            for j, (label, (xs, ys)) in enumerate(series.items()):
                style: dict[str, Any] = {"marker": "o" if len(xs) < 30 else None, "markersize": 3}
                if len(run_dirs) > 1:  # colour: the run; dash style: the series
                    style |= {"color": colours[i], "linestyle": dashes[j % len(dashes)]}
                ax.plot(xs, ys, label=f"{names[i]}: {label}" if len(run_dirs) > 1 else label, **style)
            for r in read_resumes(run) if series else []:
                x = r["step"] if per_step else r["epoch"] - 0.5
                ax.axvline(x, color=colours[i] if len(run_dirs) > 1 else "0.4", linestyle=":", linewidth=1.2)
                resumed = True
        ax.set_title(title)
        ax.set_xlabel("step" if per_step else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 0.5
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if resumed:
            handles.append(Line2D([], [], color="0.4", linestyle=":"))
            labels.append("resumed")
        ax.legend(handles, labels, fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(str(run_dirs[0]) if len(run_dirs) == 1 else "  ".join(
        n if n == str(r) else f"{n} = {r}" for n, r in zip(names, run_dirs, strict=True)), fontsize="medium")
    return fig


def _short_names(run_dirs: list[Path]) -> list[str]:
    """Each run's last path component, or more of its path where two runs would share a name."""
    for depth in range(1, 8):
        names = ["/".join(Path(r).resolve().parts[-depth:]) for r in run_dirs]
        if len(set(names)) == len(names):
            return names
    return [str(r) for r in run_dirs]


def plot_run(run_dir: Path, out: Path) -> Path:
    """One run's :func:`curves` to a PNG (:func:`plot_runs` of one run)."""
    return plot_runs([run_dir], out)
