#!/usr/bin/env python3
"""Writes the example dataset: date normalisation to YYYY-MM-DD, in chat `messages` rows.

Each row asks, in one of a few phrasings, for a date written out in words ("the 5th of March,
2021", "Fri, 5 Mar 2021", ...) to be given as YYYY-MM-DD, and the assistant answers with exactly
that string ("2021-03-05"). Calendar dates are drawn without repetition from 1950-2049 and split
so that no date of eval.jsonl appears, in any spelling, in train.jsonl.

Standard library only, seeded: `python3 make_dataset.py` rewrites train.jsonl and eval.jsonl next
to this file with the same bytes every time. (Random choices go through `random.random()` alone,
whose sequence Python keeps stable across versions for a given seed.)
"""

import datetime
import json
import pathlib
import random

SEED = 20250501
N_TRAIN = 400
N_EVAL = 100
FIRST_YEAR, LAST_YEAR = 1950, 2049

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(day):
    if 11 <= day % 100 <= 13:
        return f"{day}th"
    return f"{day}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th') }"


# Ways to write a date in words; every one names the month, so none is ambiguous.
SPELLINGS = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",                 # March 5, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",                  # 5 March 2021
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",             # Mar 5, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",              # 5 Mar 2021
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",  # the 5th of March, 2021
    lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",        # March 5th, 2021
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",      # Friday, March 5, 2021
    lambda d: f"{WEEKDAYS[d.weekday()][:3]}, {d.day} {MONTHS[d.month - 1][:3]} {d.year}",  # Fri, 5 Mar 2021
]

QUESTIONS = [
    "Convert this date to YYYY-MM-DD: {date}",
    "Write {date} as YYYY-MM-DD.",
    "What is {date} in YYYY-MM-DD format?",
]


def pick(rng, items):
    return items[int(rng.random() * len(items))]


def row(rng, date):
    question = pick(rng, QUESTIONS).format(date=pick(rng, SPELLINGS)(date))
    return {"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": date.isoformat()},
    ]}


def main():
    rng = random.Random(SEED)
    first = datetime.date(FIRST_YEAR, 1, 1)
    n_days = (datetime.date(LAST_YEAR, 12, 31) - first).days + 1
    dates, seen = [], set()
    while len(dates) < N_TRAIN + N_EVAL:
        date = first + datetime.timedelta(days=int(rng.random() * n_days))
        if date not in seen:
            seen.add(date)
            dates.append(date)
    here = pathlib.Path(__file__).resolve().parent
    for name, part in [("train.jsonl", dates[:N_TRAIN]), ("eval.jsonl", dates[N_TRAIN:])]:
        lines = [json.dumps(row(rng, d), ensure_ascii=False) for d in part]
        (here / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(lines)} rows to {here / name}")


if __name__ == "__main__":
    main()
