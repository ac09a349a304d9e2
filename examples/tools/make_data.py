"""Writes the tool-calling example's data: a film assistant that looks showtimes up with a tool.

    python examples/tools/make_data.py      # rewrites data/train.jsonl and data/validation.jsonl

Each row is {"messages": [...], "tools": [...]}: the user asks when a film is on in a city, the assistant calls
`showtimes(film, city)`, the tool answers with a time, and the assistant gives it back in a sentence. Some rows
ask for advice instead and need no tool. The files are reproducible (fixed seed).
"""

import json
import random
from pathlib import Path

FILMS = ["Heat", "Alien", "Vertigo", "Amelie", "Up", "Jaws", "Rocky", "Psycho", "Fargo", "Tootsie"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Kyoto", "Cairo", "Dublin", "Quito"]
TIMES = ["18:00", "19:30", "20:15", "21:00", "22:45"]
SHOWTIMES = {"type": "function", "function": {
    "name": "showtimes", "description": "When a film is on in a city.",
    "parameters": {"type": "object", "properties": {"film": {"type": "string"}, "city": {"type": "string"}},
                   "required": ["film", "city"]}}}
ASKS = ["When is {film} on in {city}?", "What time does {film} play in {city}?", "Is {film} showing in {city} tonight?"]
ANSWERS = ["{film} is on at {time} in {city}.", "It plays at {time} in {city}."]
ADVICE = [("Is {film} any good?", "Yes: {film} is a classic."), ("Should I see {film}?", "Yes, {film} is worth it.")]


def conversation(rng: random.Random) -> dict:
    film, city, time = rng.choice(FILMS), rng.choice(CITIES), rng.choice(TIMES)
    if rng.random() < 0.2:
        ask, answer = rng.choice(ADVICE)
        messages = [{"role": "user", "content": ask.format(film=film)},
                    {"role": "assistant", "content": answer.format(film=film)}]
        return {"messages": messages, "tools": [SHOWTIMES]}
    call = {"type": "function", "function": {"name": "showtimes", "arguments": {"film": film, "city": city}}}
    messages = [{"role": "user", "content": rng.choice(ASKS).format(film=film, city=city)},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "showtimes", "content": time},
                {"role": "assistant", "content": rng.choice(ANSWERS).format(film=film, city=city, time=time)}]
    return {"messages": messages, "tools": [SHOWTIMES]}


def main() -> None:
    rng = random.Random(2026)
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    seen: set[str] = set()
    rows = []
    while len(rows) < 360:
        row = conversation(rng)
        key = json.dumps(row)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    for name, part in (("train", rows[:320]), ("validation", rows[320:])):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
