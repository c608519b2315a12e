"""``python -m evaluation.report [--run demo]``: one self-contained HTML page of a run's evaluation,
``<run_dir>/report.html``, its plots drawn with matplotlib and embedded as base64 PNG (no files beside it).

Sections, in this order:

0. Method: the label (``features.definitions.POSITIVE_RATING``), the split (``SPLIT_FRACTIONS``), what a case is
   and what is excluded as seen (evaluation.cases), the protocols (static replay, prequential replay), each with
   the run's own counts; then every model folder of the run (``<run_dir>/models/*``, kind from its ``meta.json``)
   and the sections it appears in.

MovieLens results:

1. ROC curves of every ranker trained in the run on the test split (Fawcett 2006; ``roc_points`` of
   evaluation.metrics), one curve each. The trainer does not save its test predictions, so they are computed here:
   each model folder loaded by ``training.artifacts.load_model`` and scored on ``export/ctr_samples/split=test``.
2. Static replay: HR@K over K per retrieval policy (``hr_curve`` of the evaluate stage), and the rankers on the
   served retriever's candidates (``ranking``: HR/NDCG/MRR@K beside their test AUC, GAUC and logloss).
3. Prequential replay per time window: HR@K, NDCG@K, coverage, novelty (``prequential``).
4. Team-draft interleaving against the replay HR@K difference (``interleaving``).
5. The publish gate's decision with the candidate's and the previously serving version's figures (``gate``).
6. A 2-D t-SNE map (van der Maaten & Hinton 2008) of each trained model's item embeddings, each item coloured by
   its first genre (``genre_idx`` of the samples), named from ``silver.category_vocab``.

Simulated (or logged) bandit feedback, apart from MovieLens:

7. Replay-estimator CTR per explore/exploit policy with its Wilson 95 % interval (``bandit``; Li et al. 2011),
   beside the true values the simulator knows (``bandit.truth``).

Every table has a glossary of its columns under it. Reads the evaluate stage's result
(``<run_dir>/stages/evaluate.json``); sections whose inputs are missing say so instead of failing. Writes the
report's entry of ``<run_dir>/summary.json`` (``summary_with_report``), every path in that file relative to the
run folder.

Legend: N test samples, R item rows, D embedding dim.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import os
import time
from pathlib import Path
from urllib.parse import unquote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.metrics import auc, roc_points  # noqa: E402
from features.config import PlatformConfig, load_config  # noqa: E402
from features.definitions import POSITIVE_RATING, SPLIT_FRACTIONS, UNKNOWN_INDEX  # noqa: E402
from features.results import read_stage_result, write_stage_result  # noqa: E402
from features.tables import CATEGORY_VOCAB  # noqa: E402
from training.artifacts import MODELS_DIR, ModelLayout, model_dir  # noqa: E402

log = logging.getLogger("evaluation.report")
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"


def ranker_test_predictions(cfg: PlatformConfig, model: str, batch_size: int = 4096
                            ) -> tuple[np.ndarray, np.ndarray]:
    """(N,) labels and (N,) logits of the run's ranker ``model`` on the test split, read with the features its
    config reads.

    Raises:
        ModelOutputError: the run has no such model folder, or its weights do not fit its config.
        TableNotFoundError: the test split has not been exported.
    """
    import torch

    from features.definitions import dense_features_named
    from training.artifacts import load_model, model_dir
    from training.data import ctr_batches, num_batches, read_ctr_shard

    loaded = load_model(model_dir(cfg.run_dir, model))
    features = loaded.spec.features_of(loaded.config)
    dense = dense_features_named(getattr(loaded.config, "dense_features", ()))
    shard = read_ctr_shard(cfg.lake_dir, "test", features=features, dense_features=dense)
    scores = []
    with torch.no_grad():
        for b in ctr_batches(shard, batch_size, num_batches(len(shard), 1, batch_size), features=features):
            scores.append(loaded.module(b.features, b.dense)[b.weight > 0].numpy())
    return shard.label.astype(np.int64), np.concatenate(scores)


def item_first_genre(cfg: PlatformConfig) -> dict[int, int]:
    """item_idx -> its first genre_idx, from the ctr_samples export (every split)."""
    import pyarrow.dataset as ds

    from features.tables import CTR_SAMPLES, parquet_export

    t = ds.dataset(parquet_export(CTR_SAMPLES, cfg.lake_dir), format="parquet").to_table(
        columns=["item_idx", "genre_idx"])
    out: dict[int, int] = {}
    for item, genres in zip(t.column("item_idx").to_pylist(), t.column("genre_idx").to_pylist()):
        if item not in out:
            out[item] = genres[0] if genres else 0
    return out


def category_names(cfg: PlatformConfig, feature: str) -> dict[int, str]:
    """idx -> value of one feature of ``silver.category_vocab`` (e.g. ``genre``), ``UNKNOWN_INDEX`` -> "(none)".

    Read without Spark: the Parquet files that the Delta table's commit log (``_delta_log/*.json``) adds and does
    not remove. Empty when the table is missing or unreadable (the caller then shows indices and says so).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = Path(CATEGORY_VOCAB.path(cfg.lake_dir))
    live: dict[str, None] = {}
    try:
        for commit in sorted((root / "_delta_log").glob("*.json")):
            for line in commit.read_text().splitlines():
                action = json.loads(line) if line.strip() else {}
                if "add" in action:
                    live[action["add"]["path"]] = None
                elif "remove" in action:
                    live.pop(action["remove"]["path"], None)
        if not live:
            return {}
        t = pa.concat_tables([pq.read_table(root / unquote(p), columns=["feature", "value", "idx"]) for p in live])
    except (OSError, ValueError, pa.ArrowException) as e:
        log.warning("%s unreadable (%s): category names not shown", root, e)
        return {}
    t = t.filter(pc.equal(t.column("feature"), feature))
    return {UNKNOWN_INDEX: "(none)", **dict(zip(t.column("idx").to_pylist(), t.column("value").to_pylist()))}


