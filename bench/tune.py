"""Hyper-parameter search for DeepFM and DIN on MovieLens-100K's validation split (never on test).

    python -m bench.tune [--models deepfm,din] [--trials 12,8] [--seeds 0,1,2] [--top 2] [--work DIR]
                         [--peer-seeds] [--no-write]                                               (make tune)
    python -m bench.tune --models "" [--peer-seeds]      (only the peers' seeds / re-render from <work>/tune.json)
    python -m bench.tune --models deepfm,din --grid "mba_lambda=0.001,0.1" [--grid "..."]    (a grid, not random)
        [--work /tmp/other --section tuning-other]            (its own tune.json and BENCHMARKS.md section)

For each model, on a scratch copy of the lake's exports (``--work``; ``data/`` and ``artifacts/`` are never
written), every trial is one ``training.train.train`` run (Ray Train, 1 worker, the same early stopping as
``bench.models``: at most 12 epochs, patience 2), all in ONE local Ray cluster started here (``train`` joins it
instead of starting its own, which saves ~15 s of start-up per trial):

1. baseline: each model's registered defaults (``ModelSpec.train``) at every seed of ``--seeds`` (the seed spread
   before tuning);
2. search: ``--trials`` configurations drawn by ``sample_configs`` (seeded random search over ``SPACE``) at the
   first seed; model sizes stay fixed (embedding dim 16, DeepFM MLP (128, 64), DIN activation unit (36,) and
   OverArch (200, 80));
3. the ``--top`` trials with the highest validation AUC are re-run at the other seeds, and ``choose`` picks the
   configuration with the highest MEAN validation AUC over the seeds (baseline included), so that one lucky seed
   does not decide;
4. test AUC is read only for the baseline and the chosen configuration (mean +- std over the seeds).

With ``--grid`` the configurations of step 2 are a grid around the current defaults instead (``grid_configs``:
each ``--grid`` a product of the values given per knob, the union over the ``--grid`` s), named g01, g02, ...,
and the results are kept as ``<model>-grid`` next to the random search's.

With ``--peer-seeds`` the peers (DeepCTR-Torch, RecBole; ``bench/peers.py`` in their own environment, their
defaults) are also run at every seed, for the spread that "above the peers" is judged against.

Progress is printed with rich; the tables and a plot of the valid AUC per trial (``docs/tuning_valid_auc.png``)
go to the ``tuning`` section of ``BENCHMARKS.md``; all figures to ``<work>/tune.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.report import write_section
from features.config import ROOT, PlatformConfig, TrainConfig, load_config

COMMAND = "make tune"
PLOT = ROOT / "docs" / "tuning_valid_auc.png"
#: What bench.models trains with (epochs, early stopping, embedding dim): the search does not change them.
FIXED = {"epochs": 12, "patience": 2, "embedding_dim": 16}
#: The knobs searched (name -> ("log", low, high) for a log-uniform draw, or a tuple of choices).
SPACE: dict[str, tuple] = {
    "lr_sparse": ("log", 0.003, 0.1),  # the tables' row-wise Adagrad: the main regulariser of the id rows here
    "lr_dense": ("log", 3e-4, 5e-3),  # AdamW on the MLPs, attention unit, first-order weights
    "weight_decay": ("log", 1e-5, 0.3),  # AdamW's decoupled decay on those dense parameters
    "dropout": (0.0, 0.1, 0.2, 0.3, 0.5),
    "batch_size": (512, 1024, 2048, 4096),
    "warmup_frac": (0.0, 0.05, 0.1),
    "min_lr_factor": (0.01, 0.1, 1.0),
    # the mini-batch aware L2 on the user/item rows (Zhou et al. 2018, 4.2); added after the first searches
    "mba_lambda": (0.0, 1e-3, 1e-2, 1e-1, 1.0),
    # id dropout with cold ids read as the OOV row (training.modules.cold_ids); added after the mba_lambda grid
    "id_dropout": (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.99),
    # time-decayed sample weights (training.data.recency_weights), half-life in days; 0 off
    "recency_half_life_days": (0.0, 15.0, 30.0, 60.0, 120.0),
}
KNOBS = tuple(SPACE)


# ------------------------------------------------------------------------------------------ pure parts
def sample_configs(space: dict[str, tuple], n: int, seed: int) -> list[dict]:
    """``n`` configurations drawn independently from ``space`` (random search, Bergstra & Bengio 2012): a
    ``("log", low, high)`` entry log-uniformly (rounded to 3 significant digits), a tuple of choices uniformly.

    >>> a = sample_configs({"lr": ("log", 1e-3, 1e-1), "bs": (512, 1024)}, 3, seed=0)
    >>> a == sample_configs({"lr": ("log", 1e-3, 1e-1), "bs": (512, 1024)}, 3, seed=0), len(a)
    (True, 3)
    >>> all(1e-3 <= c["lr"] <= 1e-1 and c["bs"] in (512, 1024) for c in a)
    True
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        config = {}
        for name, spec in space.items():
            if spec and spec[0] == "log":
                _, low, high = spec
                config[name] = float(f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}")
            else:
                config[name] = spec[int(rng.integers(len(spec)))]
        out.append(config)
    return out


