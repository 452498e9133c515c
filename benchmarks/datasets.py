"""The benchmark streams: a synthetic CTR stream with planted interactions, and MovieLens 100K.

MovieLens may not be redistributed (GroupLens terms), so it is fetched on first use from the PyPI
wheel that ships it (recbole 1.2.1) into a cache outside the repository
(``$STREAM_FM_CACHE/data``, default ``~/.cache/stream-fm/data``), never committed.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

Stream = list[tuple[dict, bool]]

CACHE = Path(os.environ.get("STREAM_FM_CACHE", Path.home() / ".cache" / "stream-fm")) / "data"
RECBOLE = "recbole==1.2.1"


def synthetic(n: int = 200_000, n_fields: int = 16, seed: int = 0) -> Stream:
    """A click stream drawn from a planted factorization machine.

    ``n_fields`` categorical fields with Zipf-distributed ids (vocabularies from 50 to 20,000),
    one numeric field (``price``, log-normal), labels ~ Bernoulli(sigma(planted FM score)) with
    rank-4 pairwise interactions between all fields: the structure an FM can learn from few
    observations of each id, and POLY2 only from observing each pair of ids.
    """
    rng = np.random.default_rng(seed)
    k_true = 4
    vocab = np.geomspace(50, 20_000, n_fields).astype(int)
    ids = np.empty((n, n_fields), np.int64)
    score = np.full(n, -1.6)
    sums = np.zeros((n, k_true))
    sq = np.zeros(n)
    for f, size in enumerate(vocab):
        pmf = 1.0 / np.arange(1, size + 1) ** 1.1
        ids[:, f] = rng.choice(size, size=n, p=pmf / pmf.sum())
        w = rng.normal(0.0, 0.3, size)
        v = rng.normal(0.0, 0.35, (size, k_true))
        score += w[ids[:, f]]
        vf = v[ids[:, f]]
        sums += vf
        sq += (vf * vf).sum(axis=1)
    score += 0.5 * ((sums * sums).sum(axis=1) - sq)
    price = rng.lognormal(0.0, 0.5, n)
    score += 0.3 * (price - 1.1)
    labels = rng.random(n) < 1.0 / (1.0 + np.exp(-score))
    names = [f"f{f}" for f in range(n_fields)]
    out: Stream = []
    for i in range(n):
        x: dict = {name: f"{i_:d}" for name, i_ in zip(names, ids[i].tolist(), strict=True)}
        x["price"] = round(float(price[i]), 3)
        out.append((x, bool(labels[i])))
    return out


def movielens100k() -> Stream:
    """MovieLens 100K as a click stream: rating >= 4 is a click, in timestamp order (stable).

    Features: user, item, age, gender, occupation, release_year, and genres (multi-hot).
    """
    root = _fetch_movielens()
    users = {row["user_id:token"]: row for row in _read(root / "ml-100k.user")}
    items = {row["item_id:token"]: row for row in _read(root / "ml-100k.item")}
    inter = _read(root / "ml-100k.inter")
    inter.sort(key=lambda r: int(r["timestamp:float"]))  # list.sort is stable: file order on ties
    out: Stream = []
    for r in inter:
        u, it = users[r["user_id:token"]], items[r["item_id:token"]]
        x = {
            "user": r["user_id:token"],
            "item": r["item_id:token"],
            "age": u["age:token"],
            "gender": u["gender:token"],
            "occupation": u["occupation:token"],
            "release_year": it["release_year:token"],
            "genres": it["class:token_seq"].split(),
        }
        out.append((x, float(r["rating:float"]) >= 4))
    return out


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="latin-1", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _fetch_movielens() -> Path:
    target = CACHE / "ml-100k"
    if (target / "ml-100k.inter").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = list(CACHE.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        print(f"fetching MovieLens 100K ({RECBOLE} wheel from PyPI) into {CACHE}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(CACHE), RECBOLE],
            check=True,
        )
        wheels = list(CACHE.glob("recbole-1.2.1-*.whl"))
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as z:
        for name in ("ml-100k.inter", "ml-100k.user", "ml-100k.item"):
            (target / name).write_bytes(z.read(f"recbole/dataset_example/ml-100k/{name}"))
    return target
