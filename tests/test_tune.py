"""bench.tune's pure parts: the random search stays inside its space, the choice is by mean validation AUC over
every seed, and the report shows test figures only for the defaults and the chosen configuration."""

from __future__ import annotations

import doctest

from bench import tune


def test_doctests():
    assert doctest.testmod(tune).failed == 0


def test_samples_stay_in_the_space_and_are_seeded():
    configs = tune.sample_configs(tune.SPACE, 50, seed=3)
    assert configs == tune.sample_configs(tune.SPACE, 50, seed=3)
    assert configs != tune.sample_configs(tune.SPACE, 50, seed=4)
    for c in configs:
        assert set(c) == set(tune.KNOBS)
        for name, spec in tune.SPACE.items():
            if spec[0] == "log":
                assert spec[1] * 0.999 <= c[name] <= spec[2] * 1.001
            else:
                assert c[name] in spec
    # every choice is drawn at least once in 50 draws of at most 5 choices
    for name, spec in tune.SPACE.items():
        if spec[0] != "log":
            assert {c[name] for c in configs} == set(spec)


def test_choice_is_the_best_mean_over_all_seeds():
    trials = [tune.Trial("defaults", {}, {0: 0.700, 1: 0.702, 2: 0.701}, {}),
              tune.Trial("lucky", {}, {0: 0.720, 1: 0.690, 2: 0.690}, {}),  # best first seed, worse mean (0.7)
              tune.Trial("steady", {}, {0: 0.705, 1: 0.706, 2: 0.704}, {}),
              tune.Trial("unfinished", {}, {0: 0.730}, {})]
    assert tune.choose(trials, [0, 1, 2]).name == "steady"


def test_report_reads_test_only_for_defaults_and_chosen():
    cfg = {k: 0.1 for k in tune.KNOBS}
    test = {s: {"auc": 0.71 + s / 1000, "logloss": 0.62, "gauc": 0.6, "best_epoch": 3, "epochs": 5,
                "samples_per_s": 1.0} for s in (0, 1, 2)}
    results = {"deepfm": {"seeds": [0, 1, 2], "search_seed": 1, "top": 1, "chosen": "t01", "trials": [
        {"name": "defaults", "config": cfg, "valid": {"0": 0.69, "1": 0.69, "2": 0.70}, "test": test},
        {"name": "t01", "config": cfg, "valid": {"0": 0.70, "1": 0.71, "2": 0.72}, "test": test},
        {"name": "t02", "config": cfg, "valid": {"0": 0.65}, "test": {}}]}}
    body = tune.render(results, [], load0=1.0, commit="abc")
    assert "| t01 (chosen) |" in body and "| 0.7100 ± 0.0100 |" in body  # t01's mean valid AUC
    assert "| deepfm | ours, tuned (t01) | 0.7100 ± 0.0100 | 0.7110 ± 0.0010 |" in body
    assert "t02)" not in body