def grid_configs(baseline: dict, grids: list[dict[str, list]]) -> list[dict]:
    """``baseline`` with every combination of the values of each grid (a product per grid, the union over the
    grids, in order, without repeats and without ``baseline`` itself).

    >>> base = {"lam": 0.0, "lr": 0.02, "bs": 2048}
    >>> [(c["lam"], c["lr"]) for c in grid_configs(base, [{"lam": [0.0, 0.1, 1.0]}, {"lam": [0.1], "lr": [0.05]}])]
    [(0.1, 0.02), (1.0, 0.02), (0.1, 0.05)]
    """
    import itertools

    out: list[dict] = []
    for grid in grids:
        for values in itertools.product(*grid.values()):
            config = baseline | dict(zip(grid, values))
            if config != baseline and config not in out:
                out.append(config)
    return out


def parse_grid(spec: str) -> dict[str, list]:
    """``"mba_lambda=0.01,0.1 lr_sparse=0.05"`` -> ``{"mba_lambda": [0.01, 0.1], "lr_sparse": [0.05]}`` (ints stay
    ints).

    >>> parse_grid("mba_lambda=0.01,1 batch_size=1024")
    {'mba_lambda': [0.01, 1.0], 'batch_size': [1024]}

    Raises:
        ValueError: a knob not in ``SPACE`` or a value that is not a number.
    """
    grid = {}
    for part in spec.split():
        name, _, values = part.partition("=")
        if name not in SPACE:
            raise ValueError(f"--grid knob {name!r} is not one of {KNOBS}")
        grid[name] = [int(v) if isinstance(SPACE[name][0], int) else float(v) for v in values.split(",")]
    return grid


@dataclass
class Trial:
    """One configuration and its validation AUC per seed (test AUC kept only for the baseline and the chosen)."""

    name: str
    config: dict
    valid: dict  # seed -> valid AUC of the best epoch
    test: dict  # seed -> {"auc", "logloss", "gauc", "best_epoch", "epochs", "samples_per_s"}
    wall_s: float = 0.0

    @property
    def mean_valid(self) -> float:
        return statistics.fmean(self.valid.values())


def choose(trials: list[Trial], seeds: list[int]) -> Trial:
    """The trial with the highest mean validation AUC among those run at every seed of ``seeds``.

    >>> a = Trial("a", {}, {0: 0.70, 1: 0.70}, {})
    >>> b = Trial("b", {}, {0: 0.72}, {})  # one seed only: not eligible
    >>> c = Trial("c", {}, {0: 0.69, 1: 0.72}, {})
    >>> choose([a, b, c], [0, 1]).name
    'c'

    Raises:
        ValueError: no trial was run at every seed.
    """
    full = [t for t in trials if all(s in t.valid for s in seeds)]
    if not full:
        raise ValueError(f"no trial has a validation AUC at every seed of {seeds}")
    return max(full, key=lambda t: t.mean_valid)


def mean_std(values) -> str:
    """``mean +- sample std`` with 4 decimals.

    >>> mean_std([0.70, 0.71, 0.72])
    '0.7100 ± 0.0100'
    """
    v = list(values)
    return f"{statistics.fmean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"


