"""Learning quality on the suite: progressive validation (predict each sample, then learn it),
one pass, every learner with its defaults, side by side in one run.

Learners: SparseFM with its defaults; river's LogisticRegression and FMClassifier (defaults);
Vowpal Wabbit logistic, linear and with all pairwise interactions (POLY2); and the constant
predictor (the running mean of the labels seen so far). The streams and why each is there:
``suite.py``. Prints the suite table (log loss and AUC), then the robustness table: for each
stream, the best SparseFM configuration of a grid and how far the defaults are from it. Saves the
learning curves of every stream to benchmarks/results/learning_curves.png.

    python benchmarks/bench_quality.py [--only NAME ...] [--no-grid] [--no-river-fm]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).parent))
import datasets
import suite
from common import machine, one_hot, print_table

from stream_fm import SparseFM
from stream_fm.ops.progress import Bar

RESULTS = Path(__file__).parent / "results"
Learner = Callable[[datasets.Stream], np.ndarray]  # stream -> progressive predictions

# The robustness grid: SparseFM's settings that a user might tune, half and twice the defaults
# (learning rate x init x L2, and the normalized optimizer's own three): 324 configurations.
GRID = {
    "learning_rate": [1.0, 2.0, 4.0],
    "init_std": [0.01, 0.04],
    "l2_v": [0.0, 1e-3],
    "bias_learning_rate": [0.75, 1.5, 3.0],
    "factor_learning_rate": [0.5, 1.0, 2.0],
    "initial_accumulator": [0.25, 0.5, 1.0],
}


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def exact_auc(p: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted as 1/2 (exact, not binned)."""
    ranks = rankdata(p)
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sparse_fm(**settings: object) -> Learner:
    def run(stream: datasets.Stream) -> np.ndarray:
        model = SparseFM(**settings)
        xs, ys = [x for x, _ in stream], [y for _, y in stream]
        return np.concatenate(
            [model.learn_batch(xs[i : i + 4096], ys[i : i + 4096]) for i in range(0, len(xs), 4096)]
        )

    return run


def constant(stream: datasets.Stream) -> np.ndarray:
    """The running mean of the labels before each sample (half a sample of each label to start)."""
    y = np.array([label for _, label in stream], np.float64)
    clicks = np.concatenate([[0.0], np.cumsum(y)[:-1]])
    return (clicks + 0.5) / (np.arange(len(y)) + 1.0)


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


def learners(with_river_fm: bool) -> dict[str, Learner]:
    out: dict[str, Learner] = {
        "SparseFM (defaults)": sparse_fm(),
        "river LR": river_model(lambda: __import__("river.linear_model").linear_model.LogisticRegression()),
        "river FM": river_model(lambda: __import__("river.facto").facto.FMClassifier(n_factors=8, seed=0)),
        "VW linear": vw(pairs=False),
        "VW POLY2": vw(pairs=True),
        "constant": constant,
    }
    if not with_river_fm:
        del out["river FM"]
    return out


def rolling(values: np.ndarray, window: int) -> np.ndarray:
    c = np.cumsum(np.insert(values, 0, 0.0))
    return (c[window:] - c[:-window]) / window


