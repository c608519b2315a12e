"""evaluation.report states its method and keeps its parts apart, on a small fixture run (no lake, no browser):
the method section with the label threshold and split of features.definitions, every model folder of the run,
the simulated bandit section apart from MovieLens with the simulator's true values, the publish gate worded by its
case, genre names in the t-SNE legend, and summary.json without an absolute path. Also the two figures the
evaluate stage now records for it: the pointer before the gate's decision and the simulated log's true values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation import estimators, evaluate, report
from features.config import PlatformConfig
from features.definitions import POSITIVE_RATING, SPLIT_FRACTIONS
from features.results import write_stage_result
from features.tables import CATEGORY_VOCAB

K = 10
MODELS = {"deepfm": "ranker", "din": "ranker", "item2vec": "retriever", "mf": "retriever", "wide_deep": "ranker"}


def _figures(hr: float) -> dict:
    return {f"hr@{K}": hr, f"ndcg@{K}": hr / 2, f"mrr@{K}": hr / 3, "cases": 100, "coverage": 0.1,
            "novelty_bits": 8.0}


def _evaluate_result(gate: dict) -> dict:
    return {
        "k": K, "cases": 100, "cold_start_cases": 3, "n_recent": 15,
        "retrieval": {"item2vec": _figures(0.1) | {"model_version": "v2"}, "popularity": _figures(0.06)},
        "prequential": {"k": K, "n_windows": 3, "windows": [
            {"window": w, "cases": 100, "train_events": 1000 * w,
             "models": {"cooccurrence": _figures(0.14), "popularity": _figures(0.07)}} for w in (1, 2, 3)],
            "overall": {"cooccurrence": _figures(0.14), "popularity": _figures(0.07)}},
        "bandit": {"source": "simulated (evaluation.estimators.simulate_uniform_log, seed 0)", "events": 5000,
                   "candidates": 10, "expected_kept": 500.0, "oracle_ctr": 0.6123, "uniform_ctr": 0.2,
                   "policies": {n: {"ctr": c, "low": c - 0.02, "high": c + 0.02, "kept": 500, "events": 5000}
                                for n, c in (("ucb1", 0.3), ("linucb(1)", 0.5))},
                   "truth": {"uniform_ctr": 0.1987, "arm_ctr": {"min": 0.03, "mean": 0.17, "max": 0.37},
                             "policies": {"ucb1": 0.3141, "linucb(1)": 0.4859}, "method": "online run"}},
        "interleaving": {"sign_agreement": 1.0, "comparisons": [
            {"on": "test", "a": "item2vec", "b": "popularity", "wins_a": 30, "wins_b": 20, "ties": 50,
             "cases": 100, "preference": 0.1, "hr_diff": 0.04}]},
        "gate": gate,
    }


SAME_VERSION = {"decision": "reject", "candidate": "v2", "serving": "v2", "pointer": "/x/serving/current.json",
                "candidate_metrics": {f"hr@{K}": 0.1, f"ndcg@{K}": 0.05},
                "previous": {"model_version": "v2", "metrics": {f"hr@{K}": 0.1, f"ndcg@{K}": 0.05}},
                "rule": {"metric": f"ndcg@{K}", "min_gain": 0.0, "guard": [f"hr@{K}"], "max_drop": 0.0}}


def _run(tmp_path: Path, gate: dict = SAME_VERSION) -> PlatformConfig:
    """A run folder with the evaluate and features results and a model folder (meta.json) per ``MODELS``."""
    cfg = PlatformConfig(artifacts_dir=tmp_path / "artifacts", data_dir=tmp_path / "data")
    write_stage_result(cfg, "evaluate", _evaluate_result(gate))
    write_stage_result(cfg, "features", {"samples": {"train": 800, "valid": 100, "test": 100},
                                         "positives": {"train": 440, "valid": 56, "test": 55}})
    for name, kind in MODELS.items():
        folder = cfg.run_dir / "models" / name
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"model": name, "kind": kind, "task": "ctr",
                                                      "model_version": f"{name}-v1"}))
    return cfg


def _section(page: str, heading: str) -> str:
    """The HTML from ``heading``'s <h2>/<h3> to the next heading of the same or a higher level."""
    m = re.search(rf"<h([23])>{re.escape(heading)}[^<]*</h\1>", page)
    assert m, f"no section {heading!r}"
    level = int(m.group(1))
    nxt = re.compile(r"<h([23])>").search(page, m.end())
    while nxt and int(nxt.group(1)) > level:
        nxt = re.compile(r"<h([23])>").search(page, nxt.end())
    return page[m.start():nxt.start() if nxt else len(page)]


