"""Tests for engine.data.preference_data: upstream-format fixtures read through `datasets`, offline."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import huggingface_hub.constants  # noqa: E402
import pytest  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from engine.data.preference_data import (  # noqa: E402
    CNNDM_TEMPLATE,
    PLAIN_PROMPT_TEMPLATE,
    TLDR_TEMPLATE,
    WMT_TEMPLATE,
    DataError,
    DropReport,
    PreferencePair,
    PreferenceSource,
    format_prompt,
    join_prompt_response,
    load_preferences,
)

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
HH = FIXTURES / "hh-rlhf" / "train.jsonl"
SFF = FIXTURES / "summarize_from_feedback" / "comparisons.jsonl"
WMT = FIXTURES / "wmt20_mlqe_task1" / "en-de.jsonl"
CSV = FIXTURES / "preference_table" / "pairs.csv"
JSONL = FIXTURES / "preference_table" / "pairs.jsonl"
CUSTOM_COLUMNS = {"prompt": "question", "chosen": "good", "rejected": "bad", "score": "rating"}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf_datasets_cache")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, datasets_cache: Path) -> None:
    """Nothing may touch the network, even if `datasets` was imported before this module set the env."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A tiny byte-level BPE trained here on the fixture texts: no download."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [path.read_text(encoding="utf-8") for path in (HH, SFF, WMT, CSV, JSONL)]
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


@pytest.fixture
def tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


@pytest.fixture
def chat_tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def report(**counts: int) -> DropReport:
    return DropReport(**counts)


# ---------------------------------------------------------------------------------------------
# Anthropic/hh-rlhf

HH_EXPECTED = [
    PreferencePair(
        prompt="\n\nHuman: What is a good way to keep basil fresh?\n\nAssistant:",
        chosen="Trim the stems and stand the basil in a glass of water on the counter, loosely covered with "
        "a plastic bag. Keep it out of the fridge, because the cold turns the leaves black.",
        rejected="Put it in the freezer.",
    ),
    PreferencePair(
        prompt="\n\nHuman: Can you help me plan a birthday party for my son?"
        "\n\nAssistant: Of course! How old is he turning, and how many guests are you expecting?"
        "\n\nHuman: He's turning seven and about ten kids are coming.\n\nAssistant:",
        chosen="For ten seven-year-olds, plan about two hours: an hour of games such as a treasure hunt, "
        "then cake, then a craft they can take home.",
        rejected="Just rent a bouncy castle.",
    ),
    PreferencePair(
        prompt="\n\nHuman: How do I reverse a list in Python?"
        "\n\nAssistant: Use slicing: my_list[::-1] returns a reversed copy."
        "\n\nHuman: And in place?"
        "\n\nAssistant: Call my_list.reverse(); it reverses the list in place and returns None."
        "\n\nHuman: Thanks! Which one is faster?\n\nAssistant:",
        chosen="Both are O(n).\nreverse() avoids allocating a new list, so it is a little faster when you "
        "do not need the original order.",
        rejected="Slicing is always faster.",
    ),
    PreferencePair(
        prompt="\n\nHuman: In a chat transcript, what does a line starting with Human: mean?\n\nAssistant:",
        chosen="It marks the words typed by the person, as opposed to the replies of the assistant.",
        rejected="Nothing.",
    ),
]
# identical row, empty human turn, a pair diverging at an earlier assistant turn, an empty answer
HH_REPORT = report(kept=4, identical=1, empty_prompt=1, malformed=2)


def test_hh_rlhf_multi_turn_prompts_answers_and_drops() -> None:
    rows, drops = load_preferences(PreferenceSource("hh_rlhf", str(HH)))
    assert rows == HH_EXPECTED
    assert drops == HH_REPORT
    assert drops.seen == 8 and drops.dropped == 4


