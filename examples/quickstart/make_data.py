"""Writes the quickstart's sample data: short movie-review sentences in the style of SST-2.

    python examples/quickstart/make_data.py      # rewrites data/train.jsonl and data/validation.jsonl

The sentences are assembled from phrase lists below with a fixed seed, so the
files are reproducible; they are small enough (a few hundred lines) for a
tiny model to learn their patterns in a couple of minutes on a laptop CPU.
"""

import json
import random
from pathlib import Path

FILMS = ["the film", "this movie", "the picture", "the story", "this comedy", "the drama", "the thriller",
         "the documentary", "this sequel", "the animated feature", "the remake", "this romance"]
GOOD = ["warm", "funny", "moving", "clever", "beautifully acted", "gripping", "charming", "smart", "tender",
        "thoughtful", "exhilarating", "honest"]
BAD = ["dull", "tedious", "clumsy", "predictable", "overlong", "shallow", "lifeless", "confused", "bland",
       "forgettable", "silly", "joyless"]
PARTS = ["script", "cast", "direction", "soundtrack", "ending", "dialogue", "pacing", "camera work", "lead performance",
         "screenplay"]
GOOD_VERBS = ["lifts", "carries", "elevates", "saves", "rewards"]
BAD_VERBS = ["sinks", "drags down", "undermines", "smothers", "spoils"]
AUDIENCE = ["the audience", "viewers", "anyone who sees it", "families", "fans of the genre", "even cynics"]
GOOD_ENDS = ["a pleasure from start to finish", "one of the best films of the year", "worth every minute",
             "a small gem", "a real crowd pleaser"]
BAD_ENDS = ["a chore to sit through", "a waste of a fine cast", "hard to recommend", "an exercise in boredom",
            "best left on the shelf"]


def sentence(rng: random.Random) -> dict:
    positive = rng.random() < 0.5
    adj, verbs, ends = (GOOD, GOOD_VERBS, GOOD_ENDS) if positive else (BAD, BAD_VERBS, BAD_ENDS)
    film, part, who, end = rng.choice(FILMS), rng.choice(PARTS), rng.choice(AUDIENCE), rng.choice(ends)
    a, b = rng.sample(adj, 2)
    templates = [
        f"{film} is {a} and {b} .",
        f"{film} is {a} , and the {part} {rng.choice(verbs)} it .",
        f"the {part} is {a} , which makes {film} {end} .",
        f"{who} will find {film} {a} , {b} and {end} .",
        f"a {a} , {b} {film.split()[-1]} that {rng.choice(verbs)} {who} .",
        f"{film} is {end} : {a} , {b} , with a {rng.choice(adj)} {part} .",
    ]
    return {"text": rng.choice(templates), "label": int(positive)}


def main() -> None:
    rng = random.Random(2026)
    out = Path(__file__).parent / "data"
    seen: set[str] = set()
    rows = []
    while len(rows) < 460:
        row = sentence(rng)
        if row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
    for name, part in (("train", rows[:400]), ("validation", rows[400:])):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