def test_method_section_states_the_label_split_cases_and_seen_rule(tmp_path, monkeypatch):
    cfg = _run(tmp_path)
    page = report.write_report(cfg, tsne=False).read_text()
    assert page.index("<h2>Method</h2>") < page.index("ROC curves")              # at the top
    method = _section(page, "Method")
    assert f"rating &gt;= {POSITIVE_RATING:g}" in method  # a run whose features result predates label_rule
    for name, frac in SPLIT_FRACTIONS:
        assert f"{frac:.0%} <b>{name}</b>" in method
    assert "(100 events, 55 positive)" in method                                   # the run's own test split
    assert "100 cases" in method and "3 of them with no history" in method
    assert "strictly before the case" in method and "Static replay" in method and "Prequential replay" in method
    # the threshold is read from the code, not written into the report
    monkeypatch.setattr(report, "POSITIVE_RATING", 3.5)
    assert "rating &gt;= 3.5" in report.write_report(cfg, tsne=False).read_text()
    # the data source and its label rule, as the features stage recorded them
    write_stage_result(cfg, "features", {"samples": {"train": 800, "valid": 100, "test": 100},
                                         "positives": {"train": 440, "valid": 56, "test": 55},
                                         "source": "shop", "label_rule": "click == 1"})
    method = _section(report.write_report(cfg, tsne=False).read_text(), "Method")
    assert "data source <b>shop</b>" in method and "when click == 1 and 0 otherwise" in method


def test_every_model_folder_of_the_run_appears(tmp_path):
    cfg = _run(tmp_path)
    page = report.write_report(cfg, tsne=False).read_text()
    models = _section(page, "Models of this run")
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td>", models)
    assert dict(rows) == MODELS                                                    # every folder, its kind
    assert f"{len(MODELS)} model folders" in models
    assert re.search(r"<td>item2vec</td>.*?static replay", models)                 # where it appears
    # a folder the registry may not know is listed too: the run, not a hard-coded list, decides
    extra = cfg.run_dir / "models" / "some_new_model"
    extra.mkdir()
    (extra / "meta.json").write_text(json.dumps({"model": "some_new_model", "kind": "ranker",
                                                 "model_version": "n-1"}))
    assert "<td>some_new_model</td>" in _section(report.write_report(cfg, tsne=False).read_text(),
                                                 "Models of this run")


def test_simulated_bandit_section_is_apart_and_shows_true_values(tmp_path):
    cfg = _run(tmp_path)
    page = report.write_report(cfg, tsne=False).read_text()
    movielens = _section(page, "MovieLens-100K results")
    assert "<h2>MovieLens-100K results</h2>" in movielens
    assert "ucb1" not in movielens and "replay estimator" not in movielens.lower()
    bandit = _section(page, "Simulated bandit log")
    assert bandit.startswith("<h2>") and page.index("<h2>Simulated bandit log") > page.index("<h3>Publish gate")
    header = re.search(r"<table><tr>(.*?)</tr>", bandit).group(1)
    assert "<th>estimated CTR</th>" in header and "<th>true CTR</th>" in header
    assert re.search(r"<td>ucb1</td><td>0\.3000</td><td>0\.2800</td><td>0\.3200</td><td>0\.3141</td>"
                     r"<td>-0\.0141</td>", bandit)
    assert "<td>0.1987</td>" in bandit and "<td>0.6123</td>" in bandit             # logging policy, oracle
    assert "<dt>true CTR</dt>" in bandit                                            # defined under the table


def test_every_table_has_a_glossary_of_its_columns(tmp_path):
    page = report.write_report(_run(tmp_path), tsne=False).read_text()
    tables = list(re.finditer(r"<table><tr>(.*?)</tr>.*?</table>(<dl class='glossary'>.*?</dl>)?", page))
    assert len(tables) == 6      # models, static replay, prequential, interleaving, gate, bandit
    for table in tables:
        assert table.group(2), f"table without a glossary: {table.group(1)}"
        terms = {t for dt in re.findall(r"<dt>([^<]+)</dt>", table.group(2)) for t in dt.split(", ")}
        for column in re.findall(r"<th>([^<]+)</th>", table.group(1)):
            # a row's own name needs no definition; "<model> HR@10" is defined by "HR@10"
            assert column in ("model", "metric") or column in terms or column.split(" ")[-1] in terms, column


def test_summary_json_has_no_absolute_path(tmp_path):
    cfg = _run(tmp_path)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "summary.json").write_text(json.dumps(
        {"samples": {"test": 100}, "log": str(cfg.run_dir / "logs" / "evaluate.log"),
         "pointer": str(cfg.artifacts_dir / "serving" / "current.json"), "note": "a / in text"}))
    report.write_report(cfg, tsne=False)
    summary = json.loads((cfg.run_dir / "summary.json").read_text())

    def strings(v):
        if isinstance(v, dict):
            return [s for x in v.values() for s in strings(x)]
        if isinstance(v, list):
            return [s for x in v for s in strings(x)]
        return [v] if isinstance(v, str) else []

    assert not [s for s in strings(summary) if Path(s).is_absolute()]
    assert summary["report"]["html"] == "report.html" and summary["log"] == "logs/evaluate.log"
    assert summary["pointer"] == "../serving/current.json" and summary["samples"] == {"test": 100}
    assert (cfg.run_dir / summary["report"]["html"]).exists()


