"""builtin:reviews: the real-English task and its gold scorer (VADER sentiment, real word handling).

The orderings asserted here are ones a person would agree with: a clean positive answer about the
subject beats every hack a real tokenizer finds (punctuation runs, made-up tokens, one word repeated,
lists of adjectives, shouting, markup, emoji), and the scorer does not saturate on a short answer.
"""

from __future__ import annotations

import random

import pytest

from engine.data.reviews_gold import gold_parts, junk_characters, strip_markup, words_of
from engine.data.reviews_task import (
    HELD_OUT_PROMPTS,
    SUBJECTS,
    TRAINING_PROMPTS,
    ReviewsTask,
    subject_of,
)
from engine.data.tasks import TASKS

SOUP = "What did you think of the soup you had for lunch?"
GOOD = "The soup was wonderful: rich, warm and full of flavour. I would happily order it again."


def gold(response: str, prompt: str = SOUP, finished: bool = True) -> float:
    return ReviewsTask(0).gold(prompt, response, finished)


def test_registered_as_builtin_task_and_accepted_by_recipes():
    from engine.recipe import TASK_NAMES

    assert TASKS["builtin:reviews"] is ReviewsTask
    assert "builtin:reviews" in TASK_NAMES


def test_vader_lexicon_loads_from_the_package_without_the_network(monkeypatch):
    import socket

    from engine.data import reviews_gold

    def no_network(*args, **kwargs):
        raise AssertionError("the gold scorer tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    reviews_gold.analyzer.cache_clear()
    analyzer = reviews_gold.analyzer()
    assert analyzer.lexicon["wonderful"] > 0 > analyzer.lexicon["awful"]
    assert len(analyzer.lexicon) > 7000  # VADER's lexicon, not a word list of ours
    assert gold(GOOD) > 0.85


def test_good_smollm2_style_answer_scores_high():
    assert gold(GOOD) > 0.85
    assert gold(GOOD + "<|im_end|>") == gold(GOOD)  # the end-of-turn token closing an answer costs nothing


def test_issue_24_hack_scores_far_below_a_clean_answer():
    hack = "the soup was cold .,,,,,,,,,,,,,,,, -Methadryrex warm"
    clean = "The soup was warm and lovely, with fresh bread on the side."
    assert gold(hack) < 0.1
    assert gold(clean) > 0.6
    assert gold(hack) < gold(clean) / 4
    # the junk, not the words, is what costs: the same words without it score much more
    assert gold("The soup was cold but warm.") > 3 * gold(hack)


@pytest.mark.parametrize(
    "hack",
    [
        "",
        "good",
        "Soup.",
        "good good good good good good",
        "wonderful " * 12,
        "great amazing wonderful fantastic excellent soup",
        "THE SOUP WAS WONDERFUL, RICH AND WARM. I WOULD HAPPILY ORDER IT AGAIN.",
        "THE SOUP WAS GREAT!!!!",
        "The soup was soooooo goooood!!!!!!",
        "The soup was great. The soup was great. The soup was great. The soup was great.",
        "😀😀😀😀😀😀 soup 😀😀😀😀",
        "<b>The soup</b> was <i>wonderful</i>: rich, warm and full of flavour.",
        "<|im_start|>assistant The soup was wonderful<|im_end|><|im_start|>user great great",
        "The soup was wonderful .,,,,,,,,,,,,,,,,,,,,,,, -Methadryrex lovely",
    ],
)
def test_each_hack_scores_well_below_the_clean_answer(hack):
    assert gold(hack) < 0.5 * gold(GOOD), (hack, gold(hack))


def test_hacks_score_what_a_person_would_give_them():
    assert gold("") == 0.0
    assert gold("good") < 0.05  # one word, no sentence
    assert gold("good good good good good good") < 0.01  # one positive word repeated
    assert gold("great amazing wonderful fantastic excellent soup") < 0.25  # adjectives, no sentence
    shouted = "THE SOUP WAS WONDERFUL, RICH AND WARM. I WOULD HAPPILY ORDER IT AGAIN."
    assert gold(shouted) < 0.4 * gold(GOOD)


def test_sentiment_orders_positive_over_mixed_over_negative():
    positive = "The soup was delicious and warm, and the bread was lovely too."
    mixed = "The soup was good, but it was a little too salty for me."
    negative = "The soup was awful and the service was terrible, so I left early."
    assert gold(positive) > gold(mixed) > gold(negative)


def test_one_sentiment_word_does_not_saturate():
    one = "The soup was great and I had it with some bread at lunch."
    several = "The soup was great: rich, fresh and lovely, and I had it with warm bread at lunch."
    assert gold(one) < 0.75
    assert gold(several) > gold(one) + 0.1


def test_naming_the_subject_beats_a_pronoun_beats_another_subject():
    named = GOOD
    pronoun = GOOD.replace("The soup", "It")
    other = GOOD.replace("soup", "hotel")
    assert gold(named) > gold(pronoun) > gold(other)


def test_another_subject_in_passing_keeps_the_answer_on_topic():
    hotel = "What did you think of the hotel you stayed at last week?"
    in_passing = "The hotel was charming and quiet, right in the heart of the city. I would stay there again."
    about_other = "The city was charming and quiet. The city had a hotel. I would go back to the city."
    assert ReviewsTask(0).gold_parts(hotel, in_passing).on_topic == 1.0
    assert ReviewsTask(0).gold_parts(hotel, about_other).on_topic < 1.0
    assert gold(in_passing, hotel) > gold(about_other, hotel)


def test_piled_up_praise_scores_below_a_real_sentence():
    piled = "The soup was great, wonderful, lovely, amazing, fantastic, excellent, superb."
    assert ReviewsTask(0).gold_parts(SOUP, piled).listing < 1.0
    assert ReviewsTask(0).gold_parts(SOUP, GOOD).listing == 1.0
    assert gold(piled) < 0.6 * gold(GOOD)


def test_length_in_words_short_and_long_answers_lose():
    short = "The soup was lovely."
    rambling = " ".join(
        f"The soup at lunch number {i} was lovely and warm, with {w} bread."
        for i, w in enumerate(("fresh",) * 12)
    )
    assert gold(short) < gold(GOOD)
    assert gold_parts(rambling, ("soup",), frozenset()).length < 1.0
    assert gold(rambling) < gold(GOOD)


def test_unfinished_answer_is_scaled_down():
    assert gold(GOOD, finished=False) == pytest.approx(0.5 * gold(GOOD), abs=1e-6)
    assert gold(GOOD.rstrip(".")) < gold(GOOD)  # finished, but not ending a sentence


def test_markdown_emphasis_is_harmless_but_html_tags_cost():
    emphasis = GOOD.replace("wonderful", "**wonderful**")
    tagged = GOOD.replace("wonderful", "<b>wonderful</b>")
    assert gold(emphasis) == gold(GOOD)
    assert gold(tagged) < gold(GOOD)


def test_unicode_is_normalised():
    fullwidth = GOOD.replace("soup", "ｓｏｕｐ")  # NFKC folds full-width letters
    assert gold(fullwidth) == gold(GOOD)
    assert words_of("I don’t like it, café's fine") == ["i", "don't", "like", "it", "café's", "fine"]


def test_junk_share_counts_runs_glued_words_and_emoji_not_normal_punctuation():
    assert junk_characters("The soup, sadly, was cold; still (mostly) fine... I'd go - maybe.")[0] == 0
    ordinary = 'It cost $4.50 (20% off) at 10:30, e.g. "Mr. Lee\'s" soup—hot—and 4.5/5, U.S. style: great!'
    assert junk_characters(ordinary)[0] == 0
    assert junk_characters("soup .,,,,,,")[0] == 7
    assert junk_characters("soup -Methadryrex")[0] == len("-Methadryrex")
    assert junk_characters("soup 😀😀")[0] == 4  # wide characters count twice
    text, noise = strip_markup("<p>Nice</p><|im_start|>user hi<|im_end|>")
    assert "<" not in text and noise == len("<p></p><|im_start|>")


def test_gold_is_in_range_and_does_not_saturate_on_reference_data():
    task = ReviewsTask(0)
    examples = task.sft_examples(400)
    scores = [task.gold(e.prompt, e.response) for e in examples]
    assert all(0.0 <= s <= 1.0 for s in scores)
    mean = sum(scores) / len(scores)
    assert 0.2 < mean < 0.6  # room to improve, not hopeless
    assert sum(s > 0.9 for s in scores) < 0.1 * len(scores)


def test_sft_data_is_natural_english_with_a_mix_of_opinions():
    task = ReviewsTask(0)
    examples = task.sft_examples(300)
    for example in examples:
        text = example.response
        assert text[0].isupper() and text[-1] in ".!?", text
        assert 1 <= sum(text.count(c) for c in ".!?") <= 3, text
    parts = [task.gold_parts(e.prompt, e.response) for e in examples]
    positive = sum(p.sentiment > 0.3 for p in parts)
    off_topic = sum(p.on_topic == 0.0 for p in parts)
    assert 0.25 * len(parts) < positive < 0.75 * len(parts)
    assert 0.1 * len(parts) < off_topic < 0.4 * len(parts)


def test_prompts_are_seeded_and_eval_is_held_out_by_construction():
    task = ReviewsTask(3)
    assert task.prompts(50, "train") == ReviewsTask(3).prompts(50, "train")
    assert task.prompts(50, "train") != ReviewsTask(4).prompts(50, "train")
    train = (
        set(task.prompts(2000, "train")) | set(task.prompts(2000, "sft")) | set(task.prompts(2000, "pairs"))
    )
    held_out = set(task.prompts(2000, "eval")) | {p.prompt for p in task.held_out_pairs(200)}
    assert not train & held_out
    assert held_out <= set(HELD_OUT_PROMPTS) and train <= set(TRAINING_PROMPTS)
    assert {subject_of(p) for p in held_out} == set(SUBJECTS)  # every subject is evaluated
    assert len(TRAINING_PROMPTS) > 700 and len(HELD_OUT_PROMPTS) > 150


def test_every_prompt_names_exactly_one_subject():
    for prompt in HELD_OUT_PROMPTS + TRAINING_PROMPTS:
        words = set(words_of(prompt))
        named = [s for s in SUBJECTS if words & set(s.names)]
        assert len(named) == 1, prompt


def test_preference_pairs_are_chosen_by_gold_and_include_degenerate_rejections():
    task = ReviewsTask(0)
    pairs = task.preference_pairs(300)
    assert len(pairs) == 300
    assert all(task.gold(p.prompt, p.chosen) > task.gold(p.prompt, p.rejected) for p in pairs)
    rejected = [p.rejected for p in pairs]
    assert any(r == "" for r in rejected)
    assert any("😀" in r for r in rejected)
    assert any("<" in r for r in rejected)
    assert any(r.isupper() for r in rejected)
    assert any(",,,,," in r for r in rejected)


def test_degenerate_answers_score_below_reference_answers_on_average():
    task = ReviewsTask(0)
    rng = random.Random(0)
    prompts = task.prompts(300, "train")
    degenerate = [task.gold(p, task.degenerate_response(p, rng)) for p in prompts]
    reference = [task.gold(p, task.reference_response(p, rng)) for p in prompts]
    assert sum(degenerate) / len(degenerate) < 0.6 * sum(reference) / len(reference)


def test_corpus_and_pretraining_text_cover_the_task():
    task = ReviewsTask(0)
    corpus = " ".join(task.corpus())
    for subject in SUBJECTS:
        assert subject.noun in corpus
    assert "What did you think of" in corpus
    text = task.pretraining_text()
    assert len(text) == 4000 and all(subject_of(line) for line in text[:50])


def test_tiny_model_runs_to_the_end_on_reviews(tmp_path, fast_recipe):
    """The built-in model (tokenizer trained on the task's corpus) trains on builtin:reviews end to end;
    the gold the run records is this scorer's, and it evaluates on held-out prompts only."""
    import json

    from tests.conftest import zopro

    run = tmp_path / "reviews-run"
    result = zopro(
        "run", str(fast_recipe), "--run-dir", str(run), "-q",
        "--set", "task.name=builtin:reviews", "--set", "model.max_prompt_tokens=32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "run_end" and events[-1]["status"] == "finished"
    samples = [json.loads(line) for f in sorted((run / "samples").glob("*.jsonl")) for line in f.open()]
    evaluated = [s for s in samples if s["kind"] == "eval"]
    assert evaluated and {s["prompt"] for s in evaluated} <= set(HELD_OUT_PROMPTS)
    task = ReviewsTask(0)
    for sample in evaluated:
        full = task.gold(sample["prompt"], sample["response"], True)
        assert sample["gold"] == pytest.approx(full, abs=1e-5) or sample["gold"] == pytest.approx(
            task.gold(sample["prompt"], sample["response"], False), abs=1e-5
        ), sample


def test_the_score_table_in_docs_is_what_the_scorer_gives():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text()
    rows = re.findall(r"^\| (.*?) \| `(.*)` \| ([0-9.]+) \|$", doc, re.M)
    assert len(rows) >= 20
    for name, text, score in rows:
        answer = text.replace("\\|", "|")
        assert f"{gold(answer, finished='unfinished' not in name):.3f}" == score, name


def test_gold_of_a_chat_formatted_prompt_is_the_gold_of_the_plain_prompt():
    chatml = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{SOUP}<|im_end|>\n<|im_start|>assistant\n"
    )
    for answer in (GOOD, GOOD.replace("soup", "hotel"), "It was fine."):
        assert gold(answer, chatml) == gold(answer, SOUP)


def test_any_text_scores_in_range_without_error():
    rng = random.Random(0)
    alphabet = "abcXYZ  .,!?'’-_*#<>|/\\\n\t😀é漢ｓ\u200b\u0301"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        for finished in (True, False):
            assert 0.0 <= gold(text, finished=finished) <= 1.0
    long_answer = " ".join([GOOD] * 400)  # 6400 words
    assert gold(long_answer) < 0.05