def run_models(cfg: PlatformConfig) -> dict[str, dict]:
    """Every model folder of the run, ``<run_dir>/models/<name>`` holding any file of ``ModelLayout``: name -> its
    ``meta.json`` (model, kind, task, model_version, ...; ``{"model": name}`` when it has none or it is unusable),
    in name order. What the run trained, whatever the registry holds now."""
    from training.artifacts import ModelOutputError, read_meta

    root = Path(cfg.run_dir) / MODELS_DIR
    out = {}
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        layout = ModelLayout(folder)
        if not any(f.exists() for f in (layout.meta, layout.state, layout.item_embeddings)):
            continue
        out[folder.name] = {"model": folder.name}
        if layout.meta.exists():
            try:
                out[folder.name] = read_meta(folder)
            except (ModelOutputError, ValueError) as e:   # ValueError: meta.json is not JSON
                log.warning("model folder %s has no usable meta.json: %s", folder, e)
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """ROC curves (``evaluation.metrics.roc_points``), one per ``{model: (labels (N,), scores (N,))}``, AUC in the
    legend."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for model, (labels, scores) in curves.items():
        fpr, tpr = roc_points(labels, scores)
        ax.plot(fpr, tpr, lw=1.5, label=f"{model}, AUC {auc(labels, scores):.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="random")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test split")
    ax.legend(loc="lower right")
    return _png(fig)


def plot_hr_curve(hr_curve: dict) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in sorted(hr_curve.items()):
        ks = sorted(int(k) for k in curve)
        ax.plot(ks, [curve[str(k)] for k in ks], marker="o", label=name)
    ax.set(xscale="log", xlabel="K (list length)", ylabel="HR@K", title="Static replay HR@K over K, test cases")
    ax.legend()
    return _png(fig)


def plot_prequential(pre: dict) -> str:
    k = pre["k"]
    metrics = [(f"hr@{k}", f"HR@{k}"), (f"ndcg@{k}", f"NDCG@{k}"), ("coverage", "catalogue coverage"),
               ("novelty_bits", "novelty (bits)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    w = [x["window"] for x in pre["windows"]]
    for ax, (m, title) in zip(axes, metrics):
        for model in pre["overall"]:
            ax.plot(w, [x["models"][model][m] for x in pre["windows"]], marker="o", label=model)
        ax.set(xlabel="window", title=title)
    axes[0].legend()
    return _png(fig)


def plot_bandit(bandit: dict) -> str:
    """Estimated CTR per policy with its Wilson interval; the simulator's true value of each policy (``truth``) as
    a marker beside its bar, and the uniform logging policy's and the oracle's CTR as lines."""
    names = list(bandit["policies"])
    est = [bandit["policies"][n] for n in names]
    ctr = np.array([e["ctr"] for e in est])
    err = np.array([[e["ctr"] - e["low"] for e in est], [e["high"] - e["ctr"] for e in est]])
    truth = bandit.get("truth") or {}
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.barh(names, ctr, xerr=err, capsize=4, color="tab:blue", alpha=0.8, label="replay estimate")
    if truth.get("policies"):
        ax.scatter([truth["policies"].get(n, np.nan) for n in names], names, marker="D", color="tab:red", zorder=3,
                   label="true value (simulator)")
    refs = (("uniform logging policy, true CTR", truth.get("uniform_ctr"), "k:"),
            ("uniform logging policy, observed CTR", None if truth else bandit.get("uniform_ctr"), "k:"),
            ("oracle (best arm per event), true CTR", bandit.get("oracle_ctr"), "g--"))
    for label, value, style in refs:
        if value is not None:
            ax.axvline(value, color=style[0], ls=style[1:], label=label)
    ax.set(xlabel="CTR (estimate with Wilson 95 % interval)", title="Li et al. 2011 replay estimator")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    return _png(fig)


def plot_interleaving(inter: dict) -> str:
    c = inter["comparisons"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([x["hr_diff"] for x in c], [x["preference"] for x in c])
    ax.axhline(0, color="k", lw=0.6)
    ax.axvline(0, color="k", lw=0.6)
    ax.set(xlabel="replay HR@K(a) - HR@K(b)", ylabel="team-draft preference of a",
           title=f"interleaving vs replay: sign agreement {inter['sign_agreement']:.2f}")
    return _png(fig)


def plot_tsne(vectors: np.ndarray, genres: np.ndarray, names: dict[int, str] | None = None, seed: int = 0,
              title: str = "item embeddings, t-SNE") -> str:
    """t-SNE of (R, D) vectors coloured by (R,) genre index, the legend naming each genre by ``names`` (idx ->
    name; an index without a name shows as ``genre <idx>``)."""
    from sklearn.manifold import TSNE

    xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(vectors) - 1) / 3), random_state=seed
              ).fit_transform(vectors)                                          # (R, 2)
    names = names or {}
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(7, 6))
    for j, g in enumerate(np.unique(genres)):
        at = genres == g
        ax.scatter(xy[at, 0], xy[at, 1], s=6, color=cmap(j % 20), label=names.get(int(g), f"genre {int(g)}"))
    ax.legend(title="first genre", fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), markerscale=2)
    ax.set(title=title, xticks=[], yticks=[])
    return _png(fig)


def _table(rows: list[list], header: list[str]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _glossary(terms: dict[str, str]) -> str:
    """The definitions of a table's columns, under the table: ``{column: definition (HTML)}``."""
    items = "".join(f"<dt>{html.escape(t)}</dt><dd>{d}</dd>" for t, d in terms.items())
    return f"<dl class='glossary'>{items}</dl>"