# ------------------------------------------------------------------------------------------------ running
class Runner:
    """Trains one configuration at a time in one Ray cluster on a scratch lake under ``work``."""

    def __init__(self, work: Path) -> None:
        import ray

        self.work = work
        self.cfg = PlatformConfig(data_dir=work / "data", artifacts_dir=work / "artifacts", run_name="tune",
                                  train=TrainConfig(num_workers=1))
        lake = self.cfg.lake_dir
        shutil.rmtree(lake / "export", ignore_errors=True)
        shutil.copytree(load_config().lake_dir / "export", lake / "export")
        ray.init(num_cpus=self.cfg.train.ray_cpus, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})

    def run(self, model: str, config: dict, seed: int) -> dict:
        """One training run; its stage result (``valid_auc``, ``test_auc``, ...)."""
        from training.train import TrainOptions, train

        shutil.rmtree(self.cfg.checkpoint_dir, ignore_errors=True)
        opts = TrainOptions(model=model, seed=seed, **FIXED, **config)
        return train(self.cfg, opts)

    def close(self) -> None:
        import ray

        ray.shutdown()


def baseline_config(model: str) -> dict:
    """The searched knobs at their current defaults (the model's ``ModelSpec.train`` and ``TrainOptions``)."""
    from training.registry import get_model
    from training.train import TrainOptions

    opts, config = TrainOptions(model=model), get_model(model).default_config()
    out = {}
    for k in KNOBS:  # a knob left unset (dropout) is the config's; a config without it (MF) does not search it
        value = getattr(opts, k) if getattr(opts, k) is not None else getattr(config, k, None)
        if value is not None:
            out[k] = value
    return out


def search(train_one, label: str, baseline: dict, space: dict[str, tuple], n_trials: int, seeds: list[int],
           top: int, search_seed: int, console, grid: list[dict] | None = None) -> dict:
    """Baseline at every seed, ``n_trials`` random configurations (or the ``grid``'s configurations, see
    ``grid_configs``) at the first seed, the ``top`` best of those re-run at the other seeds, and the choice by
    mean valid AUC (``choose``); ``train_one(config, seed)`` trains once and returns a stage result
    (``valid_auc``, ``test_auc``, ``test_logloss``, ``best_epoch``, ``epochs``, ``train_samples_per_s``). Returns
    ``tune.json``'s entry for ``label``."""
    trials = [Trial("defaults", baseline, {}, {})]
    if grid:
        trials += [Trial(f"g{i + 1:02d}", c, {}, {}) for i, c in enumerate(grid_configs(baseline, grid))]
    else:
        trials += [Trial(f"t{i + 1:02d}", c, {}, {})
                   for i, c in enumerate(sample_configs(space, n_trials, search_seed))]
    plan = [(trials[0], s) for s in seeds] + [(t, seeds[0]) for t in trials[1:]]
    done = 0

    def run(trial: Trial, seed: int) -> None:
        nonlocal done
        t0 = time.perf_counter()
        try:
            r = train_one(trial.config, seed)
        except Exception as e:  # a failed trial is reported, not fatal to the search
            console.print(f"[red]{label} {trial.name} seed {seed} failed: {type(e).__name__}: {e}")
            return
        trial.wall_s += time.perf_counter() - t0
        trial.valid[seed] = r["valid_auc"]
        trial.test[seed] = {"auc": r["test_auc"], "logloss": r["test_logloss"], "gauc": r.get("test_gauc"),
                            "best_epoch": r["best_epoch"], "epochs": r["epochs"],
                            "samples_per_s": r["train_samples_per_s"]}
        done += 1
        console.print(f"[{label}] {done} runs, {trial.name} seed {seed}: valid AUC {r['valid_auc']:.4f} "
                      f"(best epoch {r['best_epoch']}/{r['epochs']}, {time.perf_counter() - t0:.0f} s) "
                      f"{_fmt(trial.config)}")

    for trial, seed in plan:
        run(trial, seed)
    ranked = sorted((t for t in trials[1:] if seeds[0] in t.valid), key=lambda t: -t.valid[seeds[0]])
    for trial in ranked[:top]:
        for seed in seeds[1:]:
            run(trial, seed)
    chosen = choose(trials, seeds)
    for t in trials:  # test figures are read for the baseline and the chosen configuration only
        if t is not chosen and t is not trials[0]:
            t.test = {}
    return {"trials": [t.__dict__ | {"mean_valid": t.mean_valid if t.valid else None} for t in trials],
            "chosen": chosen.name, "seeds": seeds, "search_seed": search_seed, "top": top, "commit": _commit(),
            "grid": grid or None,
            "finished_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def tune_model(runner: Runner, model: str, n_trials: int, seeds: list[int], top: int, search_seed: int,
               console, grid: list[dict] | None = None) -> dict:
    """``search`` over ``SPACE`` (or the ``grid``) for our ``model``, from its current defaults."""
    return search(lambda config, seed: runner.run(model, config, seed), model, baseline_config(model), SPACE,
                  n_trials, seeds, top, search_seed, console, grid)


