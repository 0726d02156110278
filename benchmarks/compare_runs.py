"""Compare two run folders of the same settings made by two versions of the code:

    python -m benchmarks.compare_runs RUN_A RUN_B

games.csv byte for byte; ppo.jsonl line by line and key by key (keys only one side has are listed, not failed);
summary.json and config.json key by key (wall time excluded). Exit code 0 when everything both sides have agrees.
"""

from __future__ import annotations

import json
import sys


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def compare(a: str, b: str) -> list[str]:
    """Differences between runs `a` and `b`, one line each (empty: identical up to added keys)."""
    problems = []
    with open(f"{a}/games.csv", "rb") as fa, open(f"{b}/games.csv", "rb") as fb:
        if fa.read() != fb.read():
            problems.append("games.csv differs")
    ra, rb = _lines(f"{a}/ppo.jsonl"), _lines(f"{b}/ppo.jsonl")
    if len(ra) != len(rb):
        problems.append(f"ppo.jsonl has {len(ra)} vs {len(rb)} lines")
    keys_a, keys_b = set().union(*ra), set().union(*rb)
    print(f"ppo.jsonl keys only in {a}: {sorted(keys_a - keys_b)}; only in {b}: {sorted(keys_b - keys_a)}")
    for i, (x, y) in enumerate(zip(ra, rb)):
        problems += [f"ppo.jsonl line {i + 1} {k}: {x[k]!r} vs {y[k]!r}" for k in sorted(x) if k in y and x[k] != y[k]]
    for name, ignore in (("summary.json", {"wall_s_this_session"}), ("config.json", {"versions"})):
        with open(f"{a}/{name}") as fa, open(f"{b}/{name}") as fb:
            da, db = json.load(fa), json.load(fb)
        for k in sorted(set(da) & set(db) - ignore):
            if da[k] != db[k]:
                problems.append(f"{name} {k}: {da[k]!r} vs {db[k]!r}")
        print(f"{name} keys only on one side: {sorted(set(da) ^ set(db))}")
    return problems


if __name__ == "__main__":
    found = compare(sys.argv[1], sys.argv[2])
    print("\n".join(found) if found else "identical (games.csv byte for byte; every shared key equal)")
    sys.exit(1 if found else 0)