def _p(text: str) -> str:
    return f"<p>{text}</p>"


#: A section of the page: heading, image (base64 PNG or ``None``), HTML fragment, and optionally its heading level
#: (2 by default; 3 for a section inside a part).
Section = tuple


def render(title: str, sections: list[Section]) -> str:
    """The page: per section a heading, its image (base64 PNG, or ``None``) and an HTML fragment."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right} img{max-width:100%}"
             "dl.glossary{font-size:90%;color:#333} dl.glossary dt{font-weight:bold;float:left;clear:left;"
             "margin-right:0.5em} dl.glossary dt:after{content:':'} dl.glossary dd{margin:0 0 0.2em 0}</style>"
             f"</head><body><h1>{html.escape(title)}</h1>"]
    for heading, png, fragment, *level in sections:
        h = level[0] if level else 2
        parts.append(f"<h{h}>{html.escape(heading)}</h{h}>")
        if png:
            parts.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{png}'>")
        parts.append(fragment)
    parts.append("</body></html>")
    return "\n".join(parts)


def _metric_terms(k: int) -> dict[str, str]:
    return {f"HR@{k}": f"hit rate: the share of cases whose item is among the list's first {k} items.",
            f"NDCG@{k}": f"normalised discounted cumulative gain with the case's one item relevant: the mean over "
                         f"cases of 1 / log2(rank + 2), rank counted from 0 within the first {k}, and 0 for a miss "
                         f"(1 = always first).",
            f"MRR@{k}": f"mean reciprocal rank: the mean of 1 / (rank + 1) within the first {k}, 0 for a miss."}


def method_section(cfg: PlatformConfig, ev: dict) -> Section:
    """How every MovieLens figure below was obtained, with this run's counts (the features stage's samples and
    positives per split, the evaluate stage's cases, K, query length and windows)."""
    try:
        feats = read_stage_result(cfg, "features")
    except Exception:  # noqa: BLE001 -- the method still holds without the counts
        feats = {}
    samples, positives = feats.get("samples", {}), feats.get("positives", {})
    split_text = ", ".join(
        f"the {'first' if i == 0 else 'next' if i < len(SPLIT_FRACTIONS) - 1 else 'last'} {frac:.0%} "
        f"<b>{name}</b>" + (f" ({samples[name]:,} events, {positives.get(name, 0):,} positive)" if name in samples
                            else "")
        for i, (name, frac) in enumerate(SPLIT_FRACTIONS))
    k, n_recent = ev["k"], ev.get("n_recent")
    items = [
        f"<b>Label.</b> Every event of the data source <b>{html.escape(feats.get('source', 'movielens-100k'))}</b> "
        f"is one sample; its label is 1 (positive) when "
        f"{html.escape(feats.get('label_rule', f'rating >= {POSITIVE_RATING:g}'))} and 0 otherwise (the source's "
        f"label rule, <code>features/sources/</code>, applied by <code>pipelines/features_batch.py</code>).",
        f"<b>Split.</b> All events ordered by (event_time, event_id), cut by count: {split_text} "
        f"(<code>SPLIT_FRACTIONS</code>). A global time split: every test event is later than every train event. "
        f"Models learn from the train split; the valid split only picks the epoch (early stopping of the CTR task "
        f"on valid AUC); the test split is never trained on.",
        f"<b>Case.</b> Every positive (label 1) event of the test split is one case, taken in (event_time, "
        f"event_id) order: {ev['cases']:,} cases, {ev.get('cold_start_cases', 0):,} of them with no history "
        f"before the event. The case's item is the target; a list <i>hits</i> when the target is among its first "
        f"{k} items.",
        "<b>Excluded as seen.</b> A case is never recommended item 0 (padding) nor any item its user interacted "
        "with before the event: every logged event of the user (any split, any rating, positive or not) that comes "
        "strictly before the case in (event_time, event_id) order (<code>evaluation.cases.seen_before</code>). "
        "Later events are never excluded.",
        "<b>What a policy knows at a case.</b> Only what was logged before the event: the query is the user's "
        f"history strictly before it (its last {n_recent or 'few'} items, <code>hist_item_idx</code>, or the "
        "model's own query encoder); popularity counts the events strictly before the case.",
        f"<b>Static replay of the test split</b> (Li et al. 2011's replay, applied to top-{k} retrieval; "
        "<code>evaluation.replay</code>). The models trained once on the train split are replayed over the test "
        "period without retraining. Every retrieval policy ranks the whole catalogue for every case; every ranker "
        "reorders the served retriever's candidates of the same cases (<code>evaluation.ranking</code>).",
    ]
    if "prequential" in ev:
        pre = ev["prequential"]
        first = pre["windows"][0]["train_events"] if pre["windows"] else 0
        n_cases = sum(x["cases"] for x in pre["windows"])
        n_windows = pre.get("n_windows", len(pre["windows"]))
        items.append(
            f"<b>Prequential replay</b> (test-then-train, Gama et al. 2013; <code>evaluation.prequential</code>). "
            f"The whole log (every split) in time order is cut into {n_windows + 1} windows of equal event "
            f"count; the first ({first:,} events) only trains. Before each later window its models "
            f"({', '.join(pre['overall'])}) are retrained on every event before the window's first, then every "
            f"positive event of the window is a case ({n_cases:,} in all) under the same seen-item rule. These "
            f"are lightweight stand-ins retrained per window, not the trained models of this run.")
    if "bandit" in ev:
        items.append("<b>Bandit feedback</b> is not MovieLens data: its results are in their own section at the end "
                     "(<i>Simulated bandit log</i>), with the simulator's true values beside the estimates.")
    return ("Method", None, "<ul>" + "".join(f"<li>{x}</li>" for x in items) + "</ul>")