def _gate_text(tmp_path, gate: dict) -> str:
    section = _section(report.write_report(_run(tmp_path, gate), tsne=False).read_text(), "Publish gate")
    return re.search(r"<p>(.*?)</p>", section).group(1)


def test_gate_of_one_version_is_not_worded_as_a_comparison(tmp_path):
    same = _gate_text(tmp_path / "same", SAME_VERSION)
    assert "Same version: nothing to compare" in same
    assert not re.search(r"v2 (against|vs\.?|versus) .*v2", same) and "serving before, v2" not in same
    first = _gate_text(tmp_path / "first", SAME_VERSION | {"decision": "publish", "previous": None})
    assert "First publication" in first and "without a comparison" in first
    other = _gate_text(tmp_path / "other", SAME_VERSION | {
        "candidate": "v3", "serving": "v2", "previous": {"model_version": "v2",
                                                         "metrics": {f"hr@{K}": 0.12, f"ndcg@{K}": 0.06}}})
    assert "candidate v3 against the version serving before, v2" in other and "must rise by more than 0" in other
    section = _section(report.write_report(_run(tmp_path / "other2", SAME_VERSION | {
        "candidate": "v3", "serving": "v2", "previous": {"model_version": "v2",
                                                         "metrics": {f"hr@{K}": 0.12, f"ndcg@{K}": 0.06}}}),
        tsne=False).read_text(), "Publish gate")
    assert f"<td>ndcg@{K}</td><td>0.0500</td><td>0.0600</td><td>-0.0100</td>" in section   # both versions' figures


def _delta_category_vocab(lake: Path, rows: list[tuple[str, str, int]]) -> None:
    """A one-commit Delta table of silver.category_vocab as Spark writes it (a Parquet file and a log line)."""
    root = Path(CATEGORY_VOCAB.path(lake))
    (root / "_delta_log").mkdir(parents=True)
    pq.write_table(pa.table({"feature": [r[0] for r in rows], "value": [r[1] for r in rows],
                             "idx": pa.array([r[2] for r in rows], pa.int32())}), root / "part-0.parquet")
    pq.write_table(pa.table({"feature": ["genre"], "value": ["stale"], "idx": pa.array([1], pa.int32())}),
                   root / "part-removed.parquet")
    (root / "_delta_log" / "00000000000000000000.json").write_text("\n".join(json.dumps(a) for a in (
        {"add": {"path": "part-removed.parquet"}}, {"remove": {"path": "part-removed.parquet"}},
        {"add": {"path": "part-0.parquet"}})))


def test_tsne_legend_names_the_genres(tmp_path, monkeypatch):
    cfg = _run(tmp_path)
    _delta_category_vocab(cfg.lake_dir, [("genre", "Action", 1), ("genre", "Comedy", 2), ("gender", "F", 1)])
    assert report.category_names(cfg, "genre") == {0: "(none)", 1: "Action", 2: "Comedy"}
    legends = []

    def legend_of(fig):
        legends.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        return "png"

    monkeypatch.setattr(report, "_png", legend_of)
    rng = np.random.default_rng(0)
    report.plot_tsne(rng.normal(size=(30, 4)), np.array([1, 2, 0] * 10), report.category_names(cfg, "genre"))
    assert legends == [["(none)", "Action", "Comedy"]]


def test_evaluate_records_the_pointer_before_the_gate(tmp_path):
    cfg = PlatformConfig(artifacts_dir=tmp_path / "artifacts", data_dir=tmp_path / "data")
    retrieval = {cfg.models.retrieval: _figures(0.1) | {"model_version": "v1"}}
    first = evaluate.gate_decision(cfg, retrieval, K)
    assert first["decision"] == "publish" and first["previous"] is None
    again = evaluate.gate_decision(cfg, retrieval, K)
    assert again["decision"] == "reject" and again["previous"]["model_version"] == again["candidate"] == "v1"
    assert again["previous"]["metrics"] == again["candidate_metrics"] == {
        m: v for m, v in _figures(0.1).items() if m.startswith(("hr@", "ndcg@", "mrr@"))}


def test_simulated_truth_belongs_to_the_replayed_log():
    bandit = estimators.bandit_evaluation(None, 3000, seed=1)
    truth = bandit["truth"]  # computed on the very log and policies the replay used
    assert set(truth["policies"]) == set(bandit["policies"])
    assert all(0.0 < v < 1.0 for v in truth["policies"].values())
    # the observed logging CTR is one draw of 3000 clicks around the true one
    assert truth["uniform_ctr"] == pytest.approx(bandit["uniform_ctr"], abs=4 * np.sqrt(0.25 / 3000))
    assert truth["arm_ctr"]["min"] < truth["uniform_ctr"] < truth["arm_ctr"]["max"] < 1.0
    assert estimators.bandit_evaluation(None, 3000, seed=2)["truth"]["uniform_ctr"] != truth["uniform_ctr"]