#: DeepCTR-Torch's main knobs (its Adam on every parameter, its L2 penalty on the embeddings, dropout, batch).
PEER_SPACE: dict[str, tuple] = {
    "lr": ("log", 3e-4, 1e-2),
    "l2_embedding": ("log", 1e-7, 1e-3),
    "dropout": (0.0, 0.1, 0.2, 0.3, 0.5),
    "batch_size": (512, 1024, 2048, 4096),
}
#: DeepCTR-Torch as bench.models runs it (its own defaults for the L2 penalty: DeepFM 1e-5, DIN 1e-6).
PEER_DEFAULTS = {"deepfm": {"lr": 1e-3, "l2_embedding": 1e-5, "dropout": 0.2, "batch_size": 2048},
                 "din": {"lr": 1e-3, "l2_embedding": 1e-6, "dropout": 0.2, "batch_size": 2048}}


def tune_peer(work: Path, model: str, n_trials: int, seeds: list[int], top: int, search_seed: int,
              console) -> dict:
    """The same ``search`` (same budget and protocol) for DeepCTR-Torch's ``model`` over ``PEER_SPACE``."""
    from bench.models import CACHE, _peer_args, peers_python, run_peer

    python = peers_python(str(CACHE / "uv-0.13.8" / "bin" / "uv"))
    extra = ["--model", "din", "--hidden", "200", "80"] if model == "din" else []

    def train_one(config: dict, seed: int) -> dict:
        args = [*_peer_args(), *extra, "--seed", str(seed), "--lr", str(config["lr"]), "--l2-embedding",
                str(config["l2_embedding"]), "--dropout", str(config["dropout"]), "--batch-size",
                str(config["batch_size"])]  # the later --batch-size wins over _peer_args' 2048
        m, r = run_peer(python, "deepctr", work, args, tag=f"tune-deepctr-{model}", data="tune/data")
        if m.rc:
            raise RuntimeError(f"exit {m.rc}, see {m.log}")
        return r

    return search(train_one, f"deepctr {model}", PEER_DEFAULTS[model], PEER_SPACE, n_trials, seeds, top,
                  search_seed, console)


