"""Reading a preference source's rows through `datasets`: a local file (json, parquet, csv, optionally
compressed), a local folder, or a hub dataset; every failure a DataError in one sentence."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.data.examples import DataError, PreferenceSource, first_line

if TYPE_CHECKING:
    from datasets import Dataset

HUB_DEFAULT_CONFIG: dict[str, str | None] = {
    "hh_rlhf": None,
    "summarize_from_feedback": "comparisons",
    "wmt20_mlqe": "en-de",
    "preference_table": None,
}
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_ACCEPTED_FILES = ".jsonl, .json, .parquet, .csv or .tsv (optionally .gz/.bz2/.xz/.zst)"


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_local(path: str) -> bool:
    """Whether a path that does not exist was meant as a local file rather than a hub id."""
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path:
        return True
    return _builder_for(Path(path)) is not None


def _load_file(file: Path, split: str) -> Dataset:
    import datasets

    problem = path_problem(str(file))  # a folder's file as a named one (its type, empty or not)
    if problem is not None:
        raise DataError(problem)
    builder = _builder_for(file)
    kwargs: dict[str, Any] = {"delimiter": "\t"} if ".tsv" in [s.lower() for s in file.suffixes] else {}
    datasets.logging.set_verbosity_error()  # its own log line on a bad file would precede our sentence
    try:
        return datasets.load_dataset(builder, data_files={split: str(file)}, split=split, **kwargs)
    except Exception as exc:
        if "corresponds to no data" in str(exc):
            raise DataError(f"{file} has no rows.") from exc
        bad_line = _first_bad_json_line(file) if builder == "json" else None
        if bad_line is not None:
            raise DataError(
                f"{file} line {bad_line} is not valid JSON; each line must be one JSON object."
            ) from exc
        raise DataError(f"Cannot read {file} as {builder} data ({first_line(exc)}).") from exc


def _first_bad_json_line(file: Path) -> int | None:
    """The first line (from 1) of a JSON Lines file that is not a JSON value, for the error sentence (the
    reader's own message counts rows from 0 and can blame the encoding); None when none or not JSON Lines."""
    if [s.lower() for s in file.suffixes][-1:] != [".jsonl"]:
        return None
    try:
        with open(file, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    if line.strip():
                        json.loads(line)
                except ValueError:
                    return number
    except OSError:
        return None
    return None


def _load_folder(folder: Path, spec: PreferenceSource) -> Dataset:
    import datasets

    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():  # save_to_disk's folder
        try:
            saved = datasets.load_from_disk(str(folder))
        except Exception as exc:
            raise DataError(f"Cannot read the saved dataset in {folder} ({first_line(exc)}).") from exc
        if isinstance(saved, datasets.DatasetDict):
            if spec.split not in saved:
                raise DataError(
                    f"{folder} (a saved DatasetDict) has no split {spec.split!r}; it has: {', '.join(saved)} "
                    "(set data.split)"
                )
            return saved[spec.split]
        return saved

    if spec.config:
        if (folder / spec.config).is_dir():
            folder = folder / spec.config
        else:
            for candidate in sorted(folder.glob(f"{glob.escape(spec.config)}.*")):
                if candidate.is_file() and _builder_for(candidate) is not None:
                    return _load_file(candidate, spec.split)
    try:
        return datasets.load_dataset(str(folder), data_dir=spec.data_dir, split=spec.split)
    except Exception as exc:
        raise DataError(
            f"Cannot read split {spec.split!r} from folder {folder} ({first_line(exc)}); "
            f"it should hold {_ACCEPTED_FILES} files named after their split."
        ) from exc


def _load_hub(spec: PreferenceSource) -> Dataset:
    import datasets

    config = spec.config or HUB_DEFAULT_CONFIG[spec.format]
    try:
        try:
            return datasets.load_dataset(spec.path, config, split=spec.split, data_dir=spec.data_dir)
        except RuntimeError as exc:
            if "scripts are no longer supported" not in str(exc):
                raise
            # Script-only hub datasets: read the hub's automatic Parquet export instead.
            return datasets.load_dataset(
                spec.path, split=spec.split, data_dir=config or "default", revision="refs/convert/parquet"
            )
    except Exception as exc:
        offline = bool(datasets.config.HF_HUB_OFFLINE)
        hint = (
            "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), so point to a local file or folder instead"
            if offline
            else "check the dataset id, config and split and your network, or point to a local file or folder"
        )
        where = f"{spec.path!r}" + (
            f" (config {config!r}, split {spec.split!r})" if config else f" (split {spec.split!r})"
        )
        raise DataError(
            f"Cannot load {where} from the Hugging Face hub ({first_line(exc)}); {hint}."
        ) from exc


def path_problem(path: str) -> str | None:
    """What is wrong with a data path that can be told without reading it (missing, empty, a FIFO, a file
    type no reader takes), in one sentence; None for a file or folder to read, or a hub id. `zopro validate`
    and `zopro queue add` ask it, so that a recipe they pass does not fail later in a worker."""
    local = Path(path).expanduser()
    if local.is_file():
        if _builder_for(local) is None:
            return f"Cannot read {local}: unsupported file type; accepted files are {_ACCEPTED_FILES}."
        return f"{local} is empty." if local.stat().st_size == 0 else None
    if local.is_dir():
        return None
    if local.exists():  # a FIFO or a device: reading it would never end
        return f"{path} is not a plain file or a folder; give a {_ACCEPTED_FILES} file."
    if _looks_local(path):
        return (
            f"No such file or folder: {path}; give an existing {_ACCEPTED_FILES} file, a folder of them, "
            "or a hub id such as 'Anthropic/hh-rlhf'."
        )
    return None


def recipe_data_problem(recipe) -> str | None:
    """`path_problem` of a recipe's `data.path`, as `data.path = ...: the problem`; None without a dataset."""
    if recipe.task.name != "dataset":
        return None
    problem = path_problem(recipe.data.path)
    return None if problem is None else f"data.path = {recipe.data.path!r}: {problem}"


def load_dataset(spec: PreferenceSource) -> Dataset:
    problem = path_problem(spec.path)
    if problem is not None:
        raise DataError(problem)
    local = Path(spec.path).expanduser()
    if local.is_file():
        return _load_file(local, spec.split)
    if local.is_dir():
        return _load_folder(local, spec)
    return _load_hub(spec)
