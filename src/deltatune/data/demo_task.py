"""The demo task: turn one sentence about a person into a compact JSON record with fixed keys.

Small enough to fine-tune a 135M model on CPU in minutes, and not solved by one out of the box: the answer must
be exactly `{"name":...,"age":...,"city":...,"job":...}` in that key order with an integer age and the bare job
("nurse", not "a nurse"), from sentences written a dozen ways. Names, cities and jobs are partitioned between the
splits, so validation and test measure extraction, not memorised values.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

KEYS = ("name", "age", "city", "job")
SPLIT_SIZES = {"train": 600, "validation": 60, "test": 100}
# Share of each value pool that goes to each split.
_POOL_SHARES = {"train": 0.6, "validation": 0.15, "test": 0.25}

INSTRUCTION = "Extract name, age, city and job from this sentence as JSON: "

TEMPLATES = (
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}, {age}, {a_job} from {city}.",
    "{name} works as {a_job} in {city} and is {age} years old.",
    "In {city}, {name} ({age}) earns a living as {a_job}.",
    "At {age}, {name} moved to {city} to work as {a_job}.",
    "Our new {job} is {name}, aged {age}, based in {city}.",
    "{city} is home to {name}, {a_job} who just turned {age}.",
    "{name} ({job}, {age}) recently relocated to {city}.",
    "{name}, {age} years old, has been {a_job} in {city} for a while.",
    "The {job} {name} is {age} and lives in {city}.",
    "Having turned {age} last spring, {name} still works in {city} as {a_job}.",
    "Ask anyone in {city} about {name}: the {age}-year-old {job} is well known.",
)

FIRST_NAMES = (
    "Aaron", "Abigail", "Adrian", "Alice", "Amara", "Andre", "Anna", "Arjun", "Beatrice", "Bruno", "Camila", "Carlos",
    "Chloe", "Daniel", "Diana", "Dmitri", "Elena", "Elias", "Emma", "Farah", "Felix", "Fiona", "Gabriel", "Grace",
    "Hana", "Hugo", "Ines", "Isaac", "Ivy", "Jonas", "Julia", "Kenji", "Lara", "Leon", "Lucia", "Malik", "Maya",
    "Mateo", "Nadia", "Noah", "Olga", "Omar", "Paula", "Pedro", "Priya", "Quentin", "Rosa", "Samuel", "Sofia",
    "Tariq", "Tessa", "Tomas", "Uma", "Victor", "Wanda", "Xavier", "Yara", "Yusuf", "Zoe", "Zane",
)
LAST_NAMES = (
    "Adams", "Alvarez", "Baker", "Becker", "Chen", "Costa", "Dubois", "Duarte", "Evans", "Fischer", "Garcia", "Green",
    "Hansen", "Hughes", "Ibrahim", "Ito", "Jensen", "Kim", "Kowalski", "Larsen", "Lopez", "Marino", "Meyer", "Moreau",
    "Nakamura", "Novak", "Okafor", "Olsen", "Patel", "Perez", "Quinn", "Rossi", "Russo", "Santos", "Schmidt", "Silva",
    "Singh", "Sato", "Taylor", "Torres", "Tran", "Ueda", "Varga", "Vidal", "Walker", "Weber", "Wong", "Yilmaz",
    "Young", "Zhang", "Ahmed", "Bauer", "Castillo", "Dimitrov", "Eriksen", "Ferreira", "Gomez", "Haddad", "Jovanovic",
    "Keller",
)
CITIES = (
    "Amsterdam", "Athens", "Austin", "Bangkok", "Barcelona", "Berlin", "Bogota", "Boston", "Brussels", "Budapest",
    "Cairo", "Cape Town", "Chicago", "Copenhagen", "Denver", "Dublin", "Edinburgh", "Florence", "Geneva", "Hamburg",
    "Helsinki", "Istanbul", "Jakarta", "Kyoto", "Lagos", "Lima", "Lisbon", "Lyon", "Madrid", "Manila", "Melbourne",
    "Mexico City", "Milan", "Montreal", "Mumbai", "Nairobi", "Naples", "Oslo", "Porto", "Prague", "Rio de Janeiro",
    "Rome", "San Diego", "Santiago", "Seattle", "Seoul", "Stockholm", "Sydney", "Toronto", "Vienna",
)
JOBS = (
    "accountant", "architect", "baker", "barber", "biologist", "bus driver", "carpenter", "chef", "chemist",
    "dentist", "designer", "economist", "editor", "electrician", "engineer", "farmer", "firefighter", "florist",
    "gardener", "geologist", "historian", "illustrator", "journalist", "judge", "lawyer", "librarian", "mechanic",
    "musician", "nurse", "optician", "painter", "pharmacist", "photographer", "pilot", "plumber", "professor",
    "surgeon", "tailor", "teacher", "translator",
)
AGES = range(20, 80)


def generate(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Chat rows per split ("train", "validation", "test"); the same seed gives the same rows."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    pools = _partition(seed, tuple(sizes))
    splits = {}
    for number, (split, size) in enumerate(sizes.items()):
        rng = random.Random(seed * 1_000 + number)
        splits[split] = [_row(rng, pools[split]) for _ in range(size)]
    return splits


def write(directory: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write `<split>.jsonl` files into `directory` (created if needed); returns their paths by split."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate(seed, sizes).items():
        path = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        paths[split] = path
    return paths


def json_exact_match(prediction: str, reference: str) -> bool:
    """Whether the first JSON object in `prediction` equals the reference object (key order and spacing aside;
    types count: 34 is not "34")."""
    predicted, expected = first_json_object(prediction), first_json_object(reference)
    return predicted is not None and expected is not None and _canonical(predicted) == _canonical(expected)


def first_json_object(text: str) -> dict | None:
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def _canonical(value: dict) -> str:
    return json.dumps(value, sort_keys=True)  # tells true from 1 and 1.0 from 1, which == does not


def _partition(seed: int, splits: tuple[str, ...]) -> dict[str, dict[str, tuple]]:
    """Disjoint slices of each value pool per split, shuffled by the seed."""
    rng = random.Random(seed)
    shares = [_POOL_SHARES.get(split, 1.0) for split in splits]
    pools: dict[str, dict[str, tuple]] = {split: {} for split in splits}
    for key, values in (("first", FIRST_NAMES), ("last", LAST_NAMES), ("city", CITIES), ("job", JOBS)):
        shuffled = list(values)
        rng.shuffle(shuffled)
        start = 0
        for position, split in enumerate(splits):
            end = len(shuffled) if position == len(splits) - 1 else start + round(len(shuffled) * shares[position])
            pools[split][key] = tuple(shuffled[start:end])
            start = end
        if any(not pools[split][key] for split in splits):
            raise ValueError(f"too many splits for the {key} pool of {len(values)} values")
    return pools


def _row(rng: random.Random, pool: dict[str, tuple]) -> dict:
    person = {
        "name": f"{rng.choice(pool['first'])} {rng.choice(pool['last'])}",
        "age": rng.choice(AGES),
        "city": rng.choice(pool["city"]),
        "job": rng.choice(pool["job"]),
    }
    article = "an" if person["job"][0] in "aeiou" else "a"
    sentence = rng.choice(TEMPLATES).format(**person, a_job=f"{article} {person['job']}")
    answer = json.dumps({key: person[key] for key in KEYS}, ensure_ascii=False, separators=(",", ":"))
    return {"messages": [{"role": "user", "content": INSTRUCTION + sentence}, {"role": "assistant", "content": answer}]}
