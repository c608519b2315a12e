"""``python -m evaluation.report [--run demo]``: one self-contained HTML page of a run's evaluation,
``<run_dir>/report.html``, its plots drawn with matplotlib and embedded as base64 PNG (no files beside it).

Sections:

1. ROC curves of every trained ranker of the registry on the test split (Fawcett 2006; ``roc_points`` of
   evaluation.metrics), one curve each. The trainer does not save its test predictions, so they are computed here:
   each model folder loaded by ``training.artifacts.load_model`` and scored on ``export/ctr_samples/split=test``.
2. HR@K over K per retrieval policy (``hr_curve`` of the evaluate stage), and the rankers on the served
   retriever's candidates (``ranking``: HR/NDCG/MRR@K beside their test AUC, GAUC and logloss).
3. Prequential replay per time window: HR@K, NDCG@K, coverage, novelty (``prequential``).
4. Replay-estimator CTR per explore/exploit policy with its Wilson 95 % interval (``bandit``; Li et al. 2011).
5. Team-draft interleaving against the replay HR@K difference (``interleaving``).
6. A 2-D t-SNE map (van der Maaten & Hinton 2008) of each trained retriever's item embeddings, each item coloured
   by its first genre (``genre_idx`` of the samples).

Reads the evaluate stage's result (``<run_dir>/stages/evaluate.json``); sections whose inputs are missing say so
instead of failing.

Legend: N test samples, R item rows, D embedding dim.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.metrics import auc, roc_points  # noqa: E402
from features.config import PlatformConfig, load_config  # noqa: E402
from features.results import read_stage_result, write_stage_result  # noqa: E402
from training.artifacts import ModelLayout, model_dir  # noqa: E402
from training.registry import list_models  # noqa: E402

log = logging.getLogger("evaluation.report")
REPORT_FILE = "report.html"


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
    ax.set(xscale="log", xlabel="K (list length)", ylabel="HR@K", title="Replay HR@K over K, test cases")
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
    names = list(bandit["policies"])
    est = [bandit["policies"][n] for n in names]
    ctr = np.array([e["ctr"] for e in est])
    err = np.array([[e["ctr"] - e["low"] for e in est], [e["high"] - e["ctr"] for e in est]])
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.barh(names, ctr, xerr=err, capsize=4, color="tab:blue", alpha=0.8)
    for ref, style in (("uniform_ctr", "k:"), ("oracle_ctr", "g--")):
        if ref in bandit:
            ax.axvline(bandit[ref], color=style[0], ls=style[1:], label=ref.replace("_", " "))
    ax.set(xlabel="replay-estimated CTR (Wilson 95 % interval)", title="Li et al. 2011 replay estimator")
    if "oracle_ctr" in bandit:
        ax.legend(loc="lower right")
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


def plot_tsne(vectors: np.ndarray, genres: np.ndarray, seed: int = 0) -> str:
    """t-SNE of (R, D) vectors coloured by (R,) genre index."""
    from sklearn.manifold import TSNE

    xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(vectors) - 1) / 3), random_state=seed
              ).fit_transform(vectors)                                          # (R, 2)
    fig, ax = plt.subplots(figsize=(7, 6))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=genres, cmap="tab20", s=6)
    ax.legend(*sc.legend_elements(num=None), title="genre_idx", fontsize=7, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    ax.set(title="item2vec item embeddings, t-SNE", xticks=[], yticks=[])
    return _png(fig)


def _table(rows: list[list], header: list[str]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(title: str, sections: list[tuple[str, str | None, str]]) -> str:
    """The page: per section a heading, its image (base64 PNG, or ``None``) and an HTML fragment."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right} img{max-width:100%}</style></head>"
             f"<body><h1>{html.escape(title)}</h1>"]
    for heading, png, fragment in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if png:
            parts.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{png}'>")
        parts.append(fragment)
    parts.append("</body></html>")
    return "\n".join(parts)


