"""Learning quality: progressive validation (predict each sample, then learn it) over whole streams.

Learners: SparseFM with its defaults; river's FMClassifier and LogisticRegression (defaults);
Vowpal Wabbit linear logistic, and VW with all pairwise interactions (POLY2). Prints a table of
exact log loss and AUC and saves rolling-log-loss curves to benchmarks/results/learning_curves.png.

    python benchmarks/bench_quality.py [--synthetic-n 200000]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).parent))
import datasets
from common import machine, one_hot, print_table

from stream_fm import SparseFM
from stream_fm.progress import Bar

RESULTS = Path(__file__).parent / "results"
Learner = Callable[[datasets.Stream], np.ndarray]  # stream -> progressive predictions


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def exact_auc(p: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted as 1/2 (exact, not binned)."""
    ranks = rankdata(p)
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sparse_fm(stream: datasets.Stream) -> np.ndarray:
    model = SparseFM()
    xs, ys = [x for x, _ in stream], [y for _, y in stream]
    return np.concatenate(
        [model.learn_batch(xs[i : i + 4096], ys[i : i + 4096]) for i in range(0, len(xs), 4096)]
    )


def river_model(factory: Callable[[], object]) -> Learner:
    def run(stream: datasets.Stream) -> np.ndarray:
        model = factory()
        out = np.empty(len(stream))
        bar = Bar(len(stream), type(model).__name__)  # river's FM takes minutes: show progress
        for i, (x, y) in enumerate(stream):
            x = one_hot(x)
            out[i] = model.predict_proba_one(x).get(True, 0.0)
            model.learn_one(x, y)
            if i % 1000 == 0:
                bar.update(i, "samples")
        bar.close()
        return out

    return run


def vw(pairs: bool) -> Learner:
    def run(stream: datasets.Stream) -> np.ndarray:
        from vowpalwabbit import Workspace

        args = "--loss_function logistic --link logistic --quiet"
        if pairs:
            args += " --interactions ::"
        model = Workspace(args)
        out = np.empty(len(stream))
        for i, (x, y) in enumerate(stream):
            features = vw_line(x)
            out[i] = model.predict(features)
            model.learn(("1 " if y else "-1 ") + features)
        model.finish()
        return out

    return run


def vw_line(x: dict) -> str:
    """One namespace per field, so that ``--interactions ::`` crosses fields."""
    parts = []
    for k, v in x.items():
        if isinstance(v, str):
            parts.append(f"|{k} {_vw_token(v)}")
        elif isinstance(v, list):
            parts.append(f"|{k} " + " ".join(_vw_token(s) for s in v))
        else:
            parts.append(f"|{k} value:{float(v)}")
    return " ".join(parts)


def _vw_token(s: str) -> str:
    return s.replace(" ", "_").replace(":", ";").replace("|", "/") or "_"


LEARNERS: dict[str, Learner] = {
    "SparseFM (defaults)": sparse_fm,
    "river FMClassifier(n_factors=8)": river_model(
        lambda: __import__("river.facto").facto.FMClassifier(n_factors=8, seed=0)
    ),
    "river LogisticRegression()": river_model(
        lambda: __import__("river.linear_model").linear_model.LogisticRegression()
    ),
    "VW linear (logistic)": vw(pairs=False),
    "VW all pairs (POLY2)": vw(pairs=True),
}


def rolling(values: np.ndarray, window: int) -> np.ndarray:
    c = np.cumsum(np.insert(values, 0, 0.0))
    return (c[window:] - c[:-window]) / window


def streams(synthetic_n: int) -> Iterator[tuple[str, datasets.Stream]]:
    yield "MovieLens 100K", datasets.movielens100k()
    yield f"synthetic ({synthetic_n:,} samples, 16 Zipf fields)", datasets.synthetic(synthetic_n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--synthetic-n", type=int, default=200_000)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    curves: dict[str, dict[str, np.ndarray]] = {}
    rows = []
    for stream_name, stream in streams(args.synthetic_n):
        y = np.array([label for _, label in stream], np.float64)
        curves[stream_name] = {}
        for name, learner in LEARNERS.items():
            t = time.perf_counter()
            p = learner(stream)
            seconds = time.perf_counter() - t
            ll, auc = log_loss(p, y), exact_auc(p, y)
            rows.append((stream_name, name, ll, auc, seconds))
            pc = np.clip(p, 1e-15, 1 - 1e-15)
            curves[stream_name][name] = rolling(-(y * np.log(pc) + (1 - y) * np.log(1 - pc)), 5000)
            print(
                f"  {stream_name:40s} {name:34s} logloss {ll:.4f}  AUC {auc:.4f}  {seconds:7.1f}s", flush=True
            )
    print()
    print_table(
        ["stream", "learner", "log loss", "AUC", "seconds"],
        [(s, name, f"{ll:.4f}", f"{auc:.4f}", f"{sec:.1f}") for s, name, ll, auc, sec in rows],
    )
    plot(curves)


def plot(curves: dict[str, dict[str, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(7 * len(curves), 4.5))
    for ax, (stream_name, by_learner) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        for name, curve in by_learner.items():
            ax.plot(np.arange(len(curve)) + 5000, curve, label=name, linewidth=1.2)
        ax.set_title(stream_name)
        ax.set_xlabel("samples seen")
        ax.set_ylabel("log loss, rolling window of 5,000")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "learning_curves.png", dpi=110)
    print(f"\nsaved {RESULTS / 'learning_curves.png'}")


if __name__ == "__main__":
    main()
