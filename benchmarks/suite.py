"""The quality suite: streams unlike each other, each there for a reason a default must survive.

Every stream is a list of (feature dict, label) in arrival order, built from a fixed seed (or read
from a package that ships it), so every learner sees the same samples in the same order.
``SUITE`` maps a stream's name to (why it is there, how to build it).
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import numpy as np

Stream = datasets.Stream


def _zipf_ids(rng: np.random.Generator, n: int, size: int, a: float = 1.1) -> np.ndarray:
    pmf = 1.0 / np.arange(1, size + 1) ** a
    return rng.choice(size, size=n, p=pmf / pmf.sum())


def _labels(rng: np.random.Generator, score: np.ndarray) -> np.ndarray:
    return rng.random(score.shape[0]) < 1.0 / (1.0 + np.exp(-score))


def _rows(fields: dict[str, np.ndarray], numeric: dict[str, np.ndarray], labels: np.ndarray) -> Stream:
    names, columns = list(fields), [c.tolist() for c in fields.values()]
    num_names, num_columns = list(numeric), [np.round(c, 3).tolist() for c in numeric.values()]
    out: Stream = []
    for i in range(labels.shape[0]):
        x: dict = {name: f"{col[i]:d}" for name, col in zip(names, columns, strict=True)}
        for name, col in zip(num_names, num_columns, strict=True):
            x[name] = col[i]
        out.append((x, bool(labels[i])))
    return out


def planted_fm(
    n: int, n_fields: int, vocab: int, k_true: int = 4, v_std: float = 0.3, w_std: float = 0.3,
    base: float = -1.2, seed: int = 0,
) -> Stream:  # fmt: skip
    """Labels from a planted FM: ``n_fields`` Zipf fields of ``vocab`` values each, one numeric
    field (log-normal), rank-``k_true`` interactions between every pair of fields."""
    rng = np.random.default_rng(seed)
    score = np.full(n, base)
    sums, sq = np.zeros((n, k_true)), np.zeros(n)
    fields = {}
    for f in range(n_fields):
        ids = _zipf_ids(rng, n, vocab)
        w = rng.normal(0.0, w_std, vocab)
        v = rng.normal(0.0, v_std, (vocab, k_true))
        score += w[ids]
        sums += v[ids]
        sq += (v[ids] ** 2).sum(axis=1)
        fields[f"f{f}"] = ids
    score += 0.5 * ((sums**2).sum(axis=1) - sq)
    price = rng.lognormal(0.0, 0.5, n)
    score += 0.3 * (price - 1.1)
    return _rows(fields, {"price": price}, _labels(rng, score))


def linear_truth(n: int = 100_000, seed: int = 1) -> Stream:
    """No interaction at all: 12 Zipf fields of 50 to 5,000 values, weights N(0, 0.5)."""
    return _linear(n, np.geomspace(50, 5000, 12).astype(int), 0.5, -1.0, seed)


def _linear(n: int, sizes: np.ndarray, w_std: float, base: float, seed: int) -> Stream:
    """Labels from a logistic regression over Zipf fields of the given sizes."""
    rng = np.random.default_rng(seed)
    score = np.full(n, base)
    fields = {}
    for f, size in enumerate(sizes):
        ids = _zipf_ids(rng, n, size)
        score += rng.normal(0.0, w_std, size)[ids]
        fields[f"f{f}"] = ids
    return _rows(fields, {}, _labels(rng, score))


def census_like(n: int = 48_842, seed: int = 2) -> Stream:
    """A table as it comes: 7 categorical columns of 2 to 40 values and 6 numbers in their own
    units, from 1 (years of education) to 10^6 (a sampling weight) and a capital gain that is
    0 for most rows and up to 10^5 for a few. The truth is linear in scaled and logged numbers
    plus a few interactions; a learner that treats x = 100,000 like x = 1 steps far too far."""
    rng = np.random.default_rng(seed)
    sizes = {"workclass": 8, "education": 16, "marital": 7, "occupation": 14, "relationship": 6,
             "race": 5, "sex": 2, "country": 40}  # fmt: skip
    fields, effects = {}, {}
    for name, size in sizes.items():
        fields[name] = _zipf_ids(rng, n, size, 1.3)
        effects[name] = rng.normal(0.0, 0.6, size)
    age = np.clip(rng.normal(39, 13, n), 17, 90).round()
    education_num = np.clip(rng.normal(10, 2.5, n), 1, 16).round()
    hours = np.clip(rng.normal(40, 12, n), 1, 99).round()
    weight = np.exp(rng.normal(12.0, 0.6, n)).round()  # ~1e4 .. 1e6
    gain = np.where(rng.random(n) < 0.08, np.exp(rng.uniform(6, 11.5, n)), 0.0).round()  # up to ~1e5
    loss = np.where(rng.random(n) < 0.05, rng.uniform(150, 4000, n), 0.0).round()
    score = -3.0 + sum(effects[name][ids] for name, ids in fields.items())
    score += 0.04 * (age - 39) - 0.0006 * (age - 39) ** 2 + 0.3 * (education_num - 10) + 0.03 * (hours - 40)
    score += 0.25 * np.log1p(gain) - 0.15 * (loss > 1500) + 0.0 * weight
    score += 0.8 * ((fields["marital"] == 0) & (fields["sex"] == 0))  # an interaction or two
    score += 0.5 * ((fields["education"] < 3) & (fields["occupation"] < 3))
    numeric = {"age": age, "education_num": education_num, "hours": hours, "fnlwgt": weight,
               "capital_gain": gain, "capital_loss": loss}  # fmt: skip
    return _rows(fields, numeric, _labels(rng, score))


def rare_positives(n: int = 100_000, seed: int = 3) -> Stream:
    """CTR about 0.5% and features that carry little signal: 10 Zipf fields of 20 to 20,000
    values with small effects. Calibration is nearly everything; the running mean of the labels
    is hard to beat, and a learner that chases every rare click loses to it."""
    return _linear(n, np.geomspace(20, 20_000, 10).astype(int), 0.25, -5.6, seed)


def new_ids_drift(n: int = 150_000, seed: int = 4) -> Stream:
    """What a live ad stream is: ads are born all the time and live for a few thousand
    impressions (so most ids are new or young), users and sites are Zipf, and the truth drifts
    (every effect takes a random walk, the base rate moves with the hour)."""
    rng = np.random.default_rng(seed)
    n_users, n_sites, n_ads, k = 5000, 300, 12_000, 4
    users, sites = _zipf_ids(rng, n, n_users), _zipf_ids(rng, n, n_sites)
    # ad i is born at impression i * n / n_ads; an impression shows an ad born a little earlier
    # (exponential lag, mean 2% of the stream): most ids are young, and new ones keep coming
    t = np.arange(n)
    lag = rng.exponential(0.02 * n, n)
    ads = (np.clip(t - lag, 0, None) * n_ads / n).astype(np.int64)
    w_user, w_site = rng.normal(0, 0.4, n_users), rng.normal(0, 0.4, n_sites)
    w_ad = rng.normal(0, 0.6, n_ads)
    v_user, v_ad = rng.normal(0, 0.35, (n_users, k)), rng.normal(0, 0.35, (n_ads, k))
    steps = 50  # the drift: effects move in 50 steps over the stream
    segment = np.minimum(t * steps // n, steps - 1)
    drift_site = np.cumsum(rng.normal(0, 0.08, (steps, n_sites)), axis=0)
    drift_user = np.cumsum(rng.normal(0, 0.05, (steps, n_users)), axis=0)
    hour = (t // (n // 48)) % 24
    score = -1.8 + 0.4 * np.sin(2 * np.pi * hour / 24)
    score += w_user[users] + drift_user[segment, users] + w_site[sites] + drift_site[segment, sites]
    score += w_ad[ads] + (v_user[users] * v_ad[ads]).sum(axis=1)
    fields = {"user": users, "site": sites, "ad": ads, "hour": hour}
    return _rows(fields, {}, _labels(rng, score))


def phishing() -> Stream:
    """UCI Website Phishing (1,250 pages, 9 features in {0, 0.5, 1}), as river ships it inside
    its wheel (CC BY 4.0): real labels, few samples, dense features."""
    from river import datasets as river_datasets

    return [(dict(x), bool(y)) for x, y in river_datasets.Phishing()]


SUITE: dict[str, tuple[str, Callable[[], Stream]]] = {
    "MovieLens 100K": (
        "real: users, films, their attributes and genres (multi-hot); where POLY2 was ahead",
        datasets.movielens100k,
    ),
    "planted FM, too few (60k)": (
        "20 Zipf fields of 3,000 values + a number: too few samples to learn the interactions well",
        lambda: planted_fm(60_000, 20, 3000, seed=10),
    ),
    "planted FM, enough (200k)": (
        "8 Zipf fields of 300 values, strong interactions: enough samples to learn them",
        lambda: planted_fm(200_000, 8, 300, v_std=0.4, w_std=0.2, base=-1.5, seed=11),
    ),
    "linear truth (100k)": ("no interaction at all: an FM must not lose to LR", linear_truth),
    "census-like table (48.8k)": (
        "numbers in their own units, up to 10^5 and 10^6, beside low-cardinality categories",
        census_like,
    ),
    "rare positives (100k, CTR 0.5%)": ("little signal, rare clicks: calibration first", rare_positives),
    "new ids and drift (150k)": (
        "ids born all the time, a truth that moves: a live ad stream",
        new_ids_drift,
    ),
    "Phishing (river, 1.25k)": ("real labelled data shipped in a PyPI wheel: small and dense", phishing),
}
