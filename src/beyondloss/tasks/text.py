"""Generated character-level text: the vocabulary, the instructions and the pretraining corpus of
the fine-tuning task (:mod:`beyondloss.tasks.finetuning`).

Characters (:data:`CHARS`): the 26 lowercase letters, the 10 digits, space and ``.``, then the
specials of :class:`~beyondloss.tasks.sequences.Vocabulary`: ``SEP`` (written ``\\n``: it ends
an instruction's prompt), ``EOS`` and ``PAD``.

Instructions (:data:`INSTRUCTIONS`). Each maps an argument string ``x`` of ``n`` symbols to an
answer ``y`` of ``n`` symbols; its prompt is its verb, a space, ``x`` and ``SEP``
(``"sort dbca\\n"``), and the answer follows:

* ``reverse`` (letters): ``y_k = x_{n-1-k}``. Each answer token is a fixed position of the
  prompt, whatever was generated before: an early greedy error does not derail the later
  tokens (the control).
* ``sort`` (letters): ``x`` in non-decreasing order. Each answer token is the smallest prompt
  letter not yet emitted, counting repeats, so the decoder must read its own output to know
  where it is: a skipped or doubled letter shifts every later token.
* ``parity`` (digits): running parities, ``y_k = (y_{k-1} + x_k) mod 2`` with ``y_{-1} = 0``,
  written ``0`` or ``1``. The short way to the next token is the previous answer token and one
  prompt digit's parity (the parity of a whole prefix is hard for attention to compute at once);
  a model that takes it flips every later token after one wrong bit.

Arguments are drawn i.i.d. uniformly, letters from the first ``n_letters`` of the alphabet,
digits from ``0 .. 9``.

Corpus (:func:`corpus`). Lines of plain text, each of four kinds with equal probability:

* a sentence: 2–4 words of the lexicon separated by spaces, then ``.``, e.g. ``"gab kaicf ed."``;
* one statement per instruction: its verb, the argument, ``is``, the answer and ``.``, as in
  ``"reverse abc is cba."`` and ``"sort dbca is abcd."`` for a lexicon word, and
  ``"parity 3141 is 1001."`` for a random digit string.

The lexicon holds ``n_words`` distinct random words of 2 to ``max_word_length`` letters (from the
same ``n_letters``); digit strings have the same lengths. The statements hold the instructions'
skills as plain text (``" is "`` where a prompt has ``SEP``, ``"."`` where an answer has
``EOS``), on shorter arguments than fine-tuning asks for.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from beyondloss.tasks.sequences import Vocabulary

CHARS = string.ascii_lowercase + string.digits + " ."
"""Characters of the text, token ids ``0 .. len(CHARS) - 1`` in this order."""

VOCABULARY = Vocabulary(len(CHARS))
"""Token ids: :data:`CHARS`, then ``SEP`` (``\\n``), ``EOS`` and ``PAD``."""

_IDS = {char: i for i, char in enumerate(CHARS)} | {"\n": VOCABULARY.sep}


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (characters of :data:`CHARS` and ``\\n`` for ``SEP``)."""
    unknown = set(text) - set(_IDS)
    if unknown:
        raise ValueError(f"characters outside the vocabulary: {''.join(sorted(unknown))!r}")
    return [_IDS[char] for char in text]


def decode(ids: list[int]) -> str:
    """Text of token ids: ``SEP`` as ``\\n``; ``EOS`` and ``PAD`` are dropped."""
    chars = CHARS + "\n"
    return "".join(chars[i] for i in ids if i <= VOCABULARY.sep)


def running_parity(digits: str) -> str:
    """Parities of the running sums of a digit string: ``"3141"`` → ``"1001"``."""
    total, out = 0, []
    for digit in digits:
        total = (total + int(digit)) % 2
        out.append(str(total))
    return "".join(out)


@dataclass(frozen=True)
class Instruction:
    """One instruction: the ``verb`` that starts its prompts and statements, whether its
    arguments are ``letters`` (else digits), and ``solve``, the answer of an argument."""

    verb: str
    letters: bool
    solve: Callable[[str], str]

    def prompt(self, argument: str) -> str:
        """The instruction's prompt for ``argument``, ``SEP`` included: ``"reverse abc\\n"``."""
        return f"{self.verb} {argument}\n"

    def statement(self, argument: str) -> str:
        """The corpus line stating the answer: ``"reverse abc is cba."``."""
        return f"{self.verb} {argument} is {self.solve(argument)}."


INSTRUCTIONS = {
    "reverse": Instruction("reverse", True, lambda x: x[::-1]),
    "sort": Instruction("sort", True, lambda x: "".join(sorted(x))),
    "parity": Instruction("parity", False, running_parity),
}
"""Instruction name → :class:`Instruction` (see the module docs)."""


def random_strings(
    rng: np.random.Generator, count: int, length: int, n_letters: int, letters: bool
) -> list[str]:
    """``count`` strings of ``length`` symbols drawn i.i.d. uniformly from the first
    ``n_letters`` letters (``letters``) or from the ten digits."""
    alphabet = string.ascii_lowercase[:n_letters] if letters else string.digits
    symbols = np.array(list(alphabet))[rng.integers(0, len(alphabet), (count, length))]
    return ["".join(row) for row in symbols]


def lexicon(rng: np.random.Generator, n_words: int, max_length: int, n_letters: int) -> list[str]:
    """``n_words`` distinct random words, lengths uniform in ``2 .. max_length``."""
    words: dict[str, None] = {}
    while len(words) < n_words:
        length = int(rng.integers(2, max_length + 1))
        words[random_strings(rng, 1, length, n_letters, True)[0]] = None
    return list(words)


def corpus(
    rng: np.random.Generator,
    n_lines: int,
    words: list[str],
    n_letters: int,
    held_out: Collection[tuple[str, str]] = (),
) -> list[str]:
    """``n_lines`` corpus lines (module docs) from the lexicon ``words``; a statement of
    instruction ``name`` about argument ``x`` with ``(name, x)`` in ``held_out`` is left out, so
    fewer lines may come back."""
    kinds = ["sentence", *INSTRUCTIONS]
    max_length = max(len(word) for word in words)
    lines = []
    for kind in rng.choice(kinds, n_lines):
        if kind == "sentence":
            picked = rng.choice(len(words), int(rng.integers(2, 5)))
            lines.append(" ".join(words[i] for i in picked) + ".")
            continue
        instruction = INSTRUCTIONS[kind]
        if instruction.letters:
            argument = words[int(rng.integers(len(words)))]
        else:
            length = int(rng.integers(2, max_length + 1))
            argument = random_strings(rng, 1, length, n_letters, False)[0]
        if (kind, argument) not in held_out:
            lines.append(instruction.statement(argument))
    return lines
