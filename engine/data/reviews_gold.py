"""The gold scorer of `builtin:reviews`: how good a real-text answer about a subject is, in [0, 1].

The sentiment comes from VADER (Hutto and Gilbert, 2014; the `vaderSentiment` package and the lexicon it
ships), not from a word list of ours; everything else judges the text as a reader sees it: unicode
normalised (NFKC), chat and HTML markup taken out, words found by a real word pattern, punctuation runs and
junk counted by the share of the text they take. docs/tasks.md states the formula; `gold_parts` returns
every factor so a test or a note can show why an answer scored what it did.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache

#: Chat-template special tokens (`<|im_end|>`, `<|endoftext|>`, ...), removed; leaked ones count as junk.
CHAT_TOKEN = re.compile(r"<\|[^<>|\s]{1,40}\|>")
#: HTML/XML tags, removed and counted as junk (a reader sees them as noise in a review).
HTML_TAG = re.compile(r"</?[A-Za-z][^<>]{0,80}>")
#: Markdown emphasis, code ticks, headings and list bullets: removed without a penalty (a chat UI shows them).
MARKDOWN = re.compile(
    r"\*{1,3}(?=\S)|(?<=\S)\*{1,3}|(?<!\w)_{1,3}(?=\w)|(?<=\w)_{1,3}(?!\w)|`+|^\s*#{1,6}\s+|^\s*[-*+]\s+",
    re.M,
)
#: A word: letters or digits, with inner apostrophes ("don't", "chef's").
WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
#: A whitespace-separated chunk a reader finds clean: optional opening quote or bracket, words joined by
#: hyphens, dashes, slashes or number separators, at most two closing marks (or an ellipsis).
_WORD = r"[^\W_]+(?:['’][^\W_]+)*"
CLEAN_CHUNK = re.compile(
    rf"[\"'“‘(\[]?[$£€]?{_WORD}(?:[-–—/.,:]{_WORD})*%?(?:[.,;:!?\"'”’)\]]{{1,2}}|\.\.\.|…)?"
)
#: Chunks that stand alone in normal text: a dash, an ampersand, one punctuation mark, an ellipsis.
STANDALONE = frozenset({"-", "–", "—", "&", ".", ",", ";", ":", "!", "?", "...", "…"})
#: The same character four or more times in a row ("soooo", "!!!!").
REPEATED_CHARACTER = re.compile(r"(.)\1{3,}")
SENTENCE_END = ".!?…\"'”’)]"

#: English function words (closed-class: articles, pronouns, auxiliaries, prepositions, conjunctions).
#: Sentences use them, lists of adjectives do not; repetition is measured on the other (content) words.
FUNCTION_WORDS = frozenset(
    """a an the this that these those it its it's i i'm i've i'd i'll me my mine we we're our us you you're
    your he she him her his they they're them their there here is are was were be been being am do does did
    done have has had having will would shall should can could may might must not no nor and or but so yet
    if then than as of at by for from in into on onto to with without about over under after before during
    through again also just very too quite really only even still all any each every some more most much
    many few both other such own same what which who whom whose when where why how because while though
    although whether until up down out off one don't didn't wasn't isn't weren't aren't won't wouldn't
    couldn't can't""".split()
)

MIN_WORDS = 8  # fewer words: the length factor is sqrt(words / 8)
MAX_WORDS = 60  # more words: the length factor is 60 / words
POSITIVE_BREADTH = 4  # distinct positive lexicon words for the full sentiment weight
FUNCTION_SHARE = 0.25  # share of function words for the full fluency factor
POSITIVE_SHARE = 0.35  # share of positive lexicon words above which an answer reads as a list of praise
DISTINCT_SHARE = 0.8  # distinct content words / content words for no repetition penalty


@lru_cache(maxsize=1)
def analyzer():
    """VADER's analyzer (reads its lexicon from the installed package, offline; built once)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@dataclass(frozen=True)
class GoldParts:
    """Every factor of the gold score of one answer (see :func:`gold_parts`)."""

    words: int
    sentiment: float
    on_topic: float
    length: float
    junk: float
    repetition: float
    fluency: float
    listing: float
    shouting: float
    ending: float
    score: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def strip_markup(text: str) -> tuple[str, int]:
    """NFKC-normalised text without chat tokens, HTML tags and markdown; and the number of characters of
    markup a reader would see as noise (leaked chat tokens, HTML tags; not the end-of-turn tokens that
    close the answer, nor markdown)."""
    text = unicodedata.normalize("NFKC", text)
    trailing = re.search(rf"(?:\s*{CHAT_TOKEN.pattern})+\s*$", text)
    if trailing:
        text = text[: trailing.start()]
    noise = sum(len(m.group()) for m in CHAT_TOKEN.finditer(text))
    text = CHAT_TOKEN.sub(" ", text)
    noise += sum(len(m.group()) for m in HTML_TAG.finditer(text))
    text = HTML_TAG.sub(" ", text)
    text = MARKDOWN.sub("", text)
    return text.strip(), noise


def words_of(text: str) -> list[str]:
    """The words of a text, lower-cased (letters/digits with inner apostrophes; typographic ones folded)."""
    return [w.lower().replace("’", "'") for w in WORD.findall(text)]


