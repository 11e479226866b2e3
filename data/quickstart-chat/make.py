"""Writes train.jsonl and eval.jsonl: short notes about a person, and the JSON record a form would keep of them.

    python data/quickstart-chat/make.py      # deterministic (seeded): the committed files are its output

The eval rows use first and last names, cities and jobs that no train row has, so a model that scores on them
learned the task (pick the fields out of free text, write them in this exact shape), not the rows.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTRUCTION = "Extract the contact record as JSON with the keys name, age, city and job."

FIRST = [
    "Maria", "Liam", "Aisha", "Kenji", "Sofia", "Omar", "Elena", "Tomas", "Priya", "Lucas", "Hana", "Diego",
    "Greta", "Yusuf", "Chloe", "Mateo", "Ingrid", "Ravi", "Nora", "Felix", "Amara", "Jonas", "Leila", "Pablo",
    "Freya", "Arjun", "Mei", "Oscar", "Zara", "Hugo", "Selin", "Marek", "Lena", "Tariq", "Ines", "Viktor",
]
LAST = [
    "Lopez", "Murphy", "Khan", "Sato", "Rossi", "Haddad", "Petrova", "Novak", "Sharma", "Silva", "Kim", "Garcia",
    "Berg", "Demir", "Martin", "Fernandez", "Larsen", "Patel", "Walsh", "Weber", "Okafor", "Fischer", "Nasser",
    "Moreno", "Jensen", "Reddy", "Chen", "Lindqvist", "Ahmed", "Dubois", "Yilmaz", "Kowalski", "Hoffmann",
]
CITIES = [
    "Lisbon", "Dublin", "Lahore", "Osaka", "Turin", "Beirut", "Sofia", "Prague", "Pune", "Porto", "Busan",
    "Seville", "Bergen", "Izmir", "Lyon", "Bilbao", "Aarhus", "Leeds", "Graz", "Lagos", "Dresden", "Cairo",
    "Valencia", "Malmo", "Chennai", "Taipei", "Uppsala", "Rabat", "Nantes", "Ankara", "Gdansk", "Bremen",
]
JOBS = [
    "nurse", "teacher", "plumber", "architect", "chef", "pilot", "dentist", "librarian", "electrician",
    "baker", "lawyer", "pharmacist", "carpenter", "journalist", "translator", "firefighter", "gardener",
    "accountant", "photographer", "mechanic", "surveyor", "florist", "optician", "welder",
]
# {n} name, {a} age, {c} city, {j} job; the order of the facts differs, as in real notes
TEMPLATES = [
    "Hi, I'm {n}, {a}, and I just moved to {c} where I work as a {j}.",
    "{n} ({a}) is a {j} based in {c}.",
    "Met {n} today: {j}, lives in {c}, {a} years old.",
    "New client: {n}. Age {a}. Works as a {j}. City: {c}.",
    "My neighbour {n} is {a} years old and has been a {j} in {c} for years.",
    "From {c}, {a} years old, {n} applied for the {j} position.",
    "Please add {n} to the list - {j}, {a}, {c}.",
    "{n} says hello from {c}! Still working as a {j} at {a}.",
    "Contact: {n}, {j} in {c}, aged {a}.",
    "The {j} we hired last week, {n}, is {a} and commutes from {c}.",
    "Note to self: call {n} ({j}, {c}, {a} y/o) about the invoice.",
    "At {a}, {n} still lives in {c} and works as a {j}.",
]


def record(rng: random.Random, first: list[str], last: list[str], cities: list[str], jobs: list[str]) -> dict:
    name = f"{rng.choice(first)} {rng.choice(last)}"
    age, city, job = rng.randint(19, 71), rng.choice(cities), rng.choice(jobs)
    note = rng.choice(TEMPLATES).format(n=name, a=age, c=city, j=job)
    answer = json.dumps({"name": name, "age": age, "city": city, "job": job})
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{note}"}, {"role": "assistant", "content": answer}]}


def main() -> None:
    rng = random.Random(7)
    held = {"first": FIRST[-8:], "last": LAST[-8:], "cities": CITIES[-6:], "jobs": JOBS[-5:]}
    train = [record(rng, FIRST[:-8], LAST[:-8], CITIES[:-6], JOBS[:-5]) for _ in range(320)]
    held_out = [record(rng, held["first"], held["last"], held["cities"], held["jobs"]) for _ in range(60)]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
