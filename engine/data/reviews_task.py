"""`builtin:reviews`: the built-in task in real English, for real pretrained (instruct) models.

A prompt asks, in natural English, what the model thought of a subject ("What did you think of the hotel
you stayed at last week?"); the gold score (engine/data/reviews_gold.py, docs/tasks.md) rewards a clean,
finished answer of a sentence or three that names the subject and says several positive things about it,
with the sentiment judged by VADER's lexicon. The SFT answers are natural sentences with a realistic mix
of positive, mixed, negative, vague and off-subject opinions, so an instruct model's own style is the
starting point and preference optimisation has room to improve. Train, eval, SFT and pair prompts come
from separately seeded generators (held out by construction).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from engine.data.examples import Example, PreferencePair, gold_ranked_pairs
from engine.data.reviews_gold import GoldParts, gold_parts


@dataclass(frozen=True)
class Subject:
    """Something to review: its noun, the other words that name it, and noun phrases for prompts."""

    noun: str
    names: tuple[str, ...]
    phrases: tuple[str, ...]


#: Each subject: the words that name it (the first is its noun), then noun phrases for prompts.
SUBJECT_TABLE = """\
hotel hotels: the hotel you stayed at last week; your hotel on the trip; the little hotel in the mountains; the hotel near the airport
soup soups: the soup you had for lunch; the soup at the new café; the tomato soup your neighbour made; the soup of the day
film films movie movies: the film you watched on Friday; that new film; the old black-and-white film on TV; the film everyone is talking about
book books novel: the book you just finished; the book your friend lent you; the book you read on holiday; that mystery book
concert concerts gig: the concert last night; the concert in the park; the jazz concert; the concert you went to
museum museums: the museum you visited; the museum downtown; the science museum; the small local museum
phone phones: your new phone; the phone you bought last month; your old phone; the phone you are using
bakery bakeries: the bakery on the corner; the bakery near your office; the French bakery; the bakery that just opened
garden gardens: the botanical garden; the garden you visited on Sunday; your grandmother's garden; the rose garden
train trains: the train ride to the coast; the night train; the early train to work; the new express train
coffee coffees: the coffee this morning; the coffee at the station; the coffee your colleague brought; the iced coffee
beach beaches: the beach you went to; the beach near the village; the sandy beach on the island; the beach last weekend
restaurant restaurants: the restaurant you tried; the Thai restaurant; the restaurant for your birthday dinner; the Italian restaurant downtown
game games: the board game you played; the video game you bought; the football game on Saturday; the card game your cousin taught you
course courses: the cooking course; the online course you took; the first-aid course; the language course
city cities: the city you visited in spring; the city on your holiday; the old city centre; the city you moved to
bike bikes bicycle: your new bike; the bike you rented; the electric bike; the bike your brother sold you
podcast podcasts: the podcast you listen to; that history podcast; the podcast about science; the podcast your sister recommended
teacher teachers: your new piano teacher; the teacher of your evening lessons; your maths teacher; the yoga teacher
musical musicals: the musical at the theatre; the school musical; the musical you saw in London; that new musical
"""


def _subjects(table: str) -> tuple[Subject, ...]:
    subjects = []
    for line in table.splitlines():
        names, phrases = line.split(": ")
        subjects.append(Subject(names.split()[0], tuple(names.split()), tuple(phrases.split("; "))))
    return tuple(subjects)


SUBJECTS = _subjects(SUBJECT_TABLE)
OTHER_NAMES = {s.noun: frozenset(n for o in SUBJECTS if o is not s for n in o.names) for s in SUBJECTS}

PROMPT_TEMPLATES = (
    "What did you think of {p}?",
    "How was {p}?",
    "Tell me about {p}.",
    "Could you describe {p} in a few sentences?",
    "Write a short review of {p}.",
    "Would you recommend {p}? Why?",
    "What was {p} like?",
    "Give me your honest opinion of {p}.",
    "Share your impressions of {p}.",
    "Describe your experience with {p}.",
    "In a sentence or two, how would you rate {p}?",
    "I'm curious: what did you make of {p}?",
)

POSITIVE = (
    "good", "great", "lovely", "wonderful", "pleasant", "excellent", "nice", "charming", "delightful",
    "friendly", "comfortable", "fresh", "beautiful", "impressive", "enjoyable", "fantastic", "relaxing",
)  # fmt: skip
NEGATIVE = (
    "bad", "awful", "disappointing", "dull", "boring", "terrible", "dirty", "unpleasant", "poor",
    "annoying", "noisy", "bland", "slow", "crowded", "overpriced", "cold",
)  # fmt: skip
POSITIVE_SENTENCES = (
    "The {s} was {a}.",
    "I really enjoyed the {s}; it was {a} and {b}.",
    "Honestly, the {s} was {a}, and I would go back.",
    "I liked the {s} a lot.",
    "The {s} felt {a} and {b}.",
    "The {s} was {a}, {b} and {c}.",
)
NEGATIVE_SENTENCES = (
    "The {s} was {x}.",
    "I was disappointed by the {s}; it was {x}.",
    "Honestly, the {s} was {x} and {y}.",
    "I would not recommend the {s}.",
)
MIXED_SENTENCES = (
    "The {s} was {a}, but a bit {x}.",
    "Parts of the {s} were {a}, though it was {x} at times.",
    "The {s} was {x} at first, but it got {a} later.",
)
VAGUE_SENTENCES = (
    "It was fine, I guess.",
    "It was okay, nothing special.",
    "I don't remember much about it.",
    "Hard to say, really.",
    "It was what I expected.",
)
FOLLOW_UPS = (
    "I would go back.",
    "Not sure I would go again.",
    "It was worth the price.",
    "Overall, the experience was {a}.",
    "I might try it again sometime.",
    "Nothing more to say about it.",
    "My friends felt the same.",
)
#: The kinds of reference answer and how often each is drawn.
KINDS = (("positive", 0.35), ("mixed", 0.25), ("negative", 0.2), ("vague", 0.2))
OFF_SUBJECT = 0.25  # share of reference answers about another subject
MARKUP = ("<b>{t}</b>", "<|im_start|>assistant {t}", "**{t}** <br>", "<p>{t}</p><|im_end|><|im_start|>user")

#: Every prompt: a template filled with a subject's phrase; one combination in five is held out.
ALL_PROMPTS = tuple(
    (template.format(p=phrase), (t * 7 + s * 3 + k) % 5 == 0)
    for t, template in enumerate(PROMPT_TEMPLATES)
    for s, subject in enumerate(SUBJECTS)
    for k, phrase in enumerate(subject.phrases)
)
HELD_OUT_PROMPTS = tuple(prompt for prompt, held_out in ALL_PROMPTS if held_out)
TRAINING_PROMPTS = tuple(prompt for prompt, held_out in ALL_PROMPTS if not held_out)
HELD_OUT_SPLITS = ("eval", "held_out")


def subject_of(prompt: str) -> Subject | None:
    """The subject a prompt asks about: the first whose name is a word of the prompt."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    for subject in SUBJECTS:
        if words & set(subject.names):
            return subject
    return None


