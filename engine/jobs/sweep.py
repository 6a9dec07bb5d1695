"""Sweep directories: one recipe over a grid of settings, one run directory per point; the grid, sweep.json,
the summary rows and listing (running the points is `engine.cli.sweep`).

    ROOT/<name>-sweep-<time>/
      sweep.json      the grid, the fixed --set overrides and every point (its name and its settings)
      recipe.toml     a copy of the recipe as given (points run from it, so the sweep resumes without it)
      <point>/        one run directory per point (`zopro run` writes it)
      <point>.log     with --parallel: that point's output
      summary.json    one row per point: its settings, status and final scores (rewritten after each point)

`zopro sweep RECIPE --grid KEY=V1,V2 ...` validates every point before creating anything;
`zopro sweep --resume DIR` skips finished points and resumes (from its last checkpoint) the interrupted one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.recipe import RecipeError, load_recipe, parse_override
from engine.rundir.files import atomic_write_text
from engine.rundir.reader import RunInfo, is_run_dir, run_info
from engine.rundir.report import comparison_row
from engine.rundir.safe_io import atomic_write_bytes, read_plain
from engine.rundir.writer import stamped_folder

SWEEP_JSON = "sweep.json"
SUMMARY_JSON = "summary.json"
SWEEP_RECIPE = "recipe.toml"
MAX_POINTS = 1000
MAX_SWEEP_JSON_BYTES = 64 << 20
SORTABLE = ("final_gold", "win_rate_vs_sft", "reward_score", "kl", "wall_time_s")


class SweepError(ValueError):
    """Bad sweep input (one sentence naming the flag or key, and what is accepted)."""


# -- the grid ---------------------------------------------------------------------------------------------
def split_values(text: str) -> list[str]:
    """Split V1,V2,... at the commas outside brackets and quotes (a value may be a TOML list or string)."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            current.append(char)
            if char == quote:
                quote = ""
            continue
        if char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


@dataclass
class GridAxis:
    key: str
    values: list[Any]  # parsed (TOML, else a bare string)
    texts: list[str]  # as written: what the points pass to --set


def parse_grid(entries: list[str], fixed: list[str] | None = None) -> list[GridAxis]:
    """`--grid KEY=V1,V2,...` entries; SweepError (one sentence) on a malformed one."""
    axes: list[GridAxis] = []
    fixed_keys = {text.split("=", 1)[0].strip() for text in fixed or [] if "=" in text}
    for entry in entries:
        if "=" not in entry:
            raise SweepError(
                f"--grid {entry!r} has no '='; write KEY=V1,V2,... (for example --grid zopro.lr=0.1,0.2)"
            )
        key, raw = entry.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")) or not re.fullmatch(r"[A-Za-z0-9_.]+", key):
            raise SweepError(
                f"--grid {entry!r}: {key!r} is not a recipe key; write section.key=V1,V2,... "
                "(for example --grid zopro.lr=0.1,0.2)"
            )
        texts = split_values(raw)
        if not raw.strip() or any(not text for text in texts):
            raise SweepError(
                f"--grid {key}: an empty value in {raw!r}; list values separated by commas, "
                "for example --grid zopro.lr=0.1,0.2"
            )
        values = []
        for text in texts:
            try:
                values.append(parse_override(f"{key}={text}")[1])
            except RecipeError as error:
                raise SweepError(f"--grid {key}: {error}") from None
        seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
        duplicate = next((texts[i] for i, s in enumerate(seen) if s in seen[:i]), None)
        if duplicate is not None:
            raise SweepError(f"--grid {key} lists {duplicate} twice; each value once")
        if any(axis.key == key for axis in axes):
            raise SweepError(f"--grid {key} is given twice; give each key once with all its values")
        if key in fixed_keys:
            raise SweepError(f"{key} is both in --set and in --grid; keep it in one of them")
        axes.append(GridAxis(key, values, texts))
    if not axes:
        raise SweepError("a sweep needs at least one --grid KEY=V1,V2,...")
    count = 1
    for axis in axes:
        count *= len(axis.values)
    if count > MAX_POINTS:
        raise SweepError(f"the grid has {count} points, more than {MAX_POINTS}; split it into smaller sweeps")
    return axes


