"""What `zopro plot` and `zopro report` read: run directories, sweeps (each point a run, labelled by its
swept settings) and comparisons (a `zopro compare` folder: one run per method), as labelled runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.export.checkpoints import ExportError
from engine.jobs.sweep import SweepError, is_sweep_dir, load_sweep, short_keys
from engine.rundir.reader import is_run_dir, read_events, run_info
from engine.rundir.safe_io import read_plain

COMPARISON_JSON = "comparison.json"  # `zopro compare` writes its table's rows here, beside the runs


@dataclass
class LabelledRun:
    label: str  # the legend entry: the run's name, its method in a comparison, key=value in a sweep
    path: Path
    method: str
    group: str = ""  # the sweep or comparison it belongs to ("" for a run named on its own)


def is_comparison_dir(path: Path) -> bool:
    return (Path(path) / COMPARISON_JSON).is_file() or (
        Path(path).is_dir()
        and not is_run_dir(Path(path))
        and not is_sweep_dir(Path(path))
        and len([p for p in Path(path).iterdir() if p.is_dir() and is_run_dir(p)]) >= 2
    )


def value_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_runs(path: Path) -> list[LabelledRun]:
    try:
        sweep = load_sweep(path)
    except SweepError as error:
        raise ExportError(str(error)) from None
    short = short_keys(list(sweep.grid))
    runs = []
    for point in sweep.points:
        folder = sweep.point_dir(point)
        if not is_run_dir(folder):
            continue  # a point not run yet
        label = ", ".join(
            f"{short.get(k, k)}={value_text(v)}" for k, v in (point.get("values") or {}).items()
        )
        group = f"{sweep.name}: {', '.join(sweep.grid)}"  # the legend's title names the swept keys
        runs.append(LabelledRun(label or point["name"], folder, run_info(folder).method, group))
    return runs


def comparison_runs(path: Path) -> list[LabelledRun]:
    """The runs of a comparison, in the order it ran them (comparison.json), else by folder name."""
    path = Path(path)
    order: list[str] = []
    try:
        order = [row["run"] for row in json.loads(read_plain(path / COMPARISON_JSON, 1 << 20))]
    except (OSError, ValueError, TypeError, KeyError):
        pass
    folders = [p for p in sorted(path.iterdir()) if p.is_dir() and is_run_dir(p)]
    folders.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
    return [LabelledRun(p.name, p, run_info(p).method, "method") for p in folders]


def labelled_runs(paths: list[Path]) -> list[LabelledRun]:
    """Every run the paths name, labelled for a legend; ExportError for a path that is none of the three."""
    runs: list[LabelledRun] = []
    for path in paths:
        path = Path(path)
        if path.is_dir() and is_run_dir(path):
            runs.append(LabelledRun(path.name, path, run_info(path).method))
        elif is_sweep_dir(path):
            runs.extend(sweep_runs(path))
        elif path.is_dir() and is_comparison_dir(path):
            runs.extend(comparison_runs(path))
        else:
            raise ExportError(
                f"{path} is not a run, sweep or comparison directory (no events.jsonl, sweep.json or "
                f"{COMPARISON_JSON})"
            )
    if not runs:
        raise ExportError(f"{', '.join(map(str, paths))} holds no runs yet")
    return runs


X_AXES = {
    "step": ("global_step", "step"),
    "wall": ("elapsed", "wall-clock time (s)"),
    "forward_passes": ("compute/forward_passes", "forward passes"),
}


def metric_points(
    run_dir: Path, metric: str, x: str, events: list[dict] | None = None
) -> tuple[list[float], list[float], list[float | None]]:
    """(x, value, standard error or None) of every event that logged `metric`, in order; x is the global
    step, the run's elapsed seconds or its forward passes so far. `events`: the run's, read already."""
    key = X_AXES[x][0]
    xs, ys, ses = [], [], []
    for event in read_events(run_dir) if events is None else events:
        metrics = event.get("metrics")
        if event.get("type") not in ("metrics", "eval") or not isinstance(metrics, dict):
            continue
        value = metrics.get(metric)
        where = metrics.get(key) if key.startswith("compute/") else event.get(key)
        if not isinstance(value, (int, float)) or not isinstance(where, (int, float)):
            continue
        se = metrics.get(f"{metric}_se")
        xs.append(float(where))
        ys.append(float(value))
        ses.append(float(se) if isinstance(se, (int, float)) else None)
    return xs, ys, ses


def known_metrics(runs: list[LabelledRun]) -> list[str]:
    """The metrics the runs logged (for the message that names what can be plotted)."""
    names: dict[str, None] = {}
    for run in runs:
        for event in read_events(run.path):
            if event.get("type") in ("metrics", "eval"):
                names.update(dict.fromkeys(k for k in (event.get("metrics") or {}) if not k.endswith("_se")))
    return sorted(names)