def losses(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    pc = np.clip(p, 1e-15, 1 - 1e-15)
    return -(y * np.log(pc) + (1 - y) * np.log(1 - pc))


_grid_stream: tuple[datasets.Stream, np.ndarray] = ([], np.empty(0))  # read by forked workers


def _grid_point(settings: dict) -> float:
    stream, y = _grid_stream
    return log_loss(sparse_fm(**settings)(stream), y)


# The ablations: the defaults with one part of the learner switched off
ABLATIONS = {"calibrate off": {"calibrate": False}, "center off": {"center": False},
             "average_intercept off": {"average_intercept": False},
             "dense_factors off": {"dense_factors": False}}  # fmt: skip
Robustness = tuple[float, dict, float, dict[str, float]]


def robustness(stream: datasets.Stream, y: np.ndarray, jobs: int) -> Robustness:
    """The default's log loss, the best grid configuration, its log loss, and the defaults'
    with each part of ``ABLATIONS`` off. The grid runs in ``jobs`` forked processes."""
    global _grid_stream
    _grid_stream = (stream, y)
    configs = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        scores = list(pool.map(_grid_point, configs, chunksize=4))
    best = int(np.argmin(scores))
    ablated = {name: log_loss(sparse_fm(**off)(stream), y) for name, off in ABLATIONS.items()}
    return log_loss(sparse_fm()(stream), y), configs[best], scores[best], ablated


def resampled(stream: datasets.Stream, y: np.ndarray, best: dict, n: int) -> None:
    """How much of a small stream's gap is its one order and the model's one seed: the defaults
    and the grid's best over ``n`` random orders of the stream, then over ``n`` seeds."""
    rng = np.random.default_rng(0)
    orders = [rng.permutation(len(stream)) for _ in range(n)]
    for label, runs in (
        (f"{n} random orders", [([stream[i] for i in o], y[o], {}) for o in orders]),
        (f"{n} seeds", [(stream, y, {"seed": seed}) for seed in range(n)]),
    ):
        d = np.array([log_loss(sparse_fm(**extra)(s), ys) for s, ys, extra in runs])
        b = np.array([log_loss(sparse_fm(**best, **extra)(s), ys) for s, ys, extra in runs])
        print(
            f"  over {label}: defaults {d.mean():.4f} (sd {d.std(ddof=1):.4f}), grid's best "
            f"{b.mean():.4f}, gap {100 * (d.mean() / b.mean() - 1):+.2f}%, best ahead on {(b < d).sum()}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="*", help="streams whose name starts with one of these")
    parser.add_argument("--no-grid", action="store_true", help="skip the robustness grid")
    parser.add_argument("--no-river-fm", action="store_true", help="skip river's FM (the slowest)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="processes for the grid")
    parser.add_argument(
        "--orders", type=int, default=0, help="on streams under 10,000 samples: the defaults against the "
        "grid's best over this many random orders of the stream and seeds of the model",
    )  # fmt: skip
    args = parser.parse_args()
    print(f"machine: {machine()}")
    chosen = {
        name: entry
        for name, entry in suite.SUITE.items()
        if not args.only or any(name.startswith(prefix) for prefix in args.only)
    }
    table: dict[str, dict[str, tuple[float, float]]] = {}
    curves: dict[str, dict[str, np.ndarray]] = {}
    robust: dict[str, Robustness] = {}
    for stream_name, (why, build) in chosen.items():
        stream = build()
        y = np.array([label for _, label in stream], np.float64)
        print(f"\n{stream_name}: {len(stream):,} samples, CTR {y.mean():.4f}. {why}", flush=True)
        table[stream_name], curves[stream_name] = {}, {}
        for name, learner in learners(not args.no_river_fm).items():
            t = time.perf_counter()
            p = learner(stream)
            seconds = time.perf_counter() - t
            ll, auc = log_loss(p, y), exact_auc(p, y)
            table[stream_name][name] = (ll, auc)
            curves[stream_name][name] = rolling(losses(p, y), max(100, min(5000, len(y) // 20)))
            print(f"  {name:22s} logloss {ll:.4f}  AUC {auc:.4f}  {seconds:7.1f}s", flush=True)
        if not args.no_grid:
            robust[stream_name] = robustness(stream, y, args.jobs)
            d, settings, b, ablated = robust[stream_name]
            print(f"  grid: defaults {d:.4f}, best {b:.4f} at {settings} ({100 * (d / b - 1):+.2f}%)")
            print("  defaults with " + ", ".join(f"{name}: {ll:.4f}" for name, ll in ablated.items()))
            if args.orders and len(stream) < 10_000:
                resampled(stream, y, settings, args.orders)
    report(table, robust)
    plot(curves)


def report(table: dict[str, dict[str, tuple[float, float]]], robust: dict[str, Robustness]) -> None:
    names = list(next(iter(table.values())))
    print("\nProgressive log loss (AUC below it); the best of each row in bold:\n")
    rows = []
    for stream_name, by in table.items():
        best = min(ll for ll, _ in by.values())
        cells = [f"**{ll:.4f}**" if ll == best else f"{ll:.4f}" for ll, _ in by.values()]
        rows.append((stream_name, *cells))
        rows.append(("", *(f"{auc:.3f}" for _, auc in by.values())))
    print_table(["stream", *names], rows)
    wins = sum(min(by, key=lambda n: by[n][0]) == "SparseFM (defaults)" for by in table.values())
    print(f"\nSparseFM's defaults have the lowest log loss on {wins} of {len(table)} streams.")
    if robust:
        print("\nRobustness: the defaults against the best configuration of the grid", GRID, "\n")
        header = ["stream", "defaults", "best in grid", "its settings", "gap"]
        rows = [
            (
                s,
                f"{d:.4f}",
                f"{b:.4f}",
                json.dumps(settings),
                f"{100 * (d / b - 1):+.2f}%",
                *(f"{ablated[a]:.4f}" for a in ABLATIONS),
            )
            for s, (d, settings, b, ablated) in robust.items()
        ]
        print_table(header + [f"defaults, {a}" for a in ABLATIONS], rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality.json").write_text(
        json.dumps({"machine": machine(), "table": table, "robustness": robust}, indent=1)
    )


def plot(curves: dict[str, dict[str, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    n_rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(5.5 * cols, 4.2 * n_rows), squeeze=False)
    for ax, (stream_name, by_learner) in zip(axes.flat, curves.items(), strict=False):
        for name, curve in by_learner.items():
            ax.plot(np.arange(len(curve)), curve, label=name, linewidth=1.1)
        if "constant" in by_learner:  # a learner that diverged must not flatten everyone else
            finite = [c[np.isfinite(c)] for c in by_learner.values()]
            low = min(float(c.min()) for c in finite if c.size)
            ax.set_ylim(low * 0.95, 1.3 * float(np.nanmax(by_learner["constant"])))
        ax.set_title(stream_name, fontsize=10)
        ax.set_xlabel("samples seen")
        ax.set_ylabel("log loss, rolling window")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "learning_curves.png", dpi=90)
    print(f"\nsaved {RESULTS / 'learning_curves.png'}")


if __name__ == "__main__":
    main()