def _fmt(config: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def peer_seeds(work: Path, seeds: list[int], console, skip_deepctr: bool = False) -> list[dict]:
    """The peers at their defaults (as ``bench.models`` runs them) at every seed: test and valid AUC
    (``skip_deepctr``: RecBole only, DeepCTR-Torch's defaults having been run at every seed by ``tune_peer``)."""
    from bench.models import CACHE, _peer_args, peers_python, run_peer

    python = peers_python(str(CACHE / "uv-0.13.8" / "bin" / "uv"))
    rows = []
    for model, extra in (("deepfm", []), ("din", ["--model", "din", "--hidden", "200", "80"])):
        for peer, impl in (("deepctr", "DeepCTR-Torch 0.3.0"), ("recbole", "RecBole 1.2.1")):
            if skip_deepctr and peer == "deepctr":
                continue
            for seed in seeds:
                if model == "din" and peer == "recbole" and seed != seeds[0]:
                    continue  # RecBole's DIN takes ~6 min a run on this machine: one seed only
                m, r = run_peer(python, peer, work, [*_peer_args(), *extra, "--seed", str(seed)],
                                tag=f"{peer}-{model}-s{seed}", data="tune/data")
                rows.append({"model": model, "impl": impl, "seed": seed, "rc": m.rc, **r})
                console.print(f"[peers] {impl} {model} seed {seed}: valid {r.get('valid_auc', float('nan')):.4f}"
                              f" test {r.get('test_auc', float('nan')):.4f}")
    return rows


# ------------------------------------------------------------------------------------------------ report
def plot(results: dict, path: Path) -> None:
    """Valid AUC per trial (first seed; mean over the seeds as a bar for those re-run), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.8 * rows), squeeze=False)
    for ax, (key, r) in zip(axes.flat, results.items()):
        seeds = r["seeds"]
        names = [t["name"] for t in r["trials"]]
        first = [t["valid"].get(str(seeds[0]), t["valid"].get(seeds[0], np.nan)) for t in r["trials"]]
        ax.plot(range(len(names)), first, "o", label=f"valid AUC, seed {seeds[0]}")
        for i, t in enumerate(r["trials"]):
            vals = list(t["valid"].values())
            if len(vals) > 1:
                ax.errorbar(i, statistics.fmean(vals), yerr=statistics.stdev(vals), fmt="s", color="C1",
                            label="mean ± std over seeds" if i == 0 else None)
        best = names.index(r["chosen"])
        ax.axvline(best, color="C2", ls="--", lw=1, label=f"chosen ({r['chosen']})")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        model, impl = _label(key)
        ax.set_title(f"{model}, {impl}: valid AUC per trial")
        ax.set_ylabel("valid AUC")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _valid_of(t: dict, seed) -> float | None:
    return t["valid"].get(str(seed), t["valid"].get(seed))


def _label(key: str) -> tuple[str, str]:
    """(model, implementation) of a ``tune.json`` results key: ``deepfm`` / ``din`` are ours (``<m>-grid`` ours
    searched on a grid, ``<m>-grid-<tag>`` one of several grids merged into one report, keys renamed by hand),
    ``deepctr-<m>`` DeepCTR-Torch's.

    >>> _label("deepctr-din"), _label("din-grid"), _label("deepfm"), _label("din-grid-user ids")
    (('din', 'DeepCTR-Torch 0.3.0'), ('din', 'ours, grid'), ('deepfm', 'ours'), ('din', 'ours, grid user ids'))
    """
    if key.startswith("deepctr-"):
        return key.split("-", 1)[1], "DeepCTR-Torch 0.3.0"
    model, grid, tag = key.partition("-grid")
    if grid and (not tag or tag.startswith("-")):
        return model, f"ours, grid {tag[1:]}".rstrip()
    return key, "ours"


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def render(results: dict, peers: list[dict], load0: float, commit: str, plot_path: Path = PLOT) -> str:
    """The ``tuning`` section (Markdown): the trials of each search, then per model the test figures (mean ±
    sample std over the seeds) of the defaults and of the chosen configuration, and the peers' seed runs."""
    def space(sp: dict) -> str:
        return "; ".join(f"{k} log-uniform [{v[1]:g}, {v[2]:g}]" if v[0] == "log" else
                         f"{k} in {{{', '.join(map(_num, v))}}}" for k, v in sp.items())

    parts = [
        "Random search (Bergstra & Bengio 2012), or with `--grid` a grid around the defaults, on the VALIDATION "
        "split of MovieLens-100K (label rating >= 4, "
        "global 80/10/10 time split; the features, model sizes, epochs (at most 12) and early stopping (patience 2) "
        "of `bench.models`), one Ray Train worker, one Ray cluster for all of our trials. Each search: the "
        "defaults at every seed, the random trials at the first seed, the best `top` of those re-run at the other "
        "seeds; the configuration with the highest MEAN valid AUC over the seeds is chosen (the defaults compete "
        "too). Test AUC is read only for the defaults and the chosen configuration.\n\n"
        f"Ours: {space(SPACE)}. DeepCTR-Torch (the same protocol and budget): {space(PEER_SPACE)}. A knob "
        "missing from a search's table did not exist yet when it ran (`mba_lambda`, the mini-batch aware L2 "
        "on the user/item rows, Zhou et al. 2018 section 4.2: off then).\n\n"
        f"Load average (1 min) {load0:.1f} when this invocation started, {os.getloadavg()[0]:.1f} when written; the "
        f"searches may have shared the 2 cores with other work (the load average says how much), so the seconds "
        f"here are not benchmarks (see `models`); written at commit {commit}. Plot of the valid "
        "AUC per trial: "
        f"[{plot_path.relative_to(ROOT)}]({plot_path.relative_to(ROOT)})."]
    summary: dict[str, list[str]] = {}
    tests: dict[str, list[tuple[str, list[float]]]] = {}  # model -> (run, test AUC per seed) of the final runs
    for key, r in results.items():
        model, impl = _label(key)
        seeds = r["seeds"]
        knobs = list(r["trials"][0]["config"])
        head = ("| trial | " + " | ".join(knobs) + f" | valid AUC (seed {seeds[0]}) | valid AUC over seeds "
                + " ".join(map(str, seeds)) + " |\n|---|" + "---:|" * (len(knobs) + 2))
        rows = []
        for t in sorted(r["trials"], key=lambda t: -(_valid_of(t, seeds[0]) or 0)):
            mark = " (chosen)" if t["name"] == r["chosen"] else ""
            first = _valid_of(t, seeds[0])
            mean = mean_std(t["valid"].values()) if len(t["valid"]) == len(seeds) else ""
            rows.append(f"| {t['name']}{mark} | " + " | ".join(_num(t["config"][k]) for k in knobs)
                        + f" | {'n/a' if first is None else f'{first:.4f}'} | {mean} |")
        when = f", commit {r['commit']}, finished {r['finished_utc']} UTC" if r.get("commit") else ""
        what = (f"grid {' | '.join(' x '.join(f'{k} {_list_g(v)}' for k, v in g.items()) for g in r['grid'])}: "
                f"{len(r['trials']) - 1} configurations + the defaults" if r.get("grid") else
                f"{len(r['trials']) - 1} random trials + the defaults, search seed {r['search_seed']}")
        note = f" {r['note']}" if r.get("note") else ""  # what did not run as planned, set by hand in tune.json
        parts.append(f"**{model}, {impl}** ({what}, top {r['top']} re-run{when}):{note}\n\n{head}\n"
                     + "\n".join(rows))
        by = {t["name"]: t for t in r["trials"]}
        for name in dict.fromkeys(("defaults", r["chosen"])):
            t = by[name]
            test = list(t["test"].values())
            what = "defaults" if name == "defaults" else f"tuned ({name})"
            if name == r["chosen"]:
                tests.setdefault(model, []).append((f"{impl}, {what}", [x["auc"] for x in test]))
            summary.setdefault(model, []).append(
                f"| {model} | {impl}, {what} | {mean_std(t['valid'].values())} | "
                f"{mean_std(x['auc'] for x in test)} | {mean_std(x['logloss'] for x in test)} | "
                f"{_list(x['auc'] for x in test)} | {len(test)} |")
    for model, impl in dict.fromkeys((p["model"], p["impl"]) for p in peers if not p.get("rc")):
        ps = [p for p in peers if p["model"] == model and p["impl"] == impl and not p.get("rc")]
        tests.setdefault(model, []).append((f"{impl}, defaults", [p["test_auc"] for p in ps]))
        summary.setdefault(model, []).append(
            f"| {model} | {impl}, defaults | {mean_std(p['valid_auc'] for p in ps)} | "
            f"{mean_std(p['test_auc'] for p in ps)} | {mean_std(p['test_logloss'] for p in ps)} | "
            f"{_list(p['test_auc'] for p in ps)} | {len(ps)} |")
    parts.append("Test figures (mean ± sample std over the seeds; each run's best epoch by valid AUC):\n\n"
                 "| model | run | valid AUC | test AUC | test logloss | test AUC per seed | seeds |\n"
                 "|---|---|---:|---:|---:|---|---:|\n" + "\n".join(x for rows in summary.values() for x in rows))
    parts.append(verdict(tests))
    return "\n\n".join(parts)


def verdict(tests: dict[str, list[tuple[str, list[float]]]]) -> str:
    """Per model, ours (as chosen) against the best other run by mean test AUC, the difference next to the seed
    spreads, so that "above" is read against the noise.

    >>> print(verdict({"din": [("ours, defaults", [0.715, 0.714]), ("peer, defaults", [0.713, 0.7134])]}))
    - din: ours, defaults 0.7145 vs peer, defaults 0.7132: difference +0.0013 (seed std 0.0007 / 0.0003, 2 / 2 seeds)
    """
    lines = []
    for model, runs in tests.items():
        ours = ([r for r in runs if r[0].startswith("ours")] or [None])[-1]  # the latest search of ours
        others = [r for r in runs if not r[0].startswith("ours")]
        if not ours or not others:
            continue
        best = max(others, key=lambda r: statistics.fmean(r[1]))
        sd = [statistics.stdev(v) if len(v) > 1 else float("nan") for v in (ours[1], best[1])]
        lines.append(f"- {model}: {ours[0]} {statistics.fmean(ours[1]):.4f} vs {best[0]} "
                     f"{statistics.fmean(best[1]):.4f}: difference "
                     f"{statistics.fmean(ours[1]) - statistics.fmean(best[1]):+.4f} (seed std {sd[0]:.4f} / "
                     f"{sd[1]:.4f}, {len(ours[1])} / {len(best[1])} seeds)")
    return "\n".join(lines)


def _list_g(values) -> str:
    return "{" + ", ".join(map(_num, values)) + "}"


def _list(values) -> str:
    return " ".join(f"{v:.4f}" for v in values)


def _commit() -> str:
    import subprocess

    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip() or "unknown"


def _save(path: Path, update) -> dict:
    """Re-read ``path`` (another invocation may have added its part), apply ``update(state)``, write it back."""
    state = json.loads(path.read_text()) if path.exists() else {}
    state = {"results": {}, "peers": [], **state}
    update(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2, default=float))
    return state


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="deepfm,din", help="our models to tune; empty: none (to run only the peers "
                   "or to re-render the last figures from <work>/tune.json)")
    p.add_argument("--peer-models", default="", help="DeepCTR-Torch models to tune the same way (deepfm,din)")
    p.add_argument("--trials", default="12,8",
                   help="random trials per model (one number, or one per model in --models order)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--top", type=int, default=2, help="best trials re-run at every seed")
    p.add_argument("--search-seed", type=int, default=2026)
    p.add_argument("--work", type=Path, default=Path("/tmp/recsys-tune"))
    p.add_argument("--merge", type=Path, nargs="*", default=[], help="other tune.json files to report with")
    p.add_argument("--peer-seeds", action="store_true", help="also run the peers at their defaults at every seed")
    p.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md or the plot")
    p.add_argument("--section", default="tuning", help="the BENCHMARKS.md section (and docs/<section>_valid_auc.png "
                   "plot) to write: another name keeps a search with its own --work out of the main section")
    p.add_argument("--grid", action="append", default=[], help='a grid around the defaults instead of the random '
                   'trials, e.g. "mba_lambda=0.001,0.01 lr_sparse=0.05" (a product; repeat for a union)')
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    peer_models = [m for m in a.peer_models.split(",") if m]
    from training.registry import list_models

    if set(models) - set(list_models(task="ctr")) or set(peer_models) - {"deepfm", "din"}:
        p.error(f"--models: models of the CTR task ({', '.join(list_models(task='ctr'))}); --peer-models: the "
                f"peers' deepfm and/or din")
    n = [int(x) for x in a.trials.split(",")]
    n_trials = {m: n[min(i, len(n) - 1)] for names in (models, peer_models) for i, m in enumerate(names)}
    seeds = [int(s) for s in a.seeds.split(",")]
    grid = [parse_grid(g) for g in a.grid]
    console = Console()
    load0 = os.getloadavg()[0]
    saved = a.work / "tune.json"
    lake = a.work / "tune" / "data" / "lake"
    if models:
        runner = Runner(a.work / "tune")
        try:
            for model in models:
                console.rule(f"ours {model}: {n_trials[model]} trials, seeds {seeds}")
                r = tune_model(runner, model, n_trials[model], seeds, a.top, a.search_seed, console, grid)
                key = f"{model}-grid" if grid else model
                _save(saved, lambda s: s["results"].__setitem__(key, r))
        finally:
            runner.close()
    if (peer_models or a.peer_seeds) and not (lake / "export").exists():
        shutil.copytree(load_config().lake_dir / "export", lake / "export")
    for model in peer_models:
        console.rule(f"DeepCTR-Torch {model}: {n_trials[model]} trials, seeds {seeds}")
        r = tune_peer(a.work, model, n_trials[model], seeds, a.top, a.search_seed, console)
        _save(saved, lambda s: s["results"].__setitem__(f"deepctr-{model}", r))
    if a.peer_seeds:
        rows = peer_seeds(a.work, seeds, console, skip_deepctr=bool(peer_models))
        _save(saved, lambda s: s.__setitem__("peers", rows))
    state = _save(saved, lambda s: None)
    for other in a.merge:
        extra = json.loads(other.read_text())
        state["results"].update(extra.get("results", {}))
        state["peers"] += extra.get("peers", [])
    plot_path = PLOT if a.section == "tuning" else PLOT.with_name(f"{a.section}_valid_auc.png")
    body = render(state["results"], state["peers"], load0, _commit(), plot_path)
    console.print(body)
    if not a.no_write:
        plot(state["results"], plot_path)
        command = COMMAND if a.section == "tuning" else "python -m bench.tune " + " ".join(
            f"'{x}'" if " " in x or not x else x for x in (argv if argv is not None else sys.argv[1:]))
        write_section(a.section, body, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
