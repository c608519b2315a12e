"""evaluation.report: the ROC points it draws (evaluation.metrics.roc_points) against sklearn and
training.metrics.auc, and the HTML page opened in headless Chromium (its DOM holds every plot as an <img> with PNG
data, and its screenshot is not blank)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from evaluation import report
from evaluation.metrics import roc_points
from features.config import PlatformConfig
from features.results import write_stage_result
from training.metrics import auc

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_roc_points_match_sklearn_and_auc():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.round(labels * 0.5 + rng.normal(0, 0.5, 500), 1)          # rounded: many ties
    fpr, tpr = roc_points(labels, scores)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    assert fpr == pytest.approx(ref_fpr) and tpr == pytest.approx(ref_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(labels, scores))
    with pytest.raises(ValueError):
        roc_points(np.ones(3), np.arange(3))


def _evaluate_result() -> dict:
    k = 10
    m = lambda hr: {f"hr@{k}": hr, f"ndcg@{k}": hr / 2, f"mrr@{k}": hr / 3, "cases": 100,  # noqa: E731
                    "coverage": 0.1, "novelty_bits": 8.0}
    return {
        "k": k, "cases": 100, "retrieval": {"item2vec": m(0.1), "popularity": m(0.06)},
        "hr_curve": {"item2vec": {"1": 0.01, "10": 0.1, "50": 0.3}, "popularity": {"1": 0.01, "10": 0.06, "50": 0.2}},
        "prequential": {"k": k, "windows": [{"window": w, "cases": 100, "train_events": 1000 * w,
                                             "models": {"cooccurrence": m(0.14), "popularity": m(0.07)}}
                                            for w in (1, 2, 3)],
                        "overall": {"cooccurrence": m(0.14), "popularity": m(0.07)}},
        "bandit": {"source": "test", "oracle_ctr": 0.6, "uniform_ctr": 0.2,
                   "policies": {n: {"ctr": c, "low": c - 0.02, "high": c + 0.02, "kept": 500, "events": 5000}
                                for n, c in (("ucb1", 0.3), ("linucb(1)", 0.5))}},
        "interleaving": {"sign_agreement": 1.0, "comparisons": [
            {"on": "test", "a": "item2vec", "b": "popularity", "wins_a": 30, "wins_b": 20, "ties": 50,
             "cases": 100, "preference": 0.1, "hr_diff": 0.04}]},
        "gate": {"decision": "publish", "candidate": "v2", "serving": "v2", "pointer": "x"},
    }


def test_report_renders_in_headless_chromium(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed: run `make browser` (make test does)")
    cfg = PlatformConfig(artifacts_dir=tmp_path / "artifacts", data_dir=tmp_path / "data")
    write_stage_result(cfg, "evaluate", _evaluate_result())
    rng = np.random.default_rng(1)
    emb = cfg.run_dir / "models" / "item2vec"
    emb.mkdir(parents=True)
    np.save(emb / "item_embeddings.npy", rng.normal(size=(61, 8)).astype(np.float32))
    genres = {i: i % 4 for i in range(1, 61)}
    path = None
    orig = report.item_first_genre
    report.item_first_genre = lambda cfg: genres                           # no lake in this test
    try:
        path = report.write_report(cfg)
    finally:
        report.item_first_genre = orig
    page = path.read_text()
    # no ranker in this run: the ROC section says so instead of failing
    assert "ROC curves of the rankers" in page and "no ranker was trained in this run" in page

    profile = tmp_path / "chromium-profile"
    dom = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    imgs = re.findall(r"<img [^>]*src=\"data:image/png;base64,([A-Za-z0-9+/=]+)\"", dom)
    assert len(imgs) == 5                         # HR@K, prequential, bandit, interleaving, t-SNE
    assert all(len(b) > 1000 for b in imgs)
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--window-size=1200,3000",
                    f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = mpimg.imread(shot)[..., :3]                                    # (H, W, 3) in [0, 1]
    non_white = (pixels < 0.9).any(axis=2).mean()
    assert pixels.std() > 0.05 and non_white > 0.02                       # plots drawn, not a blank page
