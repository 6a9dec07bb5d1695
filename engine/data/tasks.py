"""Built-in tasks with a gold scorer: synthetic prompts and responses whose true preference is computable.

`builtin:sentiment` ("chat"): a prompt asks about a subject ("how was the soup ?"); the gold score rewards
a response that talks about that subject, says several different positive things and nothing negative, in
a short finished sentence. The SFT data is deliberately mediocre (mixed sentiment, often the wrong
subject, rarely three positive words), so SFT leaves plenty of room and preference optimisation must find
responses the SFT data rarely shows. The scorer penalises the reward hacks seen on tiny models (one word
repeated, no end of sequence, degenerate length), so it does not saturate within a demo's budget.
"""

from __future__ import annotations

import random

from engine.data.dataset_task import DatasetTask
from engine.data.examples import Example, PreferencePair, gold_ranked_pairs
from engine.data.reviews_task import ReviewsTask

SUBJECTS = (
    "soup",
    "movie",
    "hotel",
    "book",
    "song",
    "garden",
    "train",
    "coffee",
    "game",
    "city",
    "phone",
    "teacher",
    "beach",
    "museum",
    "bakery",
    "concert",
)
POSITIVE = (
    "good",
    "great",
    "lovely",
    "warm",
    "bright",
    "fresh",
    "kind",
    "calm",
    "happy",
    "clean",
    "sweet",
    "friendly",
)
NEGATIVE = (
    "bad",
    "awful",
    "cold",
    "dull",
    "noisy",
    "dirty",
    "sad",
    "slow",
    "rude",
    "bitter",
    "boring",
    "broken",
)
FILLERS = ("very", "quite", "really", "so", "too", "today", "there", "with", "at")
PROMPT_TEMPLATES = (
    "tell me about the {s} .",
    "what did you think of the {s} ?",
    "describe the {s} .",
    "review the {s} .",
    "how was the {s} ?",
)
RESPONSE_TEMPLATES = (
    ("the {s} was {a} .", 3),
    ("the {s} was {a} and {b} .", 4),
    ("it was {a} but {b} .", 2),
    ("the {s} looked {f} {a} .", 2),
    ("my {s} was {a} and {f} {b} .", 2),
    ("the {s} was {a} , {b} and {c} .", 1),
)


def subject_of(prompt: str) -> str | None:
    words = prompt.split()
    for word in words:
        if word in SUBJECTS:
            return word
    return None


class SentimentTask:
    """The built-in chat-shaped task: talk positively and specifically about the subject asked about."""

    name = "builtin:sentiment"
    has_gold = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    # -- data --------------------------------------------------------------------------------------------
    def prompts(self, count: int, split: str) -> list[str]:
        """Train and eval prompts come from different generators (held out by construction)."""
        rng = random.Random(f"{self.seed}:{split}:prompts")
        return [rng.choice(PROMPT_TEMPLATES).format(s=rng.choice(SUBJECTS)) for _ in range(count)]

    def reference_response(self, prompt: str, rng: random.Random) -> str:
        """One response from the mediocre reference distribution that SFT imitates."""
        subject = subject_of(prompt) or rng.choice(SUBJECTS)
        if rng.random() > 0.6:
            subject = rng.choice([s for s in SUBJECTS if s != subject])
        template = rng.choices(
            [t for t, _ in RESPONSE_TEMPLATES], weights=[w for _, w in RESPONSE_TEMPLATES]
        )[0]

        def adjective() -> str:
            return rng.choice(POSITIVE if rng.random() < 0.45 else NEGATIVE)

        return template.format(s=subject, a=adjective(), b=adjective(), c=adjective(), f=rng.choice(FILLERS))

    def degenerate_response(self, prompt: str, rng: random.Random) -> str:
        """The failure modes a policy drifts into (empty, cut short, one word repeated, rambling), so the
        reward model learns to rank them low instead of meeting them first during RL."""
        base = self.reference_response(prompt, rng).split()
        kind = rng.randrange(5)
        if kind == 0:
            return ""
        if kind == 1:
            return " ".join(base[: rng.randint(1, 2)])
        if kind == 2:
            return " ".join([rng.choice(POSITIVE)] * rng.randint(3, 8))
        if kind == 3:
            return " ".join(base + self.reference_response(prompt, rng).split() + base)
        return " ".join(w for w in base if w not in SUBJECTS)

    def sft_examples(self, count: int) -> list[Example]:
        rng = random.Random(f"{self.seed}:sft")
        prompts = self.prompts(count, "sft")
        return [Example(p, self.reference_response(p, rng)) for p in prompts]

    def preference_pairs(self, count: int) -> list[PreferencePair]:
        """Two reference responses per prompt; the gold scorer picks the chosen one (ties are skipped)."""
        rng = random.Random(f"{self.seed}:pairs")
        return gold_ranked_pairs(self, self.prompts(count * 2, "pairs"), rng, count)

    def held_out_pairs(self, count: int) -> list[PreferencePair]:
        """Pairs on prompts the reward model never trained on (for its held-out accuracy)."""
        held = SentimentTask(self.seed + 7919)
        return held.preference_pairs(count)

    def corpus(self) -> list[str]:
        """Text for training the built-in tokenizer: every word and template of the task."""
        rng = random.Random(f"{self.seed}:corpus")
        lines = [t.format(s=s) for t in PROMPT_TEMPLATES for s in SUBJECTS]
        lines += [" ".join(POSITIVE), " ".join(NEGATIVE), " ".join(FILLERS), " ".join(SUBJECTS)]
        for prompt in self.prompts(400, "corpus"):
            lines.append(prompt + " " + self.reference_response(prompt, rng))
        return lines

    def pretraining_text(self) -> list[str]:
        """Plain text for pre-training the built-in base: prompts followed by reference answers."""
        rng = random.Random(f"{self.seed}:pretraining")
        return [p + " " + self.reference_response(p, rng) for p in self.prompts(4000, "pretraining")]

    # -- the gold scorer ---------------------------------------------------------------------------------
    def gold(self, prompt: str, response: str, finished: bool = True) -> float:
        """The true quality of a response in [0, 1].

        0.6 * sentiment + 0.4 * on-topic, scaled down for repetition, bad length and a missing end:
        - sentiment = max(0, distinct positive words - negative words) / 3, capped at 1;
        - on-topic = the prompt's subject is named and no other subject is;
        - repetition factor = (distinct words / words) squared;
        - length factor = 1 for 4..12 words, else 0.5; an unfinished response (no end of sequence) * 0.5.
        """
        words = response.split()
        if not words:
            return 0.0
        positives = len({w for w in words if w in POSITIVE})
        negatives = sum(w in NEGATIVE for w in words)
        sentiment = min(max(0, positives - negatives), 3) / 3
        subject = subject_of(prompt)
        named = {w for w in words if w in SUBJECTS}
        on_topic = 1.0 if subject is not None and named == {subject} else 0.0
        repetition = (len(set(words)) / len(words)) ** 2
        length = 1.0 if 4 <= len(words) <= 12 else 0.5
        ending = 1.0 if finished else 0.5
        return round((0.6 * sentiment + 0.4 * on_topic) * repetition * length * ending, 6)


TASKS = {"builtin:sentiment": SentimentTask, "builtin:reviews": ReviewsTask}


def make_task(recipe):
    """The recipe's task: a built-in one, or a preference dataset (`task.name = "dataset"`, `[data]`)."""
    if recipe.task.name == "dataset":
        return DatasetTask(recipe.data.source(), recipe.task.eval_prompts, recipe.seed)
    return TASKS[recipe.task.name](recipe.seed)