def models_section(models: dict[str, dict], appears: dict[str, list[str]], train: dict[str, dict]) -> Section:
    """Every model folder of the run, its kind, version and test figures, and the sections it appears in."""
    rows = [[name, m.get("kind", "?"), m.get("task", "?"), m.get("model_version", "?"),
             *[train.get(name, {}).get(x, "") for x in ("test_auc", "test_gauc")],
             ", ".join(appears.get(name, [])) or "none (see the sections' notes)"]
            for name, m in models.items()]
    if not rows:
        return ("Models of this run", None, _p("no model folder in this run (<code>models/*</code>)."))
    return ("Models of this run", None,
            _p(f"{len(rows)} model folders found in this run (every <code>models/&lt;name&gt;</code>).")
            + _table(rows, ["model", "kind", "task", "version", "test AUC", "test GAUC", "appears in"])
            + _glossary({"kind": "ranker (scores a user-item pair) or retriever (item vectors searched for a query), "
                                 "as the model's registry entry declares it.",
                         "task": "the training task: ctr (binary cross-entropy on the labels) or skip-gram "
                                 "(item2vec's sentences).",
                         "version": "model_version, the folder's identity in the registry and the serving pointer.",
                         "test AUC": "ROC AUC over every test sample (label 1 by the data source's label rule, stated "
                                     "under Method); empty for a task without labels.",
                         "test GAUC": "per-user AUC weighted by the user's test samples, over users with both "
                                      "labels.",
                         "appears in": "the sections below that show this model."}))


