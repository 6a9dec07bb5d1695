"""Bad data, each one clear sentence: missing or unreadable files, wrong formats and columns, hub ids offline."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from engine.data.preference_data import DataError, PreferenceSource, load_preferences
from tests.test_preference_data import (  # noqa: F401 - the fixtures and the fixture files
    CSV,
    HH,
    JSONL,
    SFF,
    WMT,
    bpe,
    datasets_cache,
    offline,
    tokenizer,
)


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and "Traceback" not in message


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError) as err:
        load_preferences(PreferenceSource("hh_rlhf", str(missing)))
    assert str(err.value).startswith(f"No such file or folder: {missing};") and one_sentence(str(err.value))
    assert ".jsonl, .json, .parquet, .csv or .tsv" in str(err.value)


def test_unknown_format_and_options_are_data_errors() -> None:
    with pytest.raises(DataError, match=r"Unknown preference format 'shp'; accepted formats are hh_rlhf, "):
        PreferenceSource("shp", str(HH))
    with pytest.raises(DataError, match="Unknown wmt_rejected value 'reference'"):
        PreferenceSource("wmt20_mlqe", str(WMT), wmt_rejected="reference")
    with pytest.raises(DataError, match="Unknown column key"):
        PreferenceSource("preference_table", str(CSV), columns={"question": "prompt"})
    with pytest.raises(DataError, match="positive integer"):
        PreferenceSource("hh_rlhf", str(HH), limit=0)
    with pytest.raises(DataError, match="needs a tokenizer"):
        load_preferences(PreferenceSource("hh_rlhf", str(HH)), max_tokens=128)


def test_unsupported_file_type_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("prompt chosen rejected\n")
    with pytest.raises(
        DataError, match=r"Cannot read .*pairs\.txt: unsupported file type; accepted files are"
    ):
        load_preferences(PreferenceSource("preference_table", str(path)))


def test_unreadable_and_empty_files_are_data_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    broken.write_text(good * 10 + '{"prompt": "p", "chosen": "a", "rej\n' + good)  # line 11 is cut short
    with pytest.raises(
        DataError, match=r"broken\.jsonl line 11 is not valid JSON; each line must be one JSON"
    ):
        load_preferences(PreferenceSource("preference_table", str(broken)))
    broken_json = tmp_path / "broken.json"
    broken_json.write_text('[{"prompt": "p", "chosen": "a",')
    with pytest.raises(DataError, match=r"^Cannot read .*broken\.json as json data \("):
        load_preferences(PreferenceSource("preference_table", str(broken_json)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty\.$"):
        load_preferences(PreferenceSource("hh_rlhf", str(empty)))
    header_only = tmp_path / "header.csv"
    header_only.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"header\.csv has no rows\.$"):
        load_preferences(PreferenceSource("preference_table", str(header_only)))


def test_wrong_columns_are_data_errors() -> None:
    with pytest.raises(DataError) as err:
        load_preferences(PreferenceSource("preference_table", str(JSONL)))
    assert "has no column 'prompt', 'chosen', 'rejected'; columns found: question, good, bad, rating" in str(
        err.value
    )
    with pytest.raises(DataError, match="does not look like summarize_from_feedback data"):
        load_preferences(PreferenceSource("summarize_from_feedback", str(HH)))


def test_all_rows_dropped_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("prompt,chosen,rejected\nSame?,yes,yes\n,a,b\nNo answer,,b\n")
    with pytest.raises(DataError) as err:
        load_preferences(PreferenceSource("preference_table", str(path)))
    assert str(err.value) == (
        f"{path} has no usable preference_table rows: kept 0 of 3 rows "
        "(dropped: empty_prompt 1, identical 1, too_long 0, malformed 1)."
    )


def test_hub_id_offline_is_one_clear_data_error() -> None:
    with pytest.raises(DataError) as err:
        load_preferences(PreferenceSource("summarize_from_feedback", "openai/summarize_from_feedback"))
    message = str(err.value)
    assert message.startswith(
        "Cannot load 'openai/summarize_from_feedback' (config 'comparisons', split 'train') from the Hugging Face hub"
    )
    assert "offline mode is on" in message and one_sentence(message)
    with pytest.raises(DataError, match=r"Cannot load 'Anthropic/hh-rlhf' \(split 'train'\)"):
        load_preferences(PreferenceSource("hh_rlhf", "Anthropic/hh-rlhf"))


def test_hub_id_goes_to_load_dataset_with_the_default_config(monkeypatch: pytest.MonkeyPatch) -> None:
    local = datasets.load_dataset("json", data_files=str(SFF), split="train")
    calls: list[tuple[tuple, dict]] = []

    def fake_load_dataset(*args: object, **kwargs: object) -> datasets.Dataset:
        calls.append((args, kwargs))
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = load_preferences(PreferenceSource("summarize_from_feedback", "openai/summarize_from_feedback"))
    assert calls == [
        (("openai/summarize_from_feedback", "comparisons"), {"split": "train", "data_dir": None})
    ]
    monkeypatch.undo()
    assert from_hub == load_preferences(PreferenceSource("summarize_from_feedback", str(SFF)))


def test_script_only_hub_dataset_falls_back_to_the_parquet_export(monkeypatch: pytest.MonkeyPatch) -> None:
    local = datasets.load_dataset("json", data_files=str(WMT), split="train")
    calls: list[tuple[tuple, dict]] = []

    def fake_load_dataset(*args: object, **kwargs: object) -> datasets.Dataset:
        calls.append((args, kwargs))
        if len(calls) == 1:
            raise RuntimeError("Dataset scripts are no longer supported, but found wmt20_mlqe_task1.py")
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, drops = load_preferences(PreferenceSource("wmt20_mlqe", "wmt/wmt20_mlqe_task1"))
    assert calls[1] == (
        ("wmt/wmt20_mlqe_task1",),
        {"split": "train", "data_dir": "en-de", "revision": "refs/convert/parquet"},
    )
    assert drops.kept == 5 and rows[0].chosen == "José Ortega y Gasset besuchte Husserl 1934 in Freiburg."


def test_a_save_to_disk_folder_is_read_by_its_split(tmp_path: Path) -> None:
    rows = {"prompt": ["p1", "p2"], "chosen": ["good one", "good two"], "rejected": ["bad one", "bad two"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    pairs, report = load_preferences(PreferenceSource("preference_table", str(tmp_path / "saved")))
    assert [pair.chosen for pair in pairs] == ["good one", "good two"] and report.kept == 2
    with pytest.raises(DataError, match=r"has no split 'test'; it has: train \(set data.split\)"):
        load_preferences(PreferenceSource("preference_table", str(tmp_path / "saved"), split="test"))
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    pairs, _ = load_preferences(PreferenceSource("preference_table", str(tmp_path / "one")))
    assert len(pairs) == 2