def is_clean(chunk: str) -> bool:
    """A whitespace-separated chunk of ordinary text: a word with ordinary punctuation, or a lone mark."""
    if chunk in STANDALONE:
        return True
    return CLEAN_CHUNK.fullmatch(chunk) is not None and REPEATED_CHARACTER.search(chunk) is None


def display_width(chunk: str) -> int:
    """Characters as a reader sees them: wide ones (emoji, CJK) count twice."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in chunk)


def junk_characters(text: str) -> tuple[int, int]:
    """(junk width, all non-space width): a chunk that is not clean word text (a punctuation run, a word
    glued to stray marks such as `-Methadryrex`, emoji, a character repeated four times) counts whole."""
    junk = total = 0
    for chunk in text.split():
        width = display_width(chunk)
        total += width
        if not is_clean(chunk):
            junk += width
    return junk, total


def subject_named(words: list[str], names: tuple[str, ...], other_names: frozenset[str]) -> float:
    """1 when the asked subject is named at least as often as any other, 0.6 when another is named more,
    0.4 when no subject is named (a pronoun, or vague), 0 when only another subject is."""
    asked = sum(w in names for w in words)
    others = Counter(w for w in words if w in other_names)
    most_other = max(others.values(), default=0)
    if asked:
        return 1.0 if asked >= most_other else 0.6
    return 0.0 if most_other else 0.4


def gold_parts(
    response: str,
    names: tuple[str, ...],
    other_names: frozenset[str],
    finished: bool = True,
) -> GoldParts:
    """Score an answer to a question about the subject called `names` (its noun and plural);
    `other_names` are the other subjects' nouns. The score is

        (0.6 * sentiment + 0.4 * on_topic * (1 - negativity)) * length * junk * repetition * fluency
        * listing * shouting * ending

    - sentiment = max(0, c) * min(1, (1 + distinct positive lexicon words) / 5), c = VADER's compound score
      in [-1, 1] of the clean chunks of the text (junk earns no sentiment); negativity = max(0, -c);
    - on_topic: see :func:`subject_named`;
    - length = sqrt(words / 8) below 8 words, 60 / words above 60, else 1;
    - junk = max(0, 1 - 2 * junk share), the share (by display width) of unclean chunks and markup noise;
    - repetition = min(1, (distinct content words / content words) / 0.8)^2 * distinct word trigrams / trigrams;
    - fluency = 0.25 + 0.75 * min(1, function-word share / 0.25);
    - listing = min(1, 0.35 / share of words that are positive in the lexicon) (praise piled up);
    - shouting = 1 - 0.7 * share of words (2+ letters) in capitals;
    - ending = 0.5 without an end of sequence, 0.9 when finished but not ending a sentence, else 1.
    """
    text, noise = strip_markup(response)
    words = words_of(text)
    zero = GoldParts(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    if not words:
        return zero
    count = len(words)
    lexicon = analyzer().lexicon
    clean_text = " ".join(chunk for chunk in text.split() if is_clean(chunk))  # junk earns no sentiment
    compound = analyzer().polarity_scores(clean_text)["compound"] if clean_text else 0.0
    positive = len({w for w in words if lexicon.get(w, 0.0) > 0})
    sentiment = max(0.0, compound) * min(1.0, (1 + positive) / (1 + POSITIVE_BREADTH))
    on_topic = subject_named(words, names, other_names)
    if count < MIN_WORDS:
        length = (count / MIN_WORDS) ** 0.5
    else:
        length = min(1.0, MAX_WORDS / count)
    junk_chars, total_chars = junk_characters(text)
    junk = max(0.0, 1.0 - 2.0 * (junk_chars + noise) / max(1, total_chars + noise))
    content = [w for w in words if w not in FUNCTION_WORDS]
    distinct = len(set(content)) / len(content) if content else 1.0
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    trigram_share = len(set(trigrams)) / len(trigrams) if trigrams else 1.0
    repetition = min(1.0, distinct / DISTINCT_SHARE) ** 2 * trigram_share
    function_share = (count - len(content)) / count
    fluency = 0.25 + 0.75 * min(1.0, function_share / FUNCTION_SHARE)
    positive_share = sum(lexicon.get(w, 0.0) > 0 for w in words) / count
    listing = min(1.0, POSITIVE_SHARE / positive_share) if positive_share else 1.0
    lettered = [w for w in WORD.findall(text) if sum(c.isalpha() for c in w) >= 2]
    capitals = sum(w.isupper() for w in lettered) / len(lettered) if lettered else 0.0
    shouting = 1.0 - 0.7 * capitals
    ending = 0.5 if not finished else (1.0 if text[-1] in SENTENCE_END else 0.9)
    topic = on_topic * (1.0 - max(0.0, -compound))  # a negative answer earns less for being on topic
    score = (
        (0.6 * sentiment + 0.4 * topic) * length * junk * repetition * fluency * listing * shouting * ending
    )
    return GoldParts(
        words=count,
        sentiment=round(sentiment, 6),
        on_topic=on_topic,
        length=round(length, 6),
        junk=round(junk, 6),
        repetition=round(repetition, 6),
        fluency=round(fluency, 6),
        listing=round(listing, 6),
        shouting=round(shouting, 6),
        ending=ending,
        score=round(min(1.0, max(0.0, score)), 6),
    )