def gate_section(cfg: PlatformConfig, ev: dict) -> Section:
    """The publish gate's decision with both versions' figures, worded by the case: a first publication, the same
    version (nothing to compare), or a candidate against a different serving version."""
    g = ev["gate"]
    cand = g["candidate"]
    cand_metrics = g.get("candidate_metrics") or {
        m: v for m, v in ev["retrieval"].get(cfg.models.retrieval, {}).items() if m.startswith(("hr@", "ndcg@",
                                                                                                 "mrr@"))}
    rule = g.get("rule")
    rule_text = (f"The rule: {html.escape(rule['metric'])} must rise by more than {rule['min_gain']:g} and "
                 f"{', '.join(map(html.escape, rule['guard'])) or 'no guard metric'} must not fall by more than "
                 f"{rule['max_drop']:g}." if rule else "")
    model = html.escape(cfg.models.retrieval)
    terms = {"candidate": "the figures of the version this run exported, on the static replay's test cases.",
             "serving before": "the figures recorded in the serving pointer for the version serving before the "
                               "decision.",
             "difference": "candidate minus serving before."}
    if "previous" not in g:   # a result of an evaluate stage that did not record the pointer before its decision
        text = (f"<b>{html.escape(g['decision'].upper())}</b> of {model} version {html.escape(str(cand))}; serving "
                f"now: {html.escape(str(g['serving']))}. This evaluate result does not record which version served "
                f"before the decision (a first publication or a replacement cannot be told apart); re-run the "
                f"evaluate stage to record it. The candidate's figures:")
        rows = [[m, v] for m, v in cand_metrics.items()]
        return ("Publish gate", None, _p(text) + _table(rows, ["metric", "candidate"])
                + _glossary({"candidate": terms["candidate"]}))
    prev = g["previous"]
    if prev is None:
        text = (f"<b>First publication.</b> No version of {model} was serving, so the gate published version "
                f"{html.escape(str(cand))} without a comparison. Serving now: {html.escape(str(g['serving']))}.")
        rows = [[m, v, "none", ""] for m, v in cand_metrics.items()]
    elif prev["model_version"] == cand:
        text = (f"<b>Same version: nothing to compare.</b> The candidate {html.escape(str(cand))} is the version "
                f"already serving; the gate ({html.escape(g['decision'])}) leaves the pointer on it.")
        rows = [[m, v, prev["metrics"].get(m, ""), ""] for m, v in cand_metrics.items()]
    else:
        text = (f"<b>{html.escape(g['decision'].upper())}</b>: candidate {html.escape(str(cand))} against the "
                f"version serving before, {html.escape(str(prev['model_version']))}. {rule_text} Serving now: "
                f"{html.escape(str(g['serving']))}.")
        rows = [[m, v, prev["metrics"].get(m, ""),
                 v - prev["metrics"][m] if isinstance(prev["metrics"].get(m), (int, float)) else ""]
                for m, v in cand_metrics.items()]
    return ("Publish gate", None, _p(text) + _table(rows, ["metric", "candidate", "serving before", "difference"])
            + _glossary(terms))


