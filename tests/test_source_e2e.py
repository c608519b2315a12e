"""A user's own data, end to end: a small CSV click log declared by a YAML file (tests/fixtures/csv-source/) runs
through the whole main job -- the demo's command with ``RECSYS_SOURCE`` set and nothing else changed: its own Kafka
broker, ingest and features on Spark, a retriever and a ranker trained on Ray, export, replay evaluation, the
report -- and the trained models answer over HTTP.

One run (module fixture, a few minutes on 2 cores); every assertion reads its outputs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from features.config import load_config

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "csv-source"
MODELS = ("item2vec", "deepfm")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port_pair() -> int:
    """A port whose successor is free too (the broker and its KRaft controller)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("csv-source")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")},
           "RECSYS_SOURCE": str(FIXTURE / "source.yaml"), "RECSYS_DATA_DIR": str(base / "data"),
           "RECSYS_RAW_DIR": str(base / "raw"), "RECSYS_ARTIFACTS_DIR": str(base / "artifacts"),
           "RECSYS_RUN_NAME": f"csv-{os.getpid()}", "RECSYS_KAFKA__BOOTSTRAP": f"127.0.0.1:{_free_port_pair()}",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipelines.demo", "--models", ",".join(MODELS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    cfg = load_config(environ=env)
    return cfg, json.loads((cfg.run_dir / "summary.json").read_text())


def test_every_event_of_the_csv_reaches_bronze_and_the_samples(run):
    cfg, summary = run
    events = pd.read_csv(FIXTURE / "events.csv")
    assert summary["dataset"] == "shop" and summary["label_rule"] == "click == 1"
    assert summary["events_produced"] == summary["events_bronze"] == len(events)
    assert summary["events_quarantined"] == 0
    assert sum(summary["samples"].values()) == len(events)
    feats = json.loads((cfg.run_dir / "stages" / "features.json").read_text())
    assert sum(feats["positives"].values()) == int(events["clicked"].sum())  # the click rule labelled them
    assert feats["users"] == events["customer"].nunique() and feats["items"] == events["product"].nunique()
    assert feats["unknown_side_features"] == {"user": 0, "item": 0}  # every event found its side tables' rows
    # the side tables' values became category rows: the users' segments and the items' categories
    assert feats["vocab_sizes"]["occupation"] == pd.read_csv(FIXTURE / "users.csv")["segment"].nunique() + 1
    assert feats["vocab_sizes"]["genre"] == pd.read_csv(FIXTURE / "items.csv")["categories"].nunique() + 1


def test_models_train_and_are_evaluated_on_it(run):
    _, summary = run
    assert set(summary["models"]) == set(MODELS)
    ranker = summary["models"]["deepfm"]
    assert 0.0 < ranker["test_auc"] < 1.0 and ranker["epochs"] >= 1
    retrieval = summary["retrieval"]
    assert "item2vec" in retrieval and retrieval["item2vec"]["cases"] > 0
    assert 0.0 <= retrieval["item2vec"]["hr@10"] <= 1.0


def test_the_report_states_the_source_and_its_label(run):
    cfg, _ = run
    text = (cfg.run_dir / "report.html").read_text()
    assert "<b>shop</b>" in text and "click == 1" in text


def test_the_service_answers_for_its_ids(run):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.bundle import BundleSpec

    cfg, _ = run
    events = pd.read_csv(FIXTURE / "events.csv")
    item = int(events["product"].value_counts().index[0])
    user = int(events["customer"].value_counts().index[0])
    with TestClient(create_app(cfg, spec=BundleSpec(retrieval_model="item2vec", ranker_model="deepfm"))) as c:
        similar = c.get("/similar-items", params={"item_id": item, "k": 5})
        assert similar.status_code == 200, similar.text
        got = [r["item_id"] for r in similar.json()["items"]]
        assert len(got) == 5 and item not in got and set(got) <= set(events["product"])
        rec = c.get("/recommend", params={"user_id": user, "k": 5})
        assert rec.status_code == 200, rec.text
        assert set(r["item_id"] for r in rec.json()["items"]) <= set(events["product"])
