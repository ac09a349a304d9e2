"""Writes the chat example's data: short conversations with a film-advice assistant.

    python examples/chat/make_data.py      # rewrites data/train.jsonl and data/validation.jsonl

Each row is {"messages": [...]} with an optional system turn, a user asking about a
film with what reviewers said, and the assistant's verdict, sometimes followed by a
second exchange. The answer depends on the words in the question, so a tiny model
can learn it in a minute; the files are reproducible (fixed seed).
"""

import json
import random
from pathlib import Path

FILMS = ["the film", "this movie", "the thriller", "the comedy", "the documentary", "this sequel", "the remake",
         "the drama", "this romance", "the animated feature"]
GOOD = ["warm", "funny", "moving", "clever", "gripping", "charming", "smart", "tender", "honest"]
BAD = ["dull", "tedious", "clumsy", "predictable", "shallow", "lifeless", "bland", "silly", "joyless"]
SYSTEMS = ["You are a film critic. Answer in one sentence.", "Give short, honest film advice."]
ASKS = ["Is {film} worth watching? Reviewers called it {a} and {b}.",
        "Reviewers say {film} is {a} and {b}. Should I see it?",
        "Would you recommend {film}? People found it {a} and {b}."]
YES = ["Yes: {film} sounds {a} and {b}, so it is worth your evening.", "Go and see it: {a} and {b} is a good sign."]
NO = ["No: {film} sounds {a} and {b}, so skip it.", "I would skip it: {a} and {b} is a bad sign."]
FOLLOW_UPS = [("Why?", "Because reviewers found it {a}."), ("Anything else?", "Only that it is {b}.")]


def conversation(rng: random.Random) -> dict:
    positive = rng.random() < 0.5
    a, b = rng.sample(GOOD if positive else BAD, 2)
    film = rng.choice(FILMS)
    fill = {"film": film, "a": a, "b": b}
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.5 else []
    messages.append({"role": "user", "content": rng.choice(ASKS).format(**fill)})
    answer = rng.choice(YES if positive else NO).format(**fill)
    messages.append({"role": "assistant", "content": answer[0].upper() + answer[1:]})
    if rng.random() < 0.3:
        question, reply = rng.choice(FOLLOW_UPS)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply.format(**fill)}]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(2026)
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    seen: set[str] = set()
    rows = []
    while len(rows) < 460:
        row = conversation(rng)
        key = json.dumps(row)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    for name, part in (("train", rows[:400]), ("validation", rows[400:])):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
