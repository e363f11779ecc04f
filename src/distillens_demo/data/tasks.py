"""The demo's procedural task families: pure functions of a ``random.Random`` that return one instruction
record ``{"instruction", "input", "output", "task"}`` (the Dolly/MiniLLM JSONL schema) with a short, checkable
answer. The families range from trivial (copying) to hard for a few-million-parameter model (multi-step
arithmetic chains), so a briefly trained student lands somewhere between 0 and 100% exact match and the
distillation objectives can be told apart. :mod:`.suite` draws splits from them, writes them and trains
the suite tokenizer.
"""

from __future__ import annotations

import inspect
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

Example = dict[str, str]
TaskGenerator = Callable[[random.Random], Example]

# Short, common, lowercase words (3-6 letters, letters only) shared by the word-based families.
WORDS = (
    "apple", "baker", "beach", "bird", "black", "blue", "boat", "bread", "brick", "brown",
    "cake", "camel", "candle", "card", "cat", "chair", "cloud", "coat", "corn", "cow",
    "desk", "dog", "door", "dragon", "drum", "duck", "eagle", "earth", "egg", "field",
    "fish", "flag", "flower", "fox", "frog", "garden", "gold", "grape", "green", "hat",
    "hill", "horse", "house", "ice", "iron", "jam", "jar", "key", "kite", "lake",
    "lamp", "leaf", "lemon", "lion", "map", "milk", "moon", "mouse", "nest", "night",
    "ocean", "olive", "orange", "owl", "paper", "peach", "pen", "pepper", "pig", "pink",
    "plum", "pond", "queen", "rabbit", "rain", "red", "river", "road", "rock", "rose",
    "salt", "sand", "seed", "sheep", "ship", "silver", "snow", "sock", "spoon", "star",
    "stone", "sugar", "sun", "table", "tiger", "tree", "truck", "violet", "wall", "water",
    "whale", "wheel", "white", "wind", "window", "wolf", "wood", "yellow", "zebra", "zero",
)  # fmt: skip
_VOWELS = frozenset("aeiou")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_VARIABLE_NAMES = "abcdmnpqrstuvwxyz"


# ---------------------------------------------------------------------------------------------------------
# Small shared helpers
# ---------------------------------------------------------------------------------------------------------


def _example(instruction: str, input: str, output: str, task: str) -> Example:
    """One record in the suite's JSONL schema."""
    return {"instruction": instruction, "input": input, "output": output, "task": task}


def _join(items: Iterable[object]) -> str:
    """Render a list the way every family writes it: ``"a, b, c"``."""
    return ", ".join(str(item) for item in items)


def _random_numbers(rng: random.Random, count: int, low: int, high: int) -> list[int]:
    """``count`` integers drawn uniformly from ``[low, high]`` (repeats allowed)."""
    return [rng.randint(low, high) for _ in range(count)]


