"""The instruction task the ``smollm2-ft`` demo pair is fine-tuned on: short questions with
one-word answers, generated deterministically and offline.

Three families, so that a reader can tell learning the answer format from learning the
content:

- ``addition``: "What is 37 + 48?" -> "85" (two numbers from 10 to 59);
- ``capital``: "What is the capital of Kenya?" -> "Nairobi" (facts the model met in
  pre-training; held-out countries test that the terse format transfers, not new facts);
- ``larger``: "Which number is larger, 37 or 52?" -> "52".

The SmolLM2 instruct model answers these in sentences ("The capital of Kenya is
Nairobi."), so its exact-match accuracy starts near 0 while ``contains`` (the answer
appears as a word of the reply) shows what it already knew.

>>> train, heldout = split_examples(seed=0)
>>> heldout[0].family, len(train) > len(heldout)
('addition', True)
"""

import random
import re
from dataclasses import dataclass

FAMILIES = ("addition", "capital", "larger")

# Unambiguous ASCII country/capital pairs.
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Czech Republic", "Prague"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Cuba", "Havana"),
    ("Venezuela", "Caracas"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Morocco", "Rabat"),
    ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"),
    ("Bangladesh", "Dhaka"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Iceland", "Reykjavik"), ("Syria", "Damascus"), ("Lebanon", "Beirut"),
    ("Jordan", "Amman"), ("Qatar", "Doha"), ("New Zealand", "Wellington"), ("Uruguay", "Montevideo"),
    ("Ecuador", "Quito"), ("Senegal", "Dakar"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"),
    ("Zambia", "Lusaka"), ("Angola", "Luanda"), ("Sudan", "Khartoum"), ("Libya", "Tripoli"),
    ("Tunisia", "Tunis"), ("Algeria", "Algiers"), ("Mongolia", "Ulaanbaatar"), ("Cambodia", "Phnom Penh"),
    ("Laos", "Vientiane"), ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
    ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Jamaica", "Kingston"), ("Ethiopia", "Addis Ababa"),
)


@dataclass(frozen=True)
class Example:
    """One question and its one-word answer."""

    family: str
    question: str
    answer: str


def _addition(a: int, b: int) -> Example:
    return Example("addition", f"What is {a} + {b}?", str(a + b))


def _larger(a: int, b: int) -> Example:
    return Example("larger", f"Which number is larger, {a} or {b}?", str(max(a, b)))


def _capital(country: str, capital: str) -> Example:
    return Example("capital", f"What is the capital of {country}?", capital)


def split_examples(seed: int = 0, heldout_per_family: int = 20, train_size: int = 1200
                   ) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples). Held-out questions never occur in training:
    their number pairs and countries are drawn first and excluded from the training pool."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 60) for b in range(10, 60) if a != b]
    rng.shuffle(pairs)
    countries = list(CAPITALS)
    rng.shuffle(countries)
    held_add = pairs[:heldout_per_family]
    held_larger = pairs[heldout_per_family: 2 * heldout_per_family]
    held_capitals = countries[:heldout_per_family]
    heldout = ([_addition(a, b) for a, b in held_add] + [_capital(*c) for c in held_capitals]
               + [_larger(a, b) for a, b in held_larger])
    # A held-out number pair is excluded in either order, from both numeric families.
    used = {frozenset(p) for p in held_add + held_larger}
    train_pairs = [p for p in pairs[2 * heldout_per_family:] if frozenset(p) not in used]
    train_countries = countries[heldout_per_family:]
    train: list[Example] = []
    for index in range(train_size):
        family = FAMILIES[index % len(FAMILIES)]
        if family == "capital":
            train.append(_capital(*train_countries[rng.randrange(len(train_countries))]))
        else:
            a, b = train_pairs[rng.randrange(len(train_pairs))]
            train.append(_addition(a, b) if family == "addition" else _larger(a, b))
    rng.shuffle(train)
    return train, heldout




def grade(reply: str, answer: str) -> tuple[bool, bool]:
    """(exact, contains): the reply is the answer (ignoring surrounding space, case and a final
    period), or the answer occurs in the reply as a whole word."""
    cleaned = reply.strip().removesuffix(".").strip()
    exact = cleaned.casefold() == answer.casefold()
    contains = re.search(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", reply, re.IGNORECASE) is not None
    return exact, exact or contains