def build_sections(cfg: PlatformConfig, tsne: bool = True) -> list[tuple[str, str | None, str]]:
    """Every section of the report for the run ``cfg.run_dir``."""
    ev = read_stage_result(cfg, "evaluate")
    k = ev["k"]
    sections = []
    curves, missing = {}, []  # every ranker trained in this run (make demo trains the configuration's models.demo)
    trained = [m for m in list_models("ranker") if ModelLayout(model_dir(cfg.run_dir, m)).state.exists()]
    if not trained:
        missing.append("no ranker was trained in this run")
    for model in trained:
        try:
            curves[model] = ranker_test_predictions(cfg, model)
        except Exception as e:  # a missing model must not hide the rest of the report
            log.warning("ROC of %s skipped: %s", model, e)
            missing.append(f"{model}: {e}")
    note = "".join(f"<p>not available: {html.escape(m)}</p>" for m in missing)
    n = next(iter(curves.values()))[0].size if curves else 0
    sections.append(("ROC curves of the rankers (test split)", plot_roc(curves) if curves else None,
                     (f"<p>{n:,} test samples.</p>" if curves else "") + note))
    rows = [[n, r[f"hr@{k}"], r[f"ndcg@{k}"], r[f"mrr@{k}"], r["cases"]] for n, r in ev["retrieval"].items()]
    sections.append((f"Replay on the test cases: HR@K over K", plot_hr_curve(ev["hr_curve"]) if "hr_curve" in ev
                     else None, _table(rows, ["policy", f"HR@{k}", f"NDCG@{k}", f"MRR@{k}", "cases"])))
    if "ranking" in ev:
        r = ev["ranking"]
        c = r["candidates"]
        metrics = [f"{m}@{k}" for m in ("hr", "ndcg", "mrr")]
        rows = [[f"{r['retriever']} (its own order)", *[r["retriever_order"][m] for m in metrics], "", "", ""]]
        rows += [[name, *[x[m] for m in metrics], *[x.get(m, "") for m in ("test_auc", "test_gauc", "test_logloss")]]
                 for name, x in r["rankers"].items()]
        sections.append((f"Rankers on the served retriever's candidates ({r['retriever']}, first {c})", None,
                         f"<p>Every positive test event: the retriever's first {c} items (what the user saw before "
                         f"excluded), reordered by each ranker with the event's point-in-time features. "
                         f"recall@{c} (the event's item among the candidates): {r[f'recall@{c}']:.4f}; it bounds "
                         f"every ranker's HR. AUC, GAUC and logloss: the ranker's own test split.</p>"
                         + _table(rows, ["list", f"HR@{k}", f"NDCG@{k}", f"MRR@{k}", "test AUC", "test GAUC",
                                         "test logloss"])))
    if "prequential" in ev:
        pre = ev["prequential"]
        rows = [[x["window"], x["cases"], x["train_events"], *[x["models"][m][f"hr@{k}"] for m in pre["overall"]]]
                for x in pre["windows"]]
        rows += [["overall", pre["overall"][next(iter(pre["overall"]))]["cases"], "",
                  *[pre["overall"][m][f"hr@{k}"] for m in pre["overall"]]]]
        sections.append(("Prequential replay per time window (retrained before each window)", plot_prequential(pre),
                         _table(rows, ["window", "cases", "training events",
                                       *[f"{m} HR@{k}" for m in pre["overall"]]])))
    if "bandit" in ev:
        b = ev["bandit"]
        rows = [[n, e["ctr"], e["low"], e["high"], e["kept"], e["events"]] for n, e in b["policies"].items()]
        sections.append(("Replay estimator (Li et al. 2011) on logged random exposures", plot_bandit(b),
                         f"<p>source: {html.escape(b['source'])}</p>"
                         + _table(rows, ["policy", "CTR", "95% low", "95% high", "kept", "events"])))
    if "interleaving" in ev:
        inter = ev["interleaving"]
        rows = [[c["on"], c["a"], c["b"], c["wins_a"], c["wins_b"], c["ties"], c["preference"], c["hr_diff"]]
                for c in inter["comparisons"]]
        sections.append(("Team-draft interleaving (Radlinski et al. 2008)", plot_interleaving(inter),
                         _table(rows, ["on", "a", "b", "wins a", "wins b", "ties", "preference", "HR diff"])))
    if "gate" in ev:
        g = ev["gate"]
        sections.append(("Publish gate", None, f"<p>{html.escape(g['decision'].upper())}: candidate "
                         f"{html.escape(str(g['candidate']))}; serving now {html.escape(str(g['serving']))}</p>"))
    for model in list_models("retriever") if tsne else ():
        emb = ModelLayout(model_dir(cfg.run_dir, model)).item_embeddings
        if not emb.exists():
            continue
        vectors = np.load(emb)
        genre = item_first_genre(cfg)
        items = np.array(sorted(i for i in genre if 0 < i < len(vectors)))
        sections.append((f"{model} item embeddings, t-SNE map by genre",
                         plot_tsne(vectors[items], np.array([genre[i] for i in items])),
                         f"<p>{items.size:,} items.</p>"))
    return sections


def write_report(cfg: PlatformConfig, tsne: bool = True) -> Path:
    """Write ``<run_dir>/report.html``; returns its path.

    Raises:
        PlatformError: the evaluate stage has not written its result.
    """
    path = cfg.run_dir / REPORT_FILE
    path.write_text(render(f"Evaluation report: run {cfg.run_name}", build_sections(cfg, tsne)))
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
    write_stage_result(cfg, "report", {"report_path": str(path), "report_bytes": path.stat().st_size,
                                       "report_wall_s": time.perf_counter() - t0})
    log.info("report written to %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