def short_keys(keys: list[str]) -> dict[str, str]:
    """The last part of each key (`zopro.lr` -> `lr`), the whole key where two would collide."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (short if last.count(short) == 1 else key) for key, short in zip(keys, last, strict=True)}


def _folder_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "-", text).strip("-.") or "x"


def grid_points(axes: list[GridAxis]) -> list[dict]:
    """Every combination, in order (the last key varies fastest): name, settings and --set overrides."""
    short = short_keys([axis.key for axis in axes])
    width = len(str(max(1, _count(axes) - 1)))
    points = []
    for index, combo in enumerate(itertools.product(*(range(len(axis.values)) for axis in axes))):
        values = {axis.key: axis.values[i] for axis, i in zip(axes, combo, strict=True)}
        label = "_".join(
            f"{short[axis.key]}={_folder_safe(axis.texts[i])}" for axis, i in zip(axes, combo, strict=True)
        )
        points.append(
            {
                "name": _folder_safe(f"{index:0{width}d}-{label}")[:120],
                "values": values,
                "overrides": [f"{axis.key}={axis.texts[i]}" for axis, i in zip(axes, combo, strict=True)],
            }
        )
    return points


def _count(axes: list[GridAxis]) -> int:
    count = 1
    for axis in axes:
        count *= len(axis.values)
    return count


def validate_points(recipe: Path, fixed: list[str], points: list[dict]) -> str:
    """Load every point's recipe (RecipeError names the point and the key); returns the recipe's name."""
    name = ""
    for point in points:
        try:
            resolved = load_recipe(recipe, [*fixed, *point["overrides"]])
        except RecipeError as error:
            keys = [text.split("=", 1)[0] for text in point["overrides"]]
            named = [key for key in keys if key in str(error)]
            where = f"--grid {named[0]}" if named else f"--grid point {', '.join(point['overrides'])}"
            raise SweepError(f"{where}: {error}") from None
        name = name or resolved.name
    return name


# -- the sweep directory ---------------------------------------------------------------------------------
@dataclass
class Sweep:
    path: Path
    grid: dict[str, list[Any]]
    overrides: list[str]
    points: list[dict]
    name: str = ""
    created: float | None = None
    parallel: int = 1
    source: str = ""

    @property
    def recipe(self) -> Path:
        return self.path / SWEEP_RECIPE

    def point_dir(self, point: dict) -> Path:
        return self.path / point["name"]

    def to_json(self) -> dict:
        return {
            "kind": "zopro-sweep",
            "name": self.name,
            "source": self.source,
            "created": self.created,
            "grid": self.grid,
            "overrides": self.overrides,
            "parallel": self.parallel,
            "points": self.points,
        }


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / SWEEP_JSON).is_file()


def load_sweep(path: Path) -> Sweep:
    """A sweep directory's sweep.json; SweepError (one sentence) when it is not one or is damaged."""
    path = Path(path)
    if not path.is_dir() or not is_sweep_dir(path):
        raise SweepError(f"{path} is not a sweep directory (no {SWEEP_JSON}); start one with `zopro sweep`")
    where = path / SWEEP_JSON
    try:
        data = json.loads(read_plain(where, MAX_SWEEP_JSON_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        raise SweepError(f"{where} cannot be read as a sweep; it is damaged") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise SweepError(f"{where} cannot be read as a sweep: it has no list of points; it is damaged")
    points = data["points"]
    for number, point in enumerate(points):
        problem = _point_problem(point)
        if problem is not None:
            raise SweepError(f"{where}: point {number} {problem}; the sweep is damaged and nothing was run")
    names = [point["name"] for point in points]
    twice = next((name for n, name in enumerate(names) if name in names[:n]), None)
    if twice is not None:
        raise SweepError(f"{where}: two points are named {twice!r}; the sweep is damaged and nothing was run")
    grid, overrides, parallel = data.get("grid") or {}, data.get("overrides") or [], data.get("parallel", 1)
    if (
        not isinstance(grid, dict)
        or not isinstance(overrides, list)
        or not all(isinstance(text, str) for text in overrides)
    ):
        raise SweepError(f"{where}: 'grid' must be an object and 'overrides' a list of key=value texts")
    if parallel is None:
        parallel = 1
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise SweepError(f"{where}: 'parallel' is {parallel!r}; accepted: a whole number, 1 or more")
    created = data.get("created")
    return Sweep(
        path=path,
        grid=grid,
        overrides=list(overrides),
        points=points,
        name=data.get("name") if isinstance(data.get("name"), str) and data.get("name") else path.name,
        created=created if isinstance(created, (int, float)) and not isinstance(created, bool) else None,
        parallel=parallel,
        source=data.get("source") if isinstance(data.get("source"), str) else "",
    )


POINT_NAME = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9_.+=-]{0,199}")


def _point_problem(point: Any) -> str | None:
    """What is wrong with one entry of sweep.json's points (None: nothing). A point's name is a folder
    inside the sweep: one plain name, never a path, `.`, `..` or a hidden name (a damaged or hostile
    sweep.json must not steer zopro to folders elsewhere)."""
    if not isinstance(point, dict):
        return "is not an object"
    name = point.get("name")
    if not isinstance(name, str) or not POINT_NAME.fullmatch(name) or name in (SWEEP_JSON, SUMMARY_JSON):
        return (
            f"has the name {str(name)[:60]!r}; accepted: one folder name of letters, digits and _ . + = -, "
            "not starting with a dot"
        )
    if name == SWEEP_RECIPE:
        return f"has the name {name!r}, which is one of the sweep's own files"
    if not isinstance(point.get("values"), dict):
        return "has no 'values' object"
    overrides = point.get("overrides")
    if not isinstance(overrides, list) or not all(isinstance(t, str) and "=" in t for t in overrides):
        return "has no 'overrides' list of key=value texts"
    return None


def create_sweep(
    recipe: Path, grid: list[str], fixed: list[str], *, root: Path, sweep_dir: Path | None, parallel: int = 1
) -> Sweep:
    """Validate everything, then write the sweep directory (nothing is created when anything is wrong)."""
    if parallel < 1:
        raise SweepError(f"--parallel {parallel} is not accepted; it must be 1 or more")
    for text in fixed:
        if "=" not in text:
            raise SweepError(f"--set {text!r} has no '='; write key.path=value")
    axes = parse_grid(grid, fixed)
    points = grid_points(axes)
    try:
        load_recipe(recipe, fixed)  # the recipe itself first: its error is clearer than a point's
    except RecipeError as error:
        raise SweepError(str(error)) from None
    name = validate_points(recipe, fixed, points)
    if sweep_dir is None:
        sweep_dir = stamped_folder(root, f"{name}-sweep", reserve=True)
    elif sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
        raise SweepError(
            f"--sweep-dir {sweep_dir} already holds files; resume a sweep with `zopro sweep --resume "
            f"{sweep_dir}` or choose another directory"
        )
    for existing in (sweep_dir, *sweep_dir.parents):
        if existing.exists():
            if not existing.is_dir():
                raise SweepError(
                    f"{existing} is a file, not a folder; choose another directory for the sweep"
                )
            break
    sweep = Sweep(
        path=sweep_dir,
        grid={axis.key: axis.values for axis in axes},
        overrides=list(fixed),
        points=points,
        name=name,
        created=time.time(),
        parallel=parallel,
        source=str(Path(recipe).resolve()),
    )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(sweep.recipe, Path(recipe).read_bytes())
    _write_json(sweep_dir / SWEEP_JSON, sweep.to_json())
    write_summary(sweep)
    return sweep


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def point_state(sweep: Sweep, point: dict) -> tuple[str, RunInfo | None]:
    """pending (no run yet), or the run's status (running, finished, failed, stale, ...)."""
    folder = sweep.point_dir(point)
    if not folder.is_dir() or not is_run_dir(folder):
        return "pending", None
    info = run_info(folder)
    return info.status, info


def summary_rows(sweep: Sweep) -> list[dict]:
    """One row per point: its settings, status and final scores (with standard errors), in grid order."""
    rows = []
    for point in sweep.points:
        state, info = point_state(sweep, point)
        row: dict[str, Any] = {"point": point["name"], "values": point["values"], "status": state}
        if info is not None:
            try:
                row.update(comparison_row(sweep.point_dir(point), point["name"]))
            except Exception:  # noqa: BLE001 - one unreadable point must not hide the others
                pass
            row["status"] = state
            row["warning_count"] = info.warning_count
        row["point"] = point["name"]
        row["run_dir"] = str(sweep.point_dir(point))
        rows.append(row)
    return rows


def write_summary(sweep: Sweep) -> list[dict]:
    rows = summary_rows(sweep)
    with contextlib.suppress(OSError):
        _write_json(sweep.path / SUMMARY_JSON, {"sweep": sweep.name, "grid": sweep.grid, "points": rows})
    return rows


def sorted_rows(rows: list[dict], metric: str, descending: bool | None = None) -> list[dict]:
    """Rows by a final metric (higher first, lower first for KL and time), points without it last."""
    if descending is None:
        descending = metric not in ("kl", "wall_time_s")
    have = [row for row in rows if isinstance(row.get(metric), (int, float))]
    missing = [row for row in rows if not isinstance(row.get(metric), (int, float))]
    return sorted(have, key=lambda row: row[metric], reverse=descending) + missing


# -- listing ---------------------------------------------------------------------------------------------
@dataclass
class SweepInfo:
    """A sweep as `zopro ls` and the TUI list it: its folder, grid and each point's state."""

    path: Path
    name: str
    grid: dict[str, list[Any]]
    points: list[dict]
    runs: list[RunInfo] = field(default_factory=list)  # the points that have a run directory
    states: dict[str, str] = field(default_factory=dict)  # point name -> pending or the run's status
    error: str | None = None

    @property
    def status(self) -> str:
        states = list(self.states.values())
        if self.error:
            return "unreadable"
        if any(s in ("running", "paused") for s in states):
            return "running"
        if states and all(s == "finished" for s in states):
            return "finished"
        if any(s in ("failed", "stale", "stopped") for s in states):
            return "failed" if "failed" in states else "stopped"
        return "pending" if states and all(s == "pending" for s in states) else "stopped"

    def counts(self) -> str:
        finished = sum(1 for s in self.states.values() if s == "finished")
        text = f"{finished}/{len(self.points)} done"
        for state in ("running", "failed", "stale"):
            n = sum(1 for s in self.states.values() if s == state)
            if n:
                text += f", {n} {state}"
        return text

    def to_json(self) -> dict:
        return {
            "kind": "sweep",
            "path": str(self.path),
            "name": self.name,
            "status": self.status,
            "grid": self.grid,
            "points": [{**p, "status": self.states.get(p["name"], "pending")} for p in self.points],
            "error": self.error,
        }


def sweep_info(path: Path) -> SweepInfo:
    """A sweep as listed; a damaged one is `unreadable` with one sentence, never breaking the list."""
    try:
        sweep = load_sweep(path)
        info = SweepInfo(path=sweep.path, name=sweep.path.name, grid=sweep.grid, points=sweep.points)
        for point in sweep.points:
            state, run = point_state(sweep, point)
            info.states[point["name"]] = state
            if run is not None:
                info.runs.append(run)
    except Exception as error:  # noqa: BLE001 - one bad sweep must leave every other run listed
        message = str(error) if isinstance(error, SweepError) else f"{type(error).__name__}: {error}"
        return SweepInfo(path=Path(path), name=Path(path).name, grid={}, points=[], error=message)
    return info


def list_sweeps(root: Path) -> list[SweepInfo]:
    """The sweeps directly under `root`, newest first."""
    root = Path(root)
    try:
        folders = [p for p in root.iterdir() if p.is_dir() and is_sweep_dir(p)]
    except OSError:
        return []
    infos = [sweep_info(p) for p in folders]
    return sorted(infos, key=lambda s: _mtime(s.path / SWEEP_JSON), reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