def bandit_section(ev: dict) -> Section:
    """The replay estimates of the explore/exploit policies, with the simulator's true values beside them."""
    b = ev["bandit"]
    truth = b.get("truth") or {}
    true_of = truth.get("policies", {})
    simulated = bool(truth) or str(b["source"]).startswith("simulated")
    events = b.get("events", max((e["events"] for e in b["policies"].values()), default=0))
    rows = [[n, e["ctr"], e["low"], e["high"], true_of.get(n, ""),
             e["ctr"] - true_of[n] if n in true_of else "", e["kept"], e["events"]] for n, e in b["policies"].items()]
    if "uniform_ctr" in b:
        rows.append(["uniform logging policy (every event)", b["uniform_ctr"], "", "", truth.get("uniform_ctr", ""),
                     b["uniform_ctr"] - truth["uniform_ctr"] if "uniform_ctr" in truth else "", events, events])
    if "oracle_ctr" in b:
        rows.append(["oracle: best arm of every event", "", "", "", b["oracle_ctr"], "", "", events])
    if truth:
        a = truth["arm_ctr"]
        note = (f"True values: {html.escape(truth['method'])}. The arms' true CTRs (each averaged over the simulated "
                f"users) run from {a['min']:.4f} to {a['max']:.4f}, mean {a['mean']:.4f}.")
    elif simulated:
        note = ("The true values are not in this evaluate result (it predates them): re-run the evaluate stage to "
                "record them.")
    else:
        note = "A logged table: its true click rates are unknown, so only the estimates are shown."
    shape = f" of {b['candidates']} candidates each" if "candidates" in b else ""
    kept = f", about {b['expected_kept']:,.0f} per policy" if "expected_kept" in b else ""
    text = (_p(f"Not MovieLens: {events:,} uniformly random exposures{shape}, source: "
               f"{html.escape(str(b['source']))}. Each policy is replayed over them (Li et al. 2011, Algorithm 3): "
               f"an event is kept when the policy picks the logged arm{kept}.") + _p(note))
    return ("Simulated bandit log: replay estimates against true values" if simulated
            else "Logged bandit feedback: replay estimates", plot_bandit(b),
            text + _table(rows, ["policy", "estimated CTR", "95% low", "95% high", "true CTR", "estimate - true",
                                 "kept", "events"])
            + _glossary({"policy": "an explore/exploit policy (evaluation.policies), the uniformly random "
                                   "logging policy, or the oracle that always picks the arm with the highest true "
                                   "click probability.",
                         "estimated CTR": "the replay estimate: clicks / kept events (for the logging policy: the "
                                          "log's observed click rate).",
                         "95% low, 95% high": "Wilson score interval of that proportion (approximate for a policy "
                                              "that learns).",
                         "true CTR": "the simulator's expected click rate (its click probabilities, not drawn "
                                     "clicks): for a policy, of the arms it picks run online for as many events as "
                                     "it kept; for the logging policy, of the logged arms; for the oracle, of the "
                                     "best arm of every event.",
                         "estimate - true": "estimated CTR minus true CTR.",
                         "kept": "events where the policy's pick equals the logged arm (only these count).",
                         "events": "events of the log."}))


