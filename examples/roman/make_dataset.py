#!/usr/bin/env python3
"""Writes the Roman-numeral example dataset: an integer in digits → its Roman numeral, as
`prompt` + `completion` rows whose prompts end in whitespace.

Each row asks, in one of a few phrasings, for a number from 1 to 3999 in Roman numerals; every
prompt ends in a space or a newline, and the completion is the bare numeral ("MCMXCIV"). Numbers
are drawn without repetition and split so that no number of eval.jsonl appears in train.jsonl: the
model has to compose the numeral digit by digit (thousands, hundreds, tens, units each have their
own letters), not recall it.

The trailing whitespace is deliberate. A byte-level BPE tokenizer merges a prompt's final space
with the completion's first letters (" CM" is one token), so training on the concatenated string
never shows the model the state generation starts from: the prompt encoded alone, ending in a space
token. `lowrank train` encodes the prompt and the completion apart for that reason.

Standard library only, seeded: `python3 make_dataset.py` rewrites train.jsonl and eval.jsonl next
to this file with the same bytes every time (random choices go through `random.random()` alone).
"""

import json
import pathlib
import random

SEED = 20261201
N_TRAIN = 800
N_EVAL = 100
LARGEST = 3999

PROMPTS = [
    "Convert {n} to Roman numerals: ",
    "Write {n} in Roman numerals: ",
    "What is {n} as a Roman numeral? ",
    "{n} in Roman numerals is ",
    "Number: {n}\nRoman numeral: ",
]

# Each place value of a numeral is written on its own: (value, letters), largest first.
SYMBOLS = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
           (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]


def roman(n):
    out = []
    for value, letters in SYMBOLS:
        while n >= value:
            out.append(letters)
            n -= value
    return "".join(out)


def pick(rng, items):
    return items[int(rng.random() * len(items))]


def main():
    rng = random.Random(SEED)
    numbers = list(range(1, LARGEST + 1))
    # Fisher-Yates through random() alone, so the order is the same on every Python version.
    for i in range(len(numbers) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        numbers[i], numbers[j] = numbers[j], numbers[i]
    chosen = numbers[: N_TRAIN + N_EVAL]
    here = pathlib.Path(__file__).resolve().parent
    for name, part in [("train.jsonl", chosen[:N_TRAIN]), ("eval.jsonl", chosen[N_TRAIN:])]:
        with open(here / name, "w", encoding="utf-8", newline="\n") as f:
            for n in part:
                row = {"prompt": pick(rng, PROMPTS).format(n=n), "completion": roman(n)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    assert roman(1994) == "MCMXCIV" and roman(3999) == "MMMCMXCIX" and roman(4) == "IV"
    main()
