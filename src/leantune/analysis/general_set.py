"""The general set (issue 29): a fixed set of general prompts with checkable answers, built
here without the network and the same on every call; :mod:`leantune.analysis.general` answers
and scores it.

* arithmetic, generated with a fixed seed (``random.Random(GENERAL_SEED)``): sums, differences,
  products and exact quotients whose result differs from both operands;
* facts from the tables below: capitals, units and counts, dates, simple science and language;
* instruction following, scored by rule: one word (the right one), one sentence, a list of
  three, uppercase, yes or no (the right one), the number alone (the right one), two to five
  words, at least twenty words. Rules that reward a short answer and rules that reward a long
  one are balanced, so that a model that answers everything with one word does not gain.

Today's four prompts (the capital of France, three health tips, 12 times 11, one sentence about
the sea) are part of it; :func:`general_prompts` gives every prompt, so that training data (the
keep loss's conversations) can be kept apart from the measure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from leantune.core.errors import LeantuneError

GENERAL_SEED = 29
"""The seed of the arithmetic items (issue 29)."""
GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "What is 12 times 11?",
    "Write one sentence about the sea.",
)
"""The four prompts every instruct run answered before the set existed; always measured."""
SHORT_TOKENS = 32
"""Longest answer to an arithmetic or fact prompt (a number or a few words, and the sentence
around them)."""
LONG_TOKENS = 48
"""Longest answer to an instruction prompt (a sentence, a list of three)."""

_CAPITALS = (
    "France:Paris Germany:Berlin Italy:Rome Spain:Madrid Portugal:Lisbon Japan:Tokyo "
    "China:Beijing Russia:Moscow the_United_Kingdom:London Canada:Ottawa Australia:Canberra "
    "India:New_Delhi Egypt:Cairo Kenya:Nairobi Greece:Athens Norway:Oslo Sweden:Stockholm "
    "Finland:Helsinki Denmark:Copenhagen Poland:Warsaw Austria:Vienna Hungary:Budapest "
    "Ireland:Dublin the_Netherlands:Amsterdam Belgium:Brussels Switzerland:Bern|Berne "
    "Turkey:Ankara Argentina:Buenos_Aires Peru:Lima Chile:Santiago Colombia:Bogota "
    "Brazil:Brasilia Thailand:Bangkok South_Korea:Seoul Indonesia:Jakarta "
    "the_Philippines:Manila Vietnam:Hanoi Iran:Tehran Iraq:Baghdad Saudi_Arabia:Riyadh "
    "Nigeria:Abuja Ethiopia:Addis_Ababa Morocco:Rabat Cuba:Havana the_Czech_Republic:Prague "
    "Ukraine:Kyiv|Kiev Romania:Bucharest Iceland:Reykjavik New_Zealand:Wellington "
    "the_United_States:Washington"
)
_FACTS = {
    "unit": (
        "How many centimetres are in a metre?=100; How many metres are in a kilometre?=1000; "
        "How many grams are in a kilogram?=1000; How many millilitres are in a litre?=1000; "
        "How many seconds are in a minute?=60; How many minutes are in an hour?=60; "
        "How many hours are in a day?=24; How many days are in a week?=7; "
        "How many months are in a year?=12; How many days are in a leap year?=366; "
        "How many sides does a hexagon have?=6; How many sides does a triangle have?=3; "
        "How many sides does an octagon have?=8; How many legs does a spider have?=8; "
        "How many legs does an insect have?=6; How many continents are there on Earth?=7; "
        "How many planets are in the Solar System?=8; How many years are in a century?=100; "
        "How many years are in a decade?=10; How many minutes are in a quarter of an hour?=15; "
        "How many degrees are in a right angle?=90; How many degrees are in a full circle?=360; "
        "How many players does a football team have on the pitch?=11; "
        "How many strings does a standard guitar have?=6; "
        "How many keys does a standard piano have?=88; How many weeks are in a year?=52; "
        "How many inches are in a foot?=12; How many days are in September?=30"
    ),
    "date": (
        "In which year did World War II end?=1945; In which year did World War I begin?=1914; "
        "In which year did humans first land on the Moon?=1969; "
        "In which year did the Berlin Wall fall?=1989; "
        "In which year did Christopher Columbus first reach the Americas?=1492; "
        "In which year did the French Revolution begin?=1789; "
        "In which year was the United States Declaration of Independence signed?=1776; "
        "In which year did the Titanic sink?=1912; In which year did World War I end?=1918; "
        "In which year did World War II begin?=1939; "
        "What is the first month of the year?=January; "
        "What is the last month of the year?=December; Which month comes after March?=April; "
        "Which day of the week comes after Monday?=Tuesday; "
        "Which month has the fewest days?=February; "
        "Which day of the week comes before Sunday?=Saturday"
    ),
    "science": (
        "What is the chemical symbol for gold?=Au; What is the chemical formula of water?=H2O; "
        "What is the chemical symbol for iron?=Fe; What is the chemical symbol for sodium?=Na; "
        "At what temperature in degrees Celsius does water boil at sea level?=100; "
        "At what temperature in degrees Celsius does water freeze?=0; "
        "What is the largest planet in the Solar System?=Jupiter; "
        "Which planet is closest to the Sun?=Mercury; "
        "Which planet is known as the Red Planet?=Mars; "
        "Which gas do plants take in from the air to make food?=carbon dioxide|CO2; "
        "Which gas do humans need to breathe in to live?=oxygen; "
        "What is the largest ocean on Earth?=Pacific; "
        "What is the tallest mountain in the world?=Everest; "
        "What is the fastest land animal?=cheetah; What sweet food do bees make?=honey; "
        "What is the largest mammal on Earth?=whale; "
        "What is the hardest natural substance?=diamond; "
        "Which star is at the centre of our solar system?=Sun; "
        "What is the Earth's natural satellite called?=Moon; "
        "Which organ pumps blood around the human body?=heart; "
        "What is the longest river in Africa?=Nile; "
        "What is the largest country in the world by area?=Russia"
    ),
    "language": (
        "Who wrote Romeo and Juliet?=Shakespeare; Who painted the Mona Lisa?=Leonardo|Vinci; "
        "Who developed the theory of relativity?=Einstein; Who wrote the novel 1984?=Orwell; "
        "What colour do you get by mixing blue and yellow?=green; "
        "What colour do you get by mixing red and white?=pink; "
        "What is the opposite of hot?=cold; What is the plural of mouse?=mice; "
        "What is the plural of child?=children; What is the opposite of up?=down; "
        "Which language is mainly spoken in Brazil?=Portuguese; "
        "What is the currency of Japan?=yen; What is the currency of the United Kingdom?=pound; "
        "On which continent is Egypt?=Africa; On which continent is Argentina?=South America; "
        "What is the past tense of go?=went; What is the opposite of early?=late"
    ),
}
_INSTRUCTIONS = {
    "one_word": (
        "Answer with one word only: {}",
        "what colour is grass?=green|what animal says moo?=cow/cows|what is the opposite of "
        "night?=day|what do you call frozen water?=ice|what do cows drink?=water|which "
        "season comes after winter?=spring|what is the colour of a ripe banana?=yellow|what "
        "do you sleep on?=bed/mattress/pillow|what falls from clouds when it rains?=rain/water/"
        "raindrops/drops|what animal barks?=dog/dogs",
    ),
    "one_sentence": (
        "Write one sentence about {}.",
        "the sea|the moon|a forest|your favourite food|winter|a city at night|the mountains|"
        "a good friend|the rain|learning a language",
    ),
    "list_three": (
        "List three {}.",
        "fruits|colours|animals that live in the sea|musical instruments|countries in Europe|"
        "things you find in a kitchen|sports played with a ball|vegetables|planets|"
        "ways to save water",
    ),
    "uppercase": (
        "Reply in uppercase letters only: {}",
        "what is your favourite season?|describe the sky.|say hello.|what is a cat?|"
        "name a colour.|what do you drink in the morning?|describe a tree.|name a fruit.|"
        "what is the weather like today?|say good night.",
    ),
    "yes_no": (
        "Answer with yes or no only: {}",
        "is the sun a star?=yes|is snow white?=yes|can fish fly?=no|is ice cold?=yes|"
        "is the moon made of cheese?=no|do cats bark?=no|is Paris in France?=yes|"
        "is five greater than ten?=no|do birds have feathers?=yes|is fire cold?=no",
    ),
    "number_only": (
        "Reply with only a number: {}",
        "how many legs does a dog have?=4|how many wheels does a bicycle have?=2|how many "
        "fingers are on one hand?=5|how many days are in a weekend?=2|how many eyes does a "
        "person have?=2|what is five plus five?=10|how many letters are in the word cat?=3|"
        "how many sides does a square have?=4|what is ten minus three?=7|how many wheels "
        "does a tricycle have?=3",
    ),
    "few_words": (
        "Describe {} in two to five words.",
        "a cat|the ocean|a summer day|a library|coffee|a mountain|a train|a garden|snow|music",
    ),
    "min_words": (
        "Write at least twenty words about {}.",
        "the sun|a river|your morning|a market|the wind|a birthday|a bridge|a school|the stars|"
        "a holiday",
    ),
}


@dataclass(frozen=True)
class GeneralItem:
    """One general prompt: its ``kind`` (arithmetic, fact, instruction), its ``category`` (the
    fact table or the instruction rule), the expected answers (any one counts) and its rule."""

    prompt: str
    kind: str
    category: str
    answers: tuple[str, ...] = ()
    rule: str = "contains"

    @property
    def max_new_tokens(self) -> int:
        return LONG_TOKENS if self.kind == "instruction" else SHORT_TOKENS


def _arithmetic(rng: random.Random) -> tuple[str, int]:
    op = rng.choice(("plus", "minus", "times", "divided by"))
    if op == "plus":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} plus {b}?", a + b
    if op == "minus":
        a = rng.randint(20, 99)
        b = rng.choice([b for b in range(2, a - 1) if a - b != b])
        return f"What is {a} minus {b}?", a - b
    b, c = rng.randint(2, 12), rng.randint(2, 12)
    if op == "times":
        return f"What is {b} times {c}?", b * c
    if c == b:
        c = c + 1
    return f"What is {b * c} divided by {b}?", c


def _arithmetic_items(count: int = 64) -> list[GeneralItem]:
    rng = random.Random(GENERAL_SEED)
    items = [GeneralItem("What is 12 times 11?", "arithmetic", "arithmetic", ("121",))]
    seen = {items[0].prompt}
    while len(items) < count:
        prompt, value = _arithmetic(rng)
        if prompt not in seen:
            seen.add(prompt)
            items.append(GeneralItem(prompt, "arithmetic", "arithmetic", (str(value),)))
    return items


def _fact_items() -> list[GeneralItem]:
    items = []
    for pair in _CAPITALS.split():
        country, capital = (s.replace("_", " ") for s in pair.split(":"))
        prompt = f"What is the capital of {country}?"
        items.append(GeneralItem(prompt, "fact", "capital", tuple(capital.split("|"))))
    for category, table in _FACTS.items():
        for row in table.split("; "):
            prompt, answers = row.rsplit("=", 1)
            items.append(GeneralItem(prompt, "fact", category, tuple(answers.split("|"))))
    return items


def _instruction_items() -> list[GeneralItem]:
    items = [GeneralItem(GENERAL_PROMPTS[1], "instruction", "list_three", rule="list_three")]
    for rule, (template, fills) in _INSTRUCTIONS.items():
        for fill in fills.split("|"):
            text, _, answer = fill.partition("=")
            answers = tuple(answer.split("/")) if answer else ()
            items.append(GeneralItem(template.format(text), "instruction", rule, answers, rule))
    return items


@lru_cache(maxsize=1)
def _all_items() -> tuple[GeneralItem, ...]:
    items = _arithmetic_items() + _fact_items() + _instruction_items()
    return tuple(items)


def general_items(limit: int | None = None) -> list[GeneralItem]:
    """The general set (the same on every call), or ``limit`` of it: the four old prompts,
    then an interleave of the categories in their order, so a smaller count keeps each
    category's share roughly and is a prefix of a larger one."""
    if limit is not None and limit < 0:
        raise LeantuneError(f"--general-examples must be 0 (off) or more, got {limit}")
    items = list(_all_items())
    if limit is None or limit >= len(items):
        return items
    first = [next(i for i in items if i.prompt == p) for p in GENERAL_PROMPTS]
    by_category: dict[str, list[GeneralItem]] = {}
    for item in items:
        if item not in first:
            by_category.setdefault(item.category, []).append(item)
    # Each item at its fractional position in its category: the categories interleave evenly.
    rest = sorted(
        (
            ((k + 0.5) / len(rows), c, k, item)
            for c, rows in enumerate(by_category.values())
            for k, item in enumerate(rows)
        ),
        key=lambda row: row[:3],
    )
    return (first + [row[3] for row in rest])[:limit]


def general_prompts() -> list[str]:
    """Every prompt of the whole set (whatever count a run measures): what training data such
    as the keep loss's conversations must never contain."""
    return [item.prompt for item in _all_items()]
