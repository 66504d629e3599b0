#!/usr/bin/env python3
"""Writes a large JSONL file of `text` rows (40-120 random words each, seeded) for measuring how
training memory grows with the data file: big_jsonl.py PATH ROWS."""
import json
import random
import sys

path, rows = sys.argv[1], int(sys.argv[2])
rng = random.Random(1)
words = ("the quick brown fox jumps over lazy dog river mountain cloud seven apple orange "
         "table window light").split()
with open(path, "w") as f:
    for _ in range(rows):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(40, 120)))}) + "\n")