def build_sections(cfg: PlatformConfig, tsne: bool = True) -> list[Section]:
    """Every section of the report for the run ``cfg.run_dir``."""
    ev = read_stage_result(cfg, "evaluate")
    k = ev["k"]
    models = run_models(cfg)
    train = {}
    for name in models:
        try:
            train[name] = read_stage_result(cfg, f"train_{name}")
        except Exception:  # noqa: BLE001 -- the folder's meta still names the model
            train[name] = models[name].get("metrics", {})
    appears: dict[str, list[str]] = {name: [] for name in models}
    body = []
    curves, missing = {}, []  # every ranker trained in this run (every folder whose meta says kind ranker)
    rankers = [m for m, meta in models.items() if meta.get("kind") == "ranker" and ModelLayout(
        model_dir(cfg.run_dir, m)).state.exists()]
    if not rankers:
        missing.append("no ranker was trained in this run")
    for model in rankers:
        try:
            curves[model] = ranker_test_predictions(cfg, model)
            appears[model].append("ROC")
        except Exception as e:  # a missing model must not hide the rest of the report
            log.warning("ROC of %s skipped: %s", model, e)
            missing.append(f"{model}: {e}")
    note = "".join(f"<p>not available: {html.escape(m)}</p>" for m in missing)
    n = next(iter(curves.values()))[0].size if curves else 0
    body.append(("ROC curves of the rankers (test split)", plot_roc(curves) if curves else None,
                 (f"<p>{n:,} test samples, every rating of the test split (not only the cases).</p>" + _glossary(
                     {"AUC (legend)": "area under the ROC curve: the probability that a random positive test "
                                      "sample scores above a random negative one."}) if curves else "") + note, 3))
    for name in ev["retrieval"]:
        if name in appears:
            appears[name].append("static replay")
    rows = [[n, r[f"hr@{k}"], r[f"ndcg@{k}"], r[f"mrr@{k}"], r["cases"], r.get("fallback_cases", "")]
            for n, r in ev["retrieval"].items()]
    not_replayed = [m for m, meta in models.items() if m not in ev["retrieval"] and meta.get("kind") == "retriever"]
    body.append((f"Static replay of the test split: retrieval, HR@K over K",
                 plot_hr_curve(ev["hr_curve"]) if "hr_curve" in ev else None,
                 _p(f"{ev['cases']:,} cases, the same for every policy; lists of {k} items.")
                 + (_p(f"not replayed (no export): {html.escape(', '.join(not_replayed))}") if not_replayed else "")
                 + _table(rows, ["policy", f"HR@{k}", f"NDCG@{k}", f"MRR@{k}", "cases", "fallback cases"])
                 + _glossary({"policy": "popularity (items by their number of logged events strictly before the "
                                        "case) or a model's item vectors searched for the case's query (a ranker "
                                        "with an item table is searched the same way).",
                              **_metric_terms(k),
                              "cases": "positive test events scored.",
                              "fallback cases": "cases with no usable query (e.g. no history) that took "
                                                "popularity's list.",
                              "HR@K over K (plot)": "HR@K of each policy's list at every K on the x axis."}), 3))
    if "ranking" in ev:
        r = ev["ranking"]
        c = r["candidates"]
        for name in r["rankers"]:
            if name in appears:
                appears[name].append("rankers on candidates")
        metrics = [f"{m}@{k}" for m in ("hr", "ndcg", "mrr")]
        rows = [[f"{r['retriever']} (its own order)", *[r["retriever_order"][m] for m in metrics], "", "", ""]]
        rows += [[name, *[x[m] for m in metrics], *[x.get(m, "") for m in ("test_auc", "test_gauc", "test_logloss")]]
                 for name, x in r["rankers"].items()]
        unranked = [m for m in rankers if m not in r["rankers"]]
        body.append((f"Static replay of the test split: rankers on the served retriever's candidates "
                     f"({r['retriever']}, first {c})", None,
                     f"<p>Every case (positive test event): the retriever's first {c} items (what the user saw before "
                     f"excluded), reordered by each ranker with the event's point-in-time features. "
                     f"recall@{c} (the event's item among the candidates): {r[f'recall@{c}']:.4f}; it bounds "
                     f"every ranker's HR. AUC, GAUC and logloss: the ranker's own test split.</p>"
                     + (_p(f"trained but not in this table: {html.escape(', '.join(unranked))}") if unranked else "")
                     + _table(rows, ["list", f"HR@{k}", f"NDCG@{k}", f"MRR@{k}", "test AUC", "test GAUC",
                                     "test logloss"])
                     + _glossary({"list": f"the retriever's first {k} candidates in its own order, or the "
                                          f"candidates reordered by a ranker.",
                                  **_metric_terms(k),
                                  "test AUC": "ROC AUC of the ranker over every test sample.",
                                  "test GAUC": "per-user AUC weighted by the user's test samples, over users with "
                                               "both labels (Zhou et al. 2018).",
                                  "test logloss": "mean binary cross-entropy (nats) of the ranker on the test "
                                                  "samples."}), 3))
    if "prequential" in ev:
        pre = ev["prequential"]
        rows = [[x["window"], x["cases"], x["train_events"], *[x["models"][m][f"hr@{k}"] for m in pre["overall"]]]
                for x in pre["windows"]]
        rows += [["overall", pre["overall"][next(iter(pre["overall"]))]["cases"], "",
                  *[pre["overall"][m][f"hr@{k}"] for m in pre["overall"]]]]
        body.append(("Prequential replay per time window (retrained before each window)", plot_prequential(pre),
                     _table(rows, ["window", "cases", "training events", *[f"{m} HR@{k}" for m in pre["overall"]]])
                     + _glossary({"window": "a slice of the time-ordered log holding an equal share of the events; "
                                            "window 0 only trains.",
                                  "cases": "positive events of the window.",
                                  "training events": "events before the window's first, all of them used to "
                                                     "retrain.",
                                  f"HR@{k}": _metric_terms(k)[f"HR@{k}"] + " One column per model.",
                                  f"NDCG@{k} (plot)": _metric_terms(k)[f"NDCG@{k}"],
                                  "catalogue coverage (plot)": "distinct recommended items of the window over the "
                                                               "catalogue's items (item 0 excluded).",
                                  "novelty (plot)": "mean self-information -log2 p(i), in bits, of the recommended "
                                                    "items, p(i) the item's add-one smoothed share of the training "
                                                    "events (Zhou et al. 2010): higher = less popular items."}), 3))
    if "interleaving" in ev:
        inter = ev["interleaving"]
        rows = [[c["on"], c["a"], c["b"], c["wins_a"], c["wins_b"], c["ties"], c["preference"], c["hr_diff"]]
                for c in inter["comparisons"]]
        body.append(("Team-draft interleaving (Radlinski et al. 2008)", plot_interleaving(inter),
                     _p(f"Sign agreement with the replay: {inter['sign_agreement']:.4f} over "
                        f"{len(inter['comparisons'])} comparisons.")
                     + _table(rows, ["on", "a", "b", "wins a", "wins b", "ties", "preference", "HR diff"])
                     + _glossary({"on": "the cases compared: the static replay's test cases, or a prequential "
                                        "window's.",
                                  "a, b": "the two policies interleaved.",
                                  "wins a, wins b": f"cases whose item was in the merged top-{k} list and came from "
                                                    f"a's (b's) picks.",
                                  "ties": "cases whose item was not in the merged list.",
                                  "preference": "(wins a - wins b) / cases, in [-1, 1]: above 0, interleaving "
                                                "prefers a.",
                                  "HR diff": f"HR@{k}(a) - HR@{k}(b) of the replay on the same cases.",
                                  "sign agreement": "the share of comparisons where preference and HR diff have "
                                                    "the same sign."}), 3))
    if "gate" in ev:
        body.append((*gate_section(cfg, ev), 3))
    embedded = [m for m in models if ModelLayout(model_dir(cfg.run_dir, m)).item_embeddings.exists()]
    if tsne and embedded:
        genre = item_first_genre(cfg)
        names = category_names(cfg, "genre")
        for model in embedded:
            vectors = np.load(ModelLayout(model_dir(cfg.run_dir, model)).item_embeddings)
            items = np.array(sorted(i for i in genre if 0 < i < len(vectors)))
            if items.size < 5:
                continue
            kind = models[model].get("kind", "model")
            body.append((f"{model} ({kind}) item embeddings, t-SNE map by genre",
                         plot_tsne(vectors[items], np.array([genre[i] for i in items]), names,
                                   title=f"{model} item embeddings, t-SNE"),
                         _p(f"{items.size:,} items, each coloured by its first genre"
                            + ("" if names else " (genre names unavailable: silver.category_vocab unreadable; "
                                                "indices shown)") + "."), 3))
            appears[model].append("t-SNE")
    sections: list[Section] = [method_section(cfg, ev), models_section(models, appears, train),
                               ("MovieLens-100K results", None,
                                _p("Every figure of this part comes from the protocols of the Method section on the "
                                   "MovieLens events."))]
    sections += body
    if "bandit" in ev:
        sections.append(bandit_section(ev))
    return sections


