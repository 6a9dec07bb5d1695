"""Recipes from TOML: loading, `--set` overrides, validation against the schema, and writing the resolved
recipe back. Every user error becomes a `RecipeError` whose message is one sentence naming the file, the
key path and what is accepted. Nothing is created before a recipe validates."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from engine.recipe.schema import (
    GROUP_METHODS,
    INT_CEILING,
    METHOD_SECTIONS,
    METHODS,
    NAME_PATTERN,
    REPORT_TO,
    TASK_NAMES,
    Recipe,
    RecipeError,
)

# --- loading and validation ---------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be {_type_name(tp)}, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise RecipeError(f"{where} = {value!r} is not accepted; it must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RecipeError(f"{where} = {_shown(value)} is not valid UTF-8 text") from None
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise RecipeError(
                f"{where} = {_shown(value)} contains a control character (NUL, newline, tab, ...); write it on one line"
            )
        return value
    raise RecipeError(f"{where}: unsupported type")


def _shown(value: Any, limit: int = 60) -> str:
    """repr of a value, cut short so that one bad value keeps the error to one readable line."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(value)} characters)" if isinstance(value, str) else text[:limit] + "..."


def _bound(limit: float) -> str:
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def _check_bounds(value: Any, meta: dict, where: str) -> None:
    choices = meta.get("choices")
    if choices and value not in choices:
        hint = _suggest(str(value), list(choices))
        raise RecipeError(f"{where} = {value!r} is not accepted; choose one of {', '.join(choices)}{hint}")
    low, high = meta.get("low"), meta.get("high")
    if isinstance(value, int) and not isinstance(value, bool) and high is None:
        high = INT_CEILING
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if low is not None and (value < low or (meta.get("low_open") and value == low)):
            op = ">" if meta.get("low_open") else ">="
            raise RecipeError(f"{where} = {value!r} is out of range; it must be {op} {_bound(low)}")
        if high is not None and value > high:
            raise RecipeError(f"{where} = {value!r} is out of range; it must be <= {_bound(high)}")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{source}: {prefix}{key}"
        if key not in fields:
            kind = "section" if isinstance(value, dict) else "key"
            options = list(fields)
            scope = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            raise RecipeError(
                f"{where} is not a known {kind}{_suggest(key, options)}; keys accepted in {scope}: "
                f"{', '.join(options)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RecipeError(f"{where} must be a table [{prefix}{key}], got {value!r}")
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", source)
            continue
        if isinstance(value, dict):
            raise RecipeError(f"{where} must be {_type_name(tp)}, not a table")
        coerced = _coerce(value, tp, where)
        _check_bounds(coerced, fields[key].metadata, where)
        kwargs[key] = coerced
    return cls(**kwargs)


def sections_used(method: str) -> tuple[str, ...]:
    """The method sections a run of `method` reads (zopro's iteration 0 is first-order rloo by default)."""
    return {"zopro": ("zopro", "rloo")}.get(method, (METHOD_SECTIONS.get(method, method),))


def _check_paths(recipe: Recipe, source: str) -> None:
    """What becomes a path: the run's name (one folder) and the model cache (a folder, maybe not yet made)."""
    if not NAME_PATTERN.fullmatch(recipe.name):
        raise RecipeError(
            f"{source}: name = {_shown(recipe.name)} is not accepted; a name becomes one folder name: 1 to 100 "
            "letters, digits, '_', '.', '+' or '-', not starting with '.', '+' or '-'"
        )
    if recipe.model.cache_dir:
        path = Path(recipe.model.cache_dir).expanduser()
        try:
            existing = next(p for p in (path, *path.parents) if p.exists())
        except OSError as error:  # a name too long for the file system, ...
            raise RecipeError(
                f"{source}: model.cache_dir = {_shown(recipe.model.cache_dir)} cannot be a folder "
                f"({error.strerror}); name a folder (it is created if missing)"
            ) from None
        if not existing.is_dir():
            raise RecipeError(
                f"{source}: model.cache_dir = {_shown(recipe.model.cache_dir)}: {existing} is a file, "
                "not a folder; name a folder (it is created if missing)"
            )


def _check_recipe(recipe: Recipe, source: str, raw: dict[str, Any]) -> None:
    for target in recipe.log.report_to:
        if target not in REPORT_TO:
            raise RecipeError(
                f"{source}: log.report_to = {target!r} is not accepted; list any of {', '.join(REPORT_TO)}"
                f"{_suggest(target, list(REPORT_TO))}"
            )
    _check_paths(recipe, source)
    method = recipe.policy.method
    if method not in METHOD_SECTIONS:
        raise RecipeError(
            f"{source}: policy.method = {method!r} is not available in this version; available: "
            f"{', '.join(METHOD_SECTIONS)}"
        )
    allowed = set(sections_used(method))
    if method == "zopro":  # its first-order iteration 0 reads that method's section
        allowed.add(recipe.zopro.first_iteration)
    for other in _compare_methods(raw):
        allowed.update(sections_used(other))
    for other, section in METHOD_SECTIONS.items():
        if section in raw and section not in allowed:
            raise RecipeError(
                f"{source}: [{section}] sets {other} settings but policy.method is {method!r}; remove the "
                f"section, set policy.method = {other!r}, or list it in [compare] methods"
            )
    if recipe.task.name not in TASK_NAMES:
        raise RecipeError(
            f"{source}: task.name = {recipe.task.name!r} is not accepted; choose one of "
            f"{', '.join(TASK_NAMES)}{_suggest(recipe.task.name, list(TASK_NAMES))}"
        )
    if recipe.task.name == "dataset" and not recipe.data.path:
        raise RecipeError(
            f"{source}: task.name = 'dataset' needs data.path (a hub id or a local file or folder)"
        )
    if recipe.task.name != "dataset" and "data" in raw:
        raise RecipeError(f"{source}: [data] is only read when task.name = 'dataset'")
    if recipe.task.name == "dataset" and recipe.refine.judge == "gold":
        raise RecipeError(
            f"{source}: refine.judge = 'gold' needs a task with a gold scorer; use 'reward' or 'llm' "
            "with a dataset"
        )
    if recipe.refine.judge == "llm" and not recipe.refine.judge_model:
        raise RecipeError(
            f"{source}: refine.judge = 'llm' needs refine.judge_model (a local folder or a hub id)"
        )
    zo = getattr(recipe, method, None) if method in ("mezo", "zopro") else None
    rows = method == "zopro" and recipe.zopro.probes != "batch"
    if rows and recipe.zopro.sampler != "subspace":
        raise RecipeError(
            f"{source}: zopro.probes = 'rows' perturbs each answer inside the subspace basis; it needs "
            f"zopro.sampler = 'subspace' (got {recipe.zopro.sampler!r}), or zopro.probes = 'batch'"
        )
    if method == "zopro" and recipe.zopro.subspace_rank and recipe.zopro.sampler != "subspace":
        raise RecipeError(
            f"{source}: zopro.subspace_rank = {recipe.zopro.subspace_rank} cuts the subspace basis; it needs "
            f"zopro.sampler = 'subspace' (got {recipe.zopro.sampler!r}), or zopro.subspace_rank = 0"
        )
    if method == "zopro" and recipe.zopro.rounds_per_pass != 1 and not rows:
        raise RecipeError(
            f"{source}: zopro.rounds_per_pass = {recipe.zopro.rounds_per_pass} runs rounds of row probes "
            "together; it needs zopro.probes = 'rows' (with zopro.probes = 'batch' leave it at 1)"
        )
    if (
        method == "zopro"
        and recipe.zopro.sampler == "subspace"
        and recipe.zopro.subspace_gradients == "prompts"
    ):
        wanted = recipe.train.prompts_per_update * recipe.train.updates_per_iteration
        if recipe.zopro.subspace_snapshots < wanted:
            raise RecipeError(
                f"{source}: zopro.subspace_gradients = 'prompts' snapshots train.prompts_per_update x "
                f"train.updates_per_iteration = {wanted} gradients an iteration, but zopro.subspace_snapshots "
                f"= {recipe.zopro.subspace_snapshots} keeps only the last of them: set it to {wanted} "
                f"(or zopro.subspace_gradients = 'batch')"
            )
    if zo is not None and zo.fitness != "raw" and zo.directions < 2 and not rows:
        raise RecipeError(
            f"{source}: {method}.fitness = {zo.fitness!r} compares the directions of an update; it needs "
            f"{method}.directions >= 2 (or {method}.fitness = 'raw')"
        )
    if method == "zopro" and recipe.zopro.sampler == "subspace" and recipe.zopro.first_iteration == "mezo":
        raise RecipeError(
            f"{source}: zopro.sampler = 'subspace' needs zopro.first_iteration = 'rloo' or a group method "
            f"({', '.join(GROUP_METHODS)}): the basis is built from a first-order iteration's gradients"
        )
    for name in sorted(
        {method, *_compare_methods(raw), recipe.zopro.first_iteration if method == "zopro" else ""}
    ):
        if name in GROUP_METHODS:
            _check_group_switches(recipe, source, name)
    if recipe.model.target_modules == []:
        raise RecipeError(f"{source}: model.target_modules must name at least one module")
    if recipe.train.prompts_per_update > recipe.task.train_prompts:
        raise RecipeError(
            f"{source}: train.prompts_per_update = {recipe.train.prompts_per_update} exceeds "
            f"task.train_prompts = {recipe.task.train_prompts}; lower it or add prompts"
        )


def _check_group_switches(recipe: Recipe, source: str, method: str) -> None:
    """The combinations of a group method's switches that have no meaning (docs/method.md section 2b)."""
    config = getattr(recipe, method)
    if recipe.policy.whiten_advantages:
        raise RecipeError(
            f"{source}: policy.whiten_advantages is RLOO's advantage whitening; for {method} set "
            f"{method}.scale = 'batch_std' (accepted: none, group_std, batch_std) and whiten_advantages = false"
        )
    if config.scale == "group_std" and config.baseline == "none":
        raise RecipeError(
            f"{source}: {method}.scale = 'group_std' divides a centred advantage by its group's spread; with "
            f"{method}.baseline = 'none' use scale = 'none' or 'batch_std', or baseline = 'group_mean' or "
            "'leave_one_out'"
        )
    if config.epsilon_high < config.epsilon:
        raise RecipeError(
            f"{source}: {method}.epsilon_high = {config.epsilon_high:g} is below {method}.epsilon = "
            f"{config.epsilon:g}; the upper clip must be at least the lower one (DAPO's clip-higher: 0.28)"
        )


def split_variant(entry: str) -> tuple[str, list[str]]:
    """A [compare] entry: a method, or a method with settings of its own section, as in
    "zopro:sampler=subspace,lr=0.2" -> ("zopro", ["zopro.sampler=subspace", "zopro.lr=0.2"])."""
    method, _, settings = entry.partition(":")
    method = method.strip()
    section = METHOD_SECTIONS.get(method, method)
    overrides = [f"{section}.{part.strip()}" for part in settings.split(",") if part.strip()]
    return method, overrides


def split_method_list(text: str) -> list[str]:
    """A comma-separated list of [compare]-style entries, where an entry's own settings are also separated
    by commas: "rloo,zopro:sampler=subspace,lr=0.2,mezo" -> ["rloo", "zopro:sampler=subspace,lr=0.2", "mezo"]."""
    entries: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" in part and ":" not in part and entries and ":" in entries[-1]:
            entries[-1] += "," + part
        else:
            entries.append(part)
    return entries


def variant_label(entry: str) -> str:
    """A folder-safe name for a [compare] entry: "zopro:sampler=subspace" -> "zopro-sampler-subspace"."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", entry).strip("-") or "method"


def _compare_methods(raw: dict[str, Any]) -> list[str]:
    compare = raw.get("compare")
    if isinstance(compare, dict) and isinstance(compare.get("methods"), list):
        return [split_variant(m)[0] for m in compare["methods"] if isinstance(m, str)]
    return []


def parse_override(text: str) -> tuple[list[str], Any]:
    """`policy.method=zopro` -> (["policy", "method"], "zopro"); values are TOML, else a bare string."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r} must look like key.path=value (for example train.iterations=5)")
    key, raw_value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r} has an empty key; it must look like key.path=value")
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    except RecursionError:
        raise RecipeError(f"--set {key}=...: the value is nested too deeply to be a recipe value") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    compare = raw.get("compare")
    if compare is not None and not (
        isinstance(compare, dict)
        and set(compare) <= {"methods", "run_all"}
        and isinstance(compare.get("methods", []), list)
        and all(isinstance(m, str) and split_variant(m)[0] in METHODS for m in compare.get("methods", []))
        and isinstance(compare.get("run_all", False), bool)
    ):
        raise RecipeError(
            f"{source}: [compare] takes methods = a list drawn from {', '.join(METHODS)} (each optionally "
            'with settings of its section, as "zopro:sampler=subspace,lr=0.2") and run_all = true or false'
        )
    recipe = _build(Recipe, {k: v for k, v in raw.items() if k != "compare"}, "", source)
    _check_recipe(recipe, source, raw)
    for entry in (compare or {}).get("methods", []):
        method, own = split_variant(entry)
        if own:  # each variant must be a valid recipe too
            variant = copy.deepcopy(raw)
            variant["compare"] = {"methods": [split_variant(m)[0] for m in compare["methods"]]}
            apply_overrides(variant, [f"policy.method={method}", *own])
            recipe_from_dict(variant, f"{source} ([compare] methods entry {entry!r})")
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; raises RecipeError with one sentence on any problem."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise RecipeError(f"{source}: no such recipe file")
    if path.is_dir():
        raise RecipeError(f"{source} is a folder; a recipe is a .toml file")
    if not path.is_file():  # a FIFO or a device would hang the read
        raise RecipeError(f"{source} is not a plain file; a recipe is a .toml file")
    try:
        raw = tomllib.loads(
            path.read_text(encoding="utf-8-sig")
        )  # a byte-order mark (Windows editors) is fine
    except UnicodeDecodeError:
        raise RecipeError(f"{source}: not a text file; a recipe is TOML") from None
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{source}: not valid TOML ({error})") from None
    except RecursionError:
        raise RecipeError(f"{source}: arrays or tables are nested too deeply to be a recipe") from None
    try:
        raw = apply_overrides(raw, overrides or [])
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None
    return recipe_from_dict(raw, source)


# --- writing the resolved recipe ----------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # a JSON string is a TOML basic string once DEL is escaped too (every other control is)
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML (defaults filled in, overrides applied)."""
    data = recipe.to_dict()
    unused = set(METHOD_SECTIONS.values()) - set(sections_used(recipe.policy.method))
    if recipe.task.name != "dataset":
        unused.add("data")
    data = {k: v for k, v in data.items() if k not in unused}
    lines = ["# fully resolved by zopro: every default filled in, every --set applied"]
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines.append("")
        lines.append(f"[{key}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"