def _random_words(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct words from `WORDS`."""
    return rng.sample(WORDS, count)


def _apply_op(left: int, op: str, right: int) -> int:
    """Evaluate ``left op right`` for the three operators the suite uses."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    raise ValueError(f"op must be one of '+', '-', '*'; got {op!r}")


# ---------------------------------------------------------------------------------------------------------
# Task families: each is a pure function of the rng and returns one example
# ---------------------------------------------------------------------------------------------------------


def copy_text(rng: random.Random) -> Example:
    """Copy a short phrase of 3-6 words unchanged (easy; multi-word output)."""
    phrase = " ".join(_random_words(rng, rng.randint(3, 6)))
    instruction = rng.choice(
        ("Repeat the input exactly.", "Copy the following text.", "Write the input back without changes.")
    )
    return _example(instruction, phrase, phrase, "copy_text")


def arithmetic(rng: random.Random) -> Example:
    """Add or subtract two numbers below 100, or multiply two numbers up to 12."""
    op = rng.choice("+-*")
    if op == "*":
        left, right = rng.randint(0, 12), rng.randint(0, 12)
    else:
        left, right = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-" and right > left:
            left, right = right, left
    expression = f"{left} {op} {right}"
    answer = str(_apply_op(left, op, right))
    if rng.random() < 0.5:
        instruction = rng.choice(("What is {expr}?", "Compute {expr}.", "Calculate {expr}.")).format(
            expr=expression
        )
        return _example(instruction, "", answer, "arithmetic")
    instruction = rng.choice(
        (
            "Evaluate the arithmetic expression.",
            "What does this expression equal?",
            "Calculate the value of the expression.",
        )
    )
    return _example(instruction, expression, answer, "arithmetic")


def compare_numbers(rng: random.Random) -> Example:
    """Pick the larger or the smaller of two different numbers below 100 (easy)."""
    left, right = rng.sample(range(100), 2)
    if rng.random() < 0.5:
        instruction = rng.choice(("Which number is larger?", "Give the bigger of the two numbers."))
        answer = max(left, right)
    else:
        instruction = rng.choice(("Which number is smaller?", "Give the lower of the two numbers."))
        answer = min(left, right)
    return _example(instruction, _join((left, right)), str(answer), "compare_numbers")


_LIST_STAT_WORDINGS = {
    "max": ("What is the largest number in the list?", "Return the maximum of these numbers."),
    "min": ("What is the smallest number in the list?", "Return the minimum of these numbers."),
    "count": ("How many numbers are in the list?", "Count the items in the list."),
    "sum": ("What is the sum of the numbers?", "Add up all the numbers in the list."),
}
_LIST_STATS: dict[str, Callable[[list[int]], int]] = {"max": max, "min": min, "count": len, "sum": sum}


def list_stats(rng: random.Random) -> Example:
    """Maximum, minimum, length or sum of 3-7 numbers between 0 and 30."""
    numbers = _random_numbers(rng, rng.randint(3, 7), 0, 30)
    stat = rng.choice(tuple(_LIST_STATS))
    instruction = rng.choice(_LIST_STAT_WORDINGS[stat])
    return _example(instruction, _join(numbers), str(_LIST_STATS[stat](numbers)), "list_stats")


_SORT_WORDINGS = {
    ("numbers", False): (
        "Sort the numbers from smallest to largest.",
        "Arrange these numbers in ascending order.",
    ),
    ("numbers", True): (
        "Sort the numbers from largest to smallest.",
        "Arrange these numbers in descending order.",
    ),
    ("words", False): ("Sort the words alphabetically.", "Put these words in alphabetical order."),
    ("words", True): ("Sort the words in reverse alphabetical order.", "Order these words from Z to A."),
}


def sort_list(rng: random.Random) -> Example:
    """Sort 3-4 numbers or 3-5 words, ascending or descending (multi-item output)."""
    descending = rng.random() < 0.5
    if rng.random() < 0.5:
        kind, items = "numbers", _random_numbers(rng, rng.randint(3, 4), 0, 99)
    else:
        kind, items = "words", _random_words(rng, rng.randint(3, 5))
    instruction = rng.choice(_SORT_WORDINGS[(kind, descending)])
    return _example(instruction, _join(items), _join(sorted(items, reverse=descending)), "sort_list")


def reverse_list(rng: random.Random) -> Example:
    """Reverse the order of 3-5 words (multi-item output)."""
    words = _random_words(rng, rng.randint(3, 5))
    instruction = rng.choice(
        (
            "Reverse the order of the words.",
            "List the items in reverse order.",
            "Write the list backwards, last item first.",
        )
    )
    return _example(instruction, _join(words), _join(reversed(words)), "reverse_list")


_WORD_TRANSFORMS: dict[str, tuple[tuple[str, ...], Callable[[str], str]]] = {
    "reverse": (("Spell the word backwards.", "Reverse the letters of the word."), lambda word: word[::-1]),
    "spell": (
        (
            "Spell the word with dashes between the letters.",
            "Write the letters of the word joined by dashes.",
        ),
        lambda word: "-".join(word),
    ),
    "no_vowels": (
        ("Remove the vowels from the word.", "Write the word without its vowels."),
        lambda word: "".join(letter for letter in word if letter not in _VOWELS),
    ),
}


def word_transform(rng: random.Random) -> Example:
    """Reverse a word's letters, spell it with dashes, or drop its vowels (character-level, hard)."""
    word = rng.choice(WORDS)
    wordings, transform = _WORD_TRANSFORMS[rng.choice(tuple(_WORD_TRANSFORMS))]
    return _example(rng.choice(wordings), word, transform(word), "word_transform")


_LETTER_QUESTIONS: dict[str, tuple[tuple[str, ...], Callable[[str], str]]] = {
    "first": (
        ("What is the first letter of the word?", "Which letter does the word start with?"),
        lambda word: word[0],
    ),
    "last": (
        ("What is the last letter of the word?", "Which letter does the word end with?"),
        lambda word: word[-1],
    ),
    "length": (
        ("How many letters are in the word?", "What is the length of the word?"),
        lambda word: str(len(word)),
    ),
}


def letter_facts(rng: random.Random) -> Example:
    """First letter, last letter, length, or how often a letter occurs in a word."""
    word = rng.choice(WORDS)
    question = rng.choice((*_LETTER_QUESTIONS, "count"))
    if question != "count":
        wordings, answer_for = _LETTER_QUESTIONS[question]
        return _example(rng.choice(wordings), word, answer_for(word), "letter_facts")
    letter = rng.choice(word) if rng.random() < 0.75 else rng.choice(_LETTERS)
    instruction = rng.choice(
        ("How many times does the letter '{c}' appear in the word?", "Count the letter '{c}' in the word.")
    ).format(c=letter)
    return _example(instruction, word, str(word.count(letter)), "letter_facts")


def key_lookup(rng: random.Random) -> Example:
    """Read one value out of 3-6 ``key=value`` pairs; keys are letters or words."""
    count = rng.randint(3, 6)
    keys = rng.sample(_LETTERS, count) if rng.random() < 0.5 else _random_words(rng, count)
    values = _random_numbers(rng, count, 0, 99)
    key_index = rng.randrange(count)
    instruction = rng.choice(
        (
            "What is the value of {k}?",
            "Which number is assigned to {k}?",
            "Look up the value stored under {k}.",
        )
    ).format(k=keys[key_index])
    pairs = ", ".join(f"{key}={value}" for key, value in zip(keys, values))
    return _example(instruction, pairs, str(values[key_index]), "key_lookup")


def _chain_step(rng: random.Random, value: int) -> tuple[str, int]:
    """One operator and operand to apply to ``value`` that keeps the result between 0 and 99."""
    op = rng.choice("+-*")
    if op == "*" and 1 <= value <= 49:
        return op, rng.randint(2, min(3, 99 // value))
    if (op == "-" and value >= 1) or value >= 90:
        return "-", rng.randint(1, min(9, value))
    return "+", rng.randint(1, min(9, 99 - value))


def reasoning_chain(rng: random.Random) -> Example:
    """Follow 2-4 assignments such as ``x = 3; y = x + 2; z = y * 2`` and report one variable (hardest)."""
    names = rng.sample(_VARIABLE_NAMES, rng.randint(2, 4))
    values = [rng.randint(1, 9)]
    statements = [f"{names[0]} = {values[0]}"]
    for position in range(1, len(names)):
        source = rng.randrange(position)
        op, operand = _chain_step(rng, values[source])
        values.append(_apply_op(values[source], op, operand))
        statements.append(f"{names[position]} = {names[source]} {op} {operand}")
    target = rng.randrange(1, len(names))
    instruction = rng.choice(
        ("What is the value of {v}?", "Follow the steps and give the value of {v}.", "Compute {v}.")
    ).format(v=names[target])
    return _example(instruction, "; ".join(statements), str(values[target]), "reasoning_chain")


def neighbor_item(rng: random.Random) -> Example:
    """Name the word just before or just after a given word in a list of 3-6 words."""
    words = _random_words(rng, rng.randint(3, 6))
    if rng.random() < 0.5:
        index = rng.randrange(len(words) - 1)
        wording = ("Which item comes right after {w}?", "What follows {w} in the list?")
        answer = words[index + 1]
    else:
        index = rng.randrange(1, len(words))
        wording = ("Which item comes right before {w}?", "What precedes {w} in the list?")
        answer = words[index - 1]
    instruction = rng.choice(wording).format(w=words[index])
    return _example(instruction, _join(words), answer, "neighbor_item")


TASK_FAMILIES: dict[str, TaskGenerator] = {
    "copy_text": copy_text,
    "compare_numbers": compare_numbers,
    "letter_facts": letter_facts,
    "key_lookup": key_lookup,
    "neighbor_item": neighbor_item,
    "reverse_list": reverse_list,
    "list_stats": list_stats,
    "sort_list": sort_list,
    "arithmetic": arithmetic,
    "word_transform": word_transform,
    "reasoning_chain": reasoning_chain,
}
"""Every task family by name, roughly from easiest to hardest; each maps a ``random.Random`` to one example."""


def describe_task(name: str) -> str:
    """One-line description of a task family (the first line of its generator's docstring)."""
    return inspect.getdoc(TASK_FAMILIES[resolve_tasks([name])[0]]).splitlines()[0]


def resolve_tasks(tasks: Sequence[str] | str | None) -> list[str]:
    """Validate a selection of family names; ``None`` means all families and a lone string means one."""
    if tasks is None:
        return list(TASK_FAMILIES)
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError(f"tasks is empty; pass None for all families or some of: {', '.join(TASK_FAMILIES)}")
    unknown = [name for name in names if name not in TASK_FAMILIES]
    if unknown:
        raise ValueError(
            f"tasks has unknown family {unknown[0]!r}; valid names are: {', '.join(TASK_FAMILIES)}"
        )
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise ValueError(f"tasks names {repeated[0]!r} more than once; list each family once")
    return names