def relative_paths(value, run_dir: Path):
    """``value`` (JSON-like) with every absolute path string rewritten relative to ``run_dir`` (``../`` for one
    outside it).

    >>> relative_paths({"a": "/r/run/report.html", "b": ["/r/serving/x.json", "text"]}, Path("/r/run"))
    {'a': 'report.html', 'b': ['../serving/x.json', 'text']}
    """
    if isinstance(value, dict):
        return {k: relative_paths(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_paths(v, run_dir) for v in value]
    if isinstance(value, str) and value.startswith("/") and "\n" not in value:
        return os.path.relpath(value, run_dir)
    return value


def summary_with_report(cfg: PlatformConfig, report: Path) -> Path:
    """Add the report to ``<run_dir>/summary.json`` (created when the demo has not written one), and write every
    path of that file relative to the run folder (``report.html``, ``../serving/current.json``)."""
    path = cfg.run_dir / SUMMARY_FILE
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary["report"] = {"html": str(report)}
    summary = relative_paths(summary, Path(cfg.run_dir).resolve())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    return path


def write_report(cfg: PlatformConfig, tsne: bool = True) -> Path:
    """Write ``<run_dir>/report.html`` and the report's entry of ``<run_dir>/summary.json``; returns the report's
    path.

    Raises:
        PlatformError: the evaluate stage has not written its result.
    """
    path = cfg.run_dir / REPORT_FILE
    path.write_text(render(f"Evaluation report: run {cfg.run_name}", build_sections(cfg, tsne)))
    summary_with_report(cfg, path.resolve())
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="run name (default: the configured run_name)")
    p.add_argument("--no-tsne", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config()
    if args.run:
        cfg = cfg.model_copy(update={"run_name": args.run})
    t0 = time.perf_counter()
    path = write_report(cfg, tsne=not args.no_tsne)
    write_stage_result(cfg, "report", {"report_path": os.path.relpath(path.resolve(), Path(cfg.run_dir).resolve()),
                                       "report_bytes": path.stat().st_size,
                                       "report_wall_s": time.perf_counter() - t0})
    log.info("report written to %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