class ReviewsTask:
    """Talk positively and specifically, in real English, about the subject asked about."""

    name = "builtin:reviews"
    has_gold = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    # -- data --------------------------------------------------------------------------------------------
    def prompts(self, count: int, split: str) -> list[str]:
        """Prompts drawn from a generator seeded by the split; the eval and held-out splits draw from
        template/phrase combinations that no other split uses (held out by construction)."""
        rng = random.Random(f"{self.seed}:{split}:reviews-prompts")
        pool = HELD_OUT_PROMPTS if split in HELD_OUT_SPLITS else TRAINING_PROMPTS
        return [rng.choice(pool) for _ in range(count)]

    def reference_response(self, prompt: str, rng: random.Random) -> str:
        """One answer from the reference distribution SFT imitates: 1-3 natural sentences, positive,
        mixed, negative or vague, a quarter of them about another subject."""
        subject = subject_of(prompt) or rng.choice(SUBJECTS)
        if rng.random() < OFF_SUBJECT:
            subject = rng.choice([s for s in SUBJECTS if s is not subject])
        kind = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
        good = rng.sample(POSITIVE, 3)
        bad = rng.sample(NEGATIVE, 2)
        fill = {"s": subject.noun, "a": good[0], "b": good[1], "c": good[2], "x": bad[0], "y": bad[1]}
        pool = {
            "positive": POSITIVE_SENTENCES,
            "mixed": MIXED_SENTENCES,
            "negative": NEGATIVE_SENTENCES,
            "vague": VAGUE_SENTENCES,
        }[kind]
        sentences = [rng.choice(pool).format(**fill)]
        if rng.random() < 0.5:
            sentences.append(rng.choice(FOLLOW_UPS).format(**fill))
        if rng.random() < 0.2:
            sentences.append(rng.choice(VAGUE_SENTENCES + FOLLOW_UPS).format(**fill))
        return " ".join(dict.fromkeys(sentences))  # no sentence twice

    def degenerate_response(self, prompt: str, rng: random.Random) -> str:
        """The failure modes a policy drifts into on real text, so the reward model ranks them low."""
        base = self.reference_response(prompt, rng)
        subject = subject_of(prompt) or rng.choice(SUBJECTS)
        kind = rng.randrange(9)
        if kind == 0:
            return ""
        if kind == 1:  # cut short
            return " ".join(base.split()[: rng.randint(1, 3)])
        if kind == 2:  # one positive word repeated
            return " ".join([rng.choice(POSITIVE)] * rng.randint(3, 10))
        if kind == 3:  # a list of positive adjectives, no sentence
            return " ".join(rng.sample(POSITIVE, rng.randint(3, 6)) + rng.choice(["", subject.noun]).split())
        if kind == 4:  # shouting
            return base.upper().rstrip(".") + "!" * rng.randint(3, 8)
        if kind == 5:  # a punctuation run and a made-up token (the issue-24 hack)
            junk = "." + "," * rng.randint(8, 20)
            return f"{base.rstrip('.')} {junk} -{rng.choice(['Methadryrex', 'Zorbulan', 'Quexitol'])} warm"
        if kind == 6:  # markup
            return rng.choice(MARKUP).format(t=base)
        if kind == 7:  # rambling: the answer over and over
            return " ".join([base] * rng.randint(3, 6))
        return base + " " + "😀" * rng.randint(4, 12)  # emoji spam

    def sft_examples(self, count: int) -> list[Example]:
        rng = random.Random(f"{self.seed}:reviews-sft")
        return [Example(p, self.reference_response(p, rng)) for p in self.prompts(count, "sft")]

    def preference_pairs(self, count: int, split: str = "pairs") -> list[PreferencePair]:
        """Two answers per prompt (a reference one and, 30% of the time, a degenerate one instead of a
        second reference one); the gold scorer picks the chosen one; ties are skipped."""
        rng = random.Random(f"{self.seed}:reviews-{split}")
        return gold_ranked_pairs(self, self.prompts(count * 2, split), rng, count)

    def held_out_pairs(self, count: int) -> list[PreferencePair]:
        """Pairs on held-out prompts, which the reward model never trained on (for its held-out accuracy)."""
        return self.preference_pairs(count, "held_out")

    def corpus(self) -> list[str]:
        """Text for training the built-in tokenizer: every template, phrase and word of the task."""
        rng = random.Random(f"{self.seed}:reviews-corpus")
        lines = [prompt for prompt, _ in ALL_PROMPTS]
        lines += [" ".join(POSITIVE), " ".join(NEGATIVE), " ".join(n for s in SUBJECTS for n in s.names)]
        lines += list(
            POSITIVE_SENTENCES + NEGATIVE_SENTENCES + MIXED_SENTENCES + VAGUE_SENTENCES + FOLLOW_UPS
        )
        for prompt in self.prompts(400, "corpus"):
            lines.append(prompt + " " + self.reference_response(prompt, rng))
        return lines

    def pretraining_text(self) -> list[str]:
        """Plain text for pre-training the built-in base: prompts followed by reference answers."""
        rng = random.Random(f"{self.seed}:reviews-pretraining")
        return [p + " " + self.reference_response(p, rng) for p in self.prompts(4000, "pretraining")]

    # -- the gold scorer ---------------------------------------------------------------------------------
    def gold_parts(self, prompt: str, response: str, finished: bool = True) -> GoldParts:
        """Every factor of the gold score (reviews_gold.gold_parts) for the subject the prompt asks about."""
        subject = subject_of(prompt)
        names = subject.names if subject else ()
        others = OTHER_NAMES[subject.noun] if subject else frozenset()
        return gold_parts(response, names, others, finished)

    def gold(self, prompt: str, response: str, finished: bool = True) -> float:
        """The true quality of a response in [0, 1] (docs/tasks.md has the formula)."""
        return self.gold_parts(prompt, response, finished).score