def test_hh_rlhf_folder_path_object_and_gzip_give_the_same_rows(tmp_path: Path) -> None:
    assert load_preferences(PreferenceSource("hh_rlhf", str(HH.parent))) == (HH_EXPECTED, HH_REPORT)
    assert load_preferences(PreferenceSource("hh_rlhf", HH)) == (HH_EXPECTED, HH_REPORT)
    packed = tmp_path / "train.jsonl.gz"  # the upstream repository ships gzipped JSONL
    with HH.open("rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert load_preferences(PreferenceSource("hh_rlhf", str(packed))) == (HH_EXPECTED, HH_REPORT)


def test_hh_rlhf_data_dir_selects_a_subset(tmp_path: Path) -> None:
    (tmp_path / "helpful-base").mkdir()
    shutil.copy(HH, tmp_path / "helpful-base" / "train.jsonl")
    (tmp_path / "harmless-base").mkdir()
    (tmp_path / "harmless-base" / "train.jsonl").write_text(
        '{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello.", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go."}\n'
    )
    rows, drops = load_preferences(PreferenceSource("hh_rlhf", str(tmp_path), data_dir="helpful-base"))
    assert rows == HH_EXPECTED and drops == HH_REPORT


def test_hh_rlhf_chat_template_turns_the_dialogue_into_messages(
    chat_tokenizer: PreTrainedTokenizerFast,
) -> None:
    rows, drops = load_preferences(PreferenceSource("hh_rlhf", str(HH)), tokenizer=chat_tokenizer)
    assert drops == HH_REPORT
    assert rows[1].prompt == (
        "<|user|>\nCan you help me plan a birthday party for my son?\n"
        "<|assistant|>\nOf course! How old is he turning, and how many guests are you expecting?\n"
        "<|user|>\nHe's turning seven and about ten kids are coming.\n"
        "<|assistant|>\n"
    )
    assert [(r.chosen, r.rejected) for r in rows] == [(r.chosen, r.rejected) for r in HH_EXPECTED]


def test_hh_rlhf_divergence_and_broken_dialogues_are_malformed(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        # the dialogues differ at the first assistant turn, not only in the final answer
        '{"chosen": "\\n\\nHuman: A?\\n\\nAssistant: B.\\n\\nHuman: C?\\n\\nAssistant: D.",'
        ' "rejected": "\\n\\nHuman: A?\\n\\nAssistant: X.\\n\\nHuman: C?\\n\\nAssistant: Y."}\n'
        # ends with a human turn
        '{"chosen": "\\n\\nHuman: A?\\n\\nAssistant: B.\\n\\nHuman: C?", "rejected": "\\n\\nHuman: A?\\n\\nAssistant: Z."}\n'
        # no turn markers at all
        '{"chosen": "just text", "rejected": "other text"}\n'
        # a missing field
        '{"chosen": "\\n\\nHuman: A?\\n\\nAssistant: B.", "rejected": null}\n'
    )
    with pytest.raises(DataError, match=r"no usable hh_rlhf rows: kept 0 of 4 rows .*malformed 4"):
        load_preferences(PreferenceSource("hh_rlhf", str(path)))


# ---------------------------------------------------------------------------------------------
# openai/summarize_from_feedback, comparisons

ROOMMATE_POST = (
    "My roommate and I split rent and bills 50/50. Since she started working from home in January she keeps "
    "the heating on all day, and our gas bill doubled last month. I suggested we split the heating part by "
    "usage and she said that was petty.\n\nAm I being unreasonable, or is there a fair way to do this?"
)
DOG_ARTICLE = (
    "A dog that had been stranded on a cliff ledge for two days was rescued by a lifeboat crew on Sunday.\n"
    "The spaniel, named Bella, slipped from a coastal path near Whitby on Friday evening.\n"
    "Volunteers lowered a crew member on a rope and carried her back to the beach, where her owners were waiting."
)


def test_summarize_from_feedback_choice_zero_and_one() -> None:
    rows, drops = load_preferences(PreferenceSource("summarize_from_feedback", str(SFF)))
    # malformed: choice 2; identical: the two summaries match; empty_prompt: post ""
    assert drops == report(kept=4, malformed=1, identical=1, empty_prompt=1)
    choice_0, choice_1, cnndm, choice_0_note = rows
    assert choice_0 == PreferencePair(
        prompt="SUBREDDIT: r/personalfinance\n\nTITLE: Roommate [24F] works from home and our heating bill "
        f"doubled, how do we split it fairly?\n\nPOST: {ROOMMATE_POST}\n\nTL;DR:",
        chosen="Roommate now works from home and runs the heating all day, doubling our gas bill. "
        "Is splitting the heating cost by usage fair?",
        rejected="my roommate thinks I am petty about money",
    )
    assert choice_0.prompt == TLDR_TEMPLATE.format(
        subreddit="personalfinance",
        title="Roommate [24F] works from home and our heating bill doubled, how do we split it fairly?",
        post=ROOMMATE_POST,
    )
    assert choice_1.chosen == (  # summaries[1] wins when choice is 1
        "Boyfriend of two years got a job in Denver and says I don't believe in us unless I quit my job and "
        "leave my family to move with him."
    )
    assert choice_1.rejected == "Boyfriend wants to move."
    assert choice_1.prompt.startswith("SUBREDDIT: r/relationships\n\nTITLE: Boyfriend [29M]")
    assert cnndm == PreferencePair(
        prompt=f"Article:\n{DOG_ARTICLE}\n\nTL;DR:",
        chosen="Bella the spaniel slipped off a coastal path near Whitby and spent two days on a cliff ledge "
        "before a lifeboat crew lowered a volunteer on a rope to rescue her.",
        rejected="A dog was rescued.",
    )
    assert cnndm.prompt == CNNDM_TEMPLATE.format(article=DOG_ARTICLE)
    assert choice_0_note.chosen.startswith("Found a wallet with $200") and choice_0_note.score is None


def test_summarize_from_feedback_folder_with_config_name() -> None:
    by_file = load_preferences(PreferenceSource("summarize_from_feedback", str(SFF)))
    by_folder = load_preferences(
        PreferenceSource("summarize_from_feedback", str(SFF.parent), config="comparisons")
    )
    assert by_folder == by_file


def test_summarize_from_feedback_chat_template_wraps_the_task_text(
    chat_tokenizer: PreTrainedTokenizerFast,
) -> None:
    plain, _ = load_preferences(PreferenceSource("summarize_from_feedback", str(SFF)))
    chat, _ = load_preferences(
        PreferenceSource("summarize_from_feedback", str(SFF)), tokenizer=chat_tokenizer
    )
    assert [row.prompt for row in chat] == [f"<|user|>\n{row.prompt}\n<|assistant|>\n" for row in plain]
    assert [(r.chosen, r.rejected) for r in chat] == [(r.chosen, r.rejected) for r in plain]


# ---------------------------------------------------------------------------------------------
# wmt/wmt20_mlqe_task1, en-de


def wmt_prompt(source: str) -> str:
    return f"Translate the following English text into German.\n\nEnglish: {source}\nGerman:"


def test_wmt20_mlqe_source_copy_rejected_and_z_mean_score() -> None:
    rows, drops = load_preferences(PreferenceSource("wmt20_mlqe", str(WMT), config="en-de"))
    # "Deutsche Bundesbahn (1949–1993)" is left untranslated, so it equals its own source copy
    assert drops == report(kept=5, identical=1)
    first = rows[0]
    assert first.prompt == wmt_prompt("José Ortega y Gasset visited Husserl at Freiburg in 1934.")
    assert first.prompt == WMT_TEMPLATE.format(
        src_name="English",
        tgt_name="German",
        source="José Ortega y Gasset visited Husserl at Freiburg in 1934.",
    )
    assert first.chosen == "José Ortega y Gasset besuchte Husserl 1934 in Freiburg."
    assert first.rejected == "José Ortega y Gasset visited Husserl at Freiburg in 1934."
    assert [row.score for row in rows] == pytest.approx([0.931, 0.587, 0.103333, -1.319, 1.052333])
    assert rows[3].chosen == "Die Rechnung wurde zur weiteren Diskussion tabelliert."
    assert all(row.rejected in row.prompt for row in rows)


def test_wmt20_mlqe_language_pair_defaults_to_the_file_name() -> None:
    assert load_preferences(PreferenceSource("wmt20_mlqe", str(WMT))) == load_preferences(
        PreferenceSource("wmt20_mlqe", str(WMT), config="en-de")
    )


def test_wmt20_mlqe_without_rejected_keeps_score_only_rows() -> None:
    rows, drops = load_preferences(PreferenceSource("wmt20_mlqe", str(WMT), wmt_rejected="none"))
    assert drops == report(kept=6)
    assert all(row.rejected == "" for row in rows)
    assert rows[4] == PreferencePair(
        prompt=wmt_prompt("Deutsche Bundesbahn (1949–1993)"),
        chosen="Deutsche Bundesbahn (1949–1993)",
        rejected="",
        score=pytest.approx(-0.083667),
    )


def test_wmt20_mlqe_other_pair_placeholder_score_and_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "ro-en.jsonl"
    path.write_text(
        '{"segid": 0, "translation": {"ro": "Casa este mare.", "en": "The house is big."}, "z_mean": -10000.0}\n'
        '{"segid": 1, "translation": {"ro": " ", "en": "Empty source."}, "z_mean": 0.5}\n'
        '{"segid": 2, "translation": {"ro": "Fără traducere.", "en": null}, "z_mean": 0.1}\n',
        encoding="utf-8",
    )
    rows, drops = load_preferences(PreferenceSource("wmt20_mlqe", str(path)))
    assert drops == report(kept=1, empty_prompt=1, malformed=1)
    assert rows == [
        PreferencePair(
            prompt="Translate the following Romanian text into English.\n\nRomanian: Casa este mare.\nEnglish:",
            chosen="The house is big.",
            rejected="Casa este mare.",
            score=None,  # upstream's -10000 placeholder for unscored rows
        )
    ]


# ---------------------------------------------------------------------------------------------
# generic preference tables

CSV_EXPECTED = [
    PreferencePair(
        "User: Name three primary colours.\nAssistant:",
        "Red, yellow and blue.",
        "Green, purple and orange.",
        1.0,
    ),
    PreferencePair("User: What is 12 times 12?\nAssistant:", "144", "124", 0.5),
    PreferencePair(
        "User: Write a haiku about rain.\nAssistant:",
        "Soft rain on the roof / the gutter hums a low song / the street shines like glass",
        "Rain is wet.",
        None,
    ),
    PreferencePair('User: Give a synonym for "quick", please.\nAssistant:', "Fast, or rapid.", "Slow.", 0.9),
]
CSV_REPORT = report(kept=4, empty_prompt=1, identical=1, malformed=1)


def test_preference_table_csv() -> None:
    assert load_preferences(PreferenceSource("preference_table", str(CSV))) == (CSV_EXPECTED, CSV_REPORT)


def test_preference_table_jsonl_with_custom_column_names() -> None:
    rows, drops = load_preferences(PreferenceSource("preference_table", str(JSONL), columns=CUSTOM_COLUMNS))
    assert drops == report(kept=3, identical=1, malformed=1, empty_prompt=1)
    assert rows == [
        PreferencePair("User: Which planet is closest to the Sun?\nAssistant:", "Mercury.", "Venus.", 0.9),
        PreferencePair("User: Give one word that rhymes with 'light'.\nAssistant:", "Night.", "Lamp.", 0.7),
        PreferencePair(
            "User: Is a tomato a fruit?\nAssistant:",
            "Botanically yes: it is the ripened ovary of a flower and holds the seeds.",
            "No, it is a vegetable.",
            None,
        ),
    ]


def test_preference_table_tsv_and_parquet(tmp_path: Path) -> None:
    table = datasets.load_dataset("csv", data_files=str(CSV), split="train")
    table.to_parquet(str(tmp_path / "pairs.parquet"))
    table.to_csv(str(tmp_path / "pairs.tsv"), sep="\t", index=False)
    for name in ("pairs.parquet", "pairs.tsv"):
        assert load_preferences(PreferenceSource("preference_table", str(tmp_path / name))) == (
            CSV_EXPECTED,
            CSV_REPORT,
        )


def test_preference_table_chat_template(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    rows, _ = load_preferences(PreferenceSource("preference_table", str(CSV)), tokenizer=chat_tokenizer)
    assert rows[0].prompt == "<|user|>\nName three primary colours.\n<|assistant|>\n"


# ---------------------------------------------------------------------------------------------
# prompt formatting, length filtering, limits


def test_format_prompt_plain_and_chat(
    tokenizer: PreTrainedTokenizerFast, chat_tokenizer: PreTrainedTokenizerFast
) -> None:
    assert format_prompt(None, "Hi there") == "User: Hi there\nAssistant:"
    assert format_prompt(tokenizer, "Hi there") == PLAIN_PROMPT_TEMPLATE.format(text="Hi there")
    assert format_prompt(chat_tokenizer, "Hi there") == "<|user|>\nHi there\n<|assistant|>\n"
    assert join_prompt_response("User: Hi\nAssistant:", "Hello.") == "User: Hi\nAssistant: Hello."
    assert join_prompt_response("<|assistant|>\n", "Hello.") == "<|assistant|>\nHello."


def test_broken_chat_template_is_a_data_error(chat_tokenizer: PreTrainedTokenizerFast) -> None:
    chat_tokenizer.chat_template = "{{ raise_exception('no user turns allowed') }}"
    with pytest.raises(DataError, match="chat template failed"):
        load_preferences(PreferenceSource("preference_table", str(CSV)), tokenizer=chat_tokenizer)


def pair_length(tok: PreTrainedTokenizerFast, row: PreferencePair) -> int:
    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count(row.prompt) + max(count(" " + row.chosen), count(" " + row.rejected)) + 1  # + EOS


def test_too_long_rows_are_dropped_with_a_real_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    lengths = [pair_length(tokenizer, row) for row in HH_EXPECTED]
    assert len(set(lengths)) == len(lengths)
    limit = sorted(lengths)[1]  # keeps the two shortest pairs
    rows, drops = load_preferences(
        PreferenceSource("hh_rlhf", str(HH)), tokenizer=tokenizer, max_tokens=limit
    )
    assert rows == [row for row, n in zip(HH_EXPECTED, lengths, strict=True) if n <= limit]
    assert drops == report(kept=2, too_long=2, identical=1, empty_prompt=1, malformed=2)
    # the multi-turn birthday dialogue is the longest pair; the single-line transcript row is short
    assert lengths.index(max(lengths)) in (1, 2) and rows[-1] == HH_EXPECTED[3]

    everything, drops = load_preferences(
        PreferenceSource("hh_rlhf", str(HH)), tokenizer=tokenizer, max_tokens=max(lengths)
    )
    assert everything == HH_EXPECTED and drops.too_long == 0
    with pytest.raises(DataError, match="too_long 4"):
        load_preferences(
            PreferenceSource("hh_rlhf", str(HH)), tokenizer=tokenizer, max_tokens=min(lengths) - 1
        )


def test_limit_caps_kept_rows() -> None:
    rows, drops = load_preferences(PreferenceSource("hh_rlhf", str(HH), limit=3))
    assert rows == HH_EXPECTED[:3]
    assert drops == report(kept=3, identical=1)  # reading stopped after the third kept row


def test_limit_counts_only_rows_that_survive_the_length_filter(tokenizer: PreTrainedTokenizerFast) -> None:
    lengths = [pair_length(tokenizer, row) for row in HH_EXPECTED]
    spec = PreferenceSource("hh_rlhf", str(HH), limit=2)
    rows, drops = load_preferences(spec, tokenizer=tokenizer, max_tokens=sorted(lengths)[1])
    assert rows == [HH_EXPECTED[0], HH_EXPECTED[3]]
    assert drops.kept == 2 and drops.too_long == 2


def test_drop_report_summary() -> None:
    drops = report(kept=4, identical=1, empty_prompt=1, malformed=2)
    assert (
        drops.summary() == "kept 4 of 8 rows (dropped: empty_prompt 1, identical 1, too_long 0, malformed 2)"
    )
    assert drops.as_dict() == {"empty_prompt": 1, "identical": 1, "too_long": 0, "malformed": 2, "kept": 4}


# ---------------------------------------------------------------------------------------------
# errors: one clear sentence each
