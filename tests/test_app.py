"""serving.app on small synthetic artifacts (an exported item2vec index, a DeepFM state dict, a ctr_samples export):
/similar-items and /recommend against a brute-force numpy/torch reference, the popularity fallback, 4xx for bad
parameters, a reload under concurrent requests with no failed request, the Prometheus metrics, a schema-driven
fuzz (schemathesis against the app's own OpenAPI) that finds no 5xx, and a real uvicorn on loopback."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from features.config import ROOT, PlatformConfig
from features.definitions import DENSE_FEATURES
from serving.ann import HnswParams
from serving.bundle import BundleSpec, VersionChangePolicy
from serving.export import run_export
from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.artifacts import save_model
from training.models.deepfm import DeepFM, DeepFMConfig
from training.registry import get_model

N_ITEMS, DIM, USERS = 39, 8, (1, 2, 3, 4, 5)   # item_idx 1..39 <-> item_id 100+idx; user_idx = user_id
SPEC = BundleSpec(retrieval_model="item2vec", recent_items=3, per_item=4)
DENSE_NAMES = tuple(f.name for f in DENSE_FEATURES)   # the ranker reads the counters, as a trained one does


# ------------------------------------------------------------------------------------------------ artifacts
def _write_item2vec(cfg: PlatformConfig, seed: int, version: str) -> np.ndarray:
    table = np.random.default_rng(seed).standard_normal((N_ITEMS + 1, DIM)).astype(np.float32)
    d = cfg.run_dir / "models" / "item2vec"
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "item_embeddings.npy", table)
    (d / "meta.json").write_text(json.dumps({"model_version": version}))
    return table


def _write_deepfm(cfg: PlatformConfig, seed: int, version: str) -> DeepFM:
    torch.manual_seed(seed)
    conf = DeepFMConfig(embedding_dim=8, hidden=(16,), dropout=0.0, init_range=0.5, dense_features=DENSE_NAMES)
    model = DeepFM(synthetic_vocab_sizes(), conf).eval()
    save_model(cfg.run_dir / "models" / "deepfm", get_model("deepfm"), conf, model.state_dict(),
               model_version=version, options={}, vocab_sizes=synthetic_vocab_sizes(), sharding_plan={}, metrics={},
               training_versions={})
    return model


def _write_lake(cfg: PlatformConfig) -> dict:
    """ctr_samples export: user u rates items (7u + 3j) % 39 + 1 for j < 6 at times 10u + j with (u + j) % 5 + 1
    stars; train split, label 1 for even j. Returns the reference's view: user -> (features, items in time order,
    their ratings)."""
    vocab = cfg.lake_dir / "export" / "item_vocab"
    vocab.mkdir(parents=True, exist_ok=True)
    idx = list(range(1, N_ITEMS + 1))
    pq.write_table(pa.table({"item_id": pa.array([100 + i for i in idx], pa.int32()),
                             "item_idx": pa.array(idx, pa.int32()),
                             "first_seen": pa.array([0] * len(idx), pa.timestamp("us", tz="UTC"))}),
                   vocab / "part-0.parquet")
    rows, ref = [], {}
    for u in USERS:
        items = [(7 * u + 3 * j) % N_ITEMS + 1 for j in range(6)]
        feats = {"user_idx": u, "age_idx": u % 7 + 1, "gender_idx": u % 2 + 1, "occupation_idx": u + 2,
                 "zip_idx": u + 1}
        ref[u] = (feats, items, [float((u + j) % 5 + 1) for j in range(6)])
        for j, it in enumerate(items):
            rows.append({"event_id": f"e{u}-{j}", "user_id": u, "item_id": 100 + it, "rating": ref[u][2][j],
                         "label": int(j % 2 == 0), "event_time": np.datetime64(10 * u + j, "s"), **feats,
                         "item_idx": it, "genre_idx": [it % 19 + 1], "hist_item_idx": items[:j], "hist_len": j})
    d = cfg.lake_dir / "export" / "ctr_samples" / "split=train"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), d / "part-0.parquet")
    return ref


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    cfg = PlatformConfig(data_dir=tmp / "data", artifacts_dir=tmp / "artifacts")
    ref = _write_lake(cfg)
    table = _write_item2vec(cfg, seed=0, version="i2v-1")
    model = _write_deepfm(cfg, seed=0, version="dfm-1")
    run_export(cfg, HnswParams(m=8, ef_construction=64, ef_search=64), models=("item2vec",))
    return cfg, ref, table, model


@pytest.fixture(scope="module")
def client(world):
    from fastapi.testclient import TestClient

    from serving.app import create_app

    with TestClient(create_app(world[0], spec=SPEC)) as c:
        yield c


# ------------------------------------------------------------------------------------------------ references
@contextlib.contextmanager
def _concurrent_readers(client, n_threads: int = 4):
    """Four threads asking ``/similar-items`` (item 105, k 3) and ``/recommend`` (user 3) without pause while the
    ``with`` body runs, and 0.3 s before and after it. Yields ``(failures, answers)``: every non-200 answer as
    ``(path, status, body)``, and every ``/similar-items`` answer as ``(model_version, item ids)``."""
    failures, answers, stop = [], [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for path, params in (("/similar-items", {"item_id": 105, "k": 3}), ("/recommend", {"user_id": 3})):
                r = client.get(path, params=params)
                if r.status_code != 200:
                    failures.append((path, r.status_code, r.text))
                elif path == "/similar-items":
                    answers.append((r.json()["model_version"], [x["item_id"] for x in r.json()["items"]]))

    threads = [threading.Thread(target=reader) for _ in range(n_threads)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        yield failures, answers
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()


def _cosine_top(table: np.ndarray, q: int, k: int) -> list[int]:
    """Exact top-k item_idx by cosine to row q (rows 1..N; q itself included, as the index search returns it)."""
    v = table[1:] / np.linalg.norm(table[1:], axis=1, keepdims=True)
    sims = v @ v[q - 1]
    return [int(i) + 1 for i in np.argsort(-sims, kind="stable")[:k]]


def _reference_dense(ref, u: int, c: int) -> torch.Tensor:
    """(1, 4) dense input by hand: log1p(events), mean rating - 3.5 (0 without events), user's then item's."""
    item_ratings = [r for _, its, rs in ref.values() for i, r in zip(its, rs) if i == c]
    user_ratings = ref[u][2]
    mean = lambda rs: sum(rs) / len(rs) - 3.5 if rs else 0.0
    return torch.tensor([[math.log1p(len(user_ratings)), mean(user_ratings),
                          math.log1p(len(item_ratings)), mean(item_ratings)]])


def _reference_recommend(table, model, ref, u: int, k: int) -> list[tuple[int, float]]:
    feats, items, _ = ref[u]
    rated = {i for _, its, _ in ref.values() for i in its}   # items with a sample: their genres are known
    cand = []
    for q in items[-SPEC.recent_items:]:
        cand += [c for c in _cosine_top(table, q, SPEC.per_item) if c not in items and c not in cand]
    with torch.no_grad():
        probs = [float(torch.sigmoid(model(kjt_of_rows([{**feats, "item_idx": c,
                                                         "genre_idx": [c % 19 + 1] if c in rated else []}]),
                                           _reference_dense(ref, u, c)))[0])
                 for c in cand]                                       # one row at a time, not batched
    best = sorted(zip(cand, probs), key=lambda x: (-x[1], x[0]))[:k]
    return [(100 + c, p) for c, p in best]


# ------------------------------------------------------------------------------------------------ tests
def test_similar_items_match_exact_cosine(client, world):
    _, _, table, _ = world
    for q in (1, 17, 39):
        body = client.get("/similar-items", params={"item_id": 100 + q, "k": 5}).json()
        want = [100 + i for i in _cosine_top(table, q, 6) if i != q][:5]
        assert [x["item_id"] for x in body["items"]] == want
        v = table[q] / np.linalg.norm(table[q])
        w = table[want[0] - 100] / np.linalg.norm(table[want[0] - 100])
        assert body["items"][0]["score"] == pytest.approx(float(v @ w), abs=1e-5)
        assert body["fallback"] is None and body["model_version"] == "dfm-1+i2v-1"


def test_recommend_matches_bruteforce_reference(client, world):
    _, ref, table, model = world
    for u in USERS:
        body = client.get("/recommend", params={"user_id": u, "k": 5}).json()
        want = _reference_recommend(table, model, ref, u, 5)
        assert [x["item_id"] for x in body["items"]] == [i for i, _ in want]
        assert [x["score"] for x in body["items"]] == pytest.approx([p for _, p in want], abs=1e-5)
        assert {x["source"] for x in body["items"]} == {"ann+deepfm"} and body["fallback"] is None
        assert not {x["item_id"] for x in body["items"]} & {100 + i for i in ref[u][1]}   # nothing seen


def test_served_ranker_is_fused_and_gives_its_own_logits(world):
    """The bundle serves the ranker with fused lookups (serving.fused), and on every user's real request its logits
    are the model's own forward's, rebuilt unfused from the same folder."""
    from serving.bundle import load_bundle
    from serving.fused import FusedBagCollection
    from training.artifacts import load_model

    cfg = world[0]
    bundle = load_bundle(cfg, SPEC)
    own = load_model(cfg.run_dir / "models" / "deepfm").module
    assert any(isinstance(m, FusedBagCollection) for m in bundle.ranker.module.modules())
    assert not any(isinstance(m, FusedBagCollection) for m in own.modules())
    for profile in bundle.users.values():
        features, dense = bundle.ranker_inputs.build(profile, np.asarray(bundle.candidates(profile)))
        with torch.inference_mode():
            assert (bundle.ranker.module(features, dense) - own(features, dense)).abs().max().item() <= 1e-6


def test_popularity_fallback_for_unknown_ids(client, world):
    # positives in train: label 1 for j = 0, 2, 4 of each user; count per item, most first, ties by item id
    _, ref, _, _ = world
    counts: dict[int, int] = {}
    for _, items, _ in ref.values():
        for j in (0, 2, 4):
            counts[100 + items[j]] = counts.get(100 + items[j], 0) + 1
    want = sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:4]
    for path, param in (("/recommend", "user_id"), ("/similar-items", "item_id")):
        body = client.get(path, params={param: 99999, "k": 4}).json()
        assert body["fallback"] == "popularity"
        assert [(x["item_id"], x["score"]) for x in body["items"]] == [(i, float(c)) for i, c in want]


def test_short_candidate_list_is_filled_with_unseen_popular_items(client, world):
    _, ref, _, _ = world
    body = client.get("/recommend", params={"user_id": 2, "k": 30}).json()
    sources = [x["source"] for x in body["items"]]
    n_ann = sources.count("ann+deepfm")
    assert 0 < n_ann < 30 and sources[n_ann:] == ["popularity"] * (len(sources) - n_ann)
    ids = [x["item_id"] for x in body["items"]]
    assert len(set(ids)) == len(ids) and not set(ids) & {100 + i for i in ref[2][1]}


@pytest.mark.parametrize("path,params,name", [
    ("/recommend", {}, "user_id"),
    ("/recommend", {"user_id": "abc"}, "user_id"),
    ("/recommend", {"user_id": 1, "k": 0}, "k"),
    ("/recommend", {"user_id": 1, "k": 101}, "k"),
    ("/recommend", {"user_id": -3}, "user_id"),
    ("/similar-items", {"item_id": 2**40}, "item_id"),
    ("/similar-items", {"item_id": 101, "k": "1.5"}, "k"),
])
def test_bad_parameters_are_422_naming_the_parameter(client, path, params, name):
    r = client.get(path, params=params)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", name]


def test_health_reports_the_index_parameters_and_its_measured_recall(client, world):
    cfg = world[0]
    saved = json.loads((cfg.run_dir / "embeddings" / "item2vec" / "index.json").read_text())
    body = client.get("/health").json()
    assert (body["retrieval_source"], body["ef_search"], body["items"]) == ("export", 64, N_ITEMS)
    assert body["recall_at_10"] == saved["recall@10"] and 0.9 <= body["recall_at_10"] <= 1.0


def test_reload_to_an_unknown_or_malformed_version_is_a_4xx(client):
    r = client.post("/admin/reload", params={"version": "i2v-404"})
    assert r.status_code == 404 and "no registry" in r.json()["detail"]
    assert client.post("/admin/reload", params={"version": "../etc"}).status_code == 422
    assert client.get("/health").json()["model_version"] == "dfm-1+i2v-1"      # still serving


def test_metrics_count_requests_and_report_the_version(client):
    before = client.get("/metrics").text
    client.get("/recommend", params={"user_id": 1})
    client.get("/recommend", params={"user_id": "x"})
    text = client.get("/metrics").text

    def value(t: str, series: str) -> float:
        line = [ln for ln in t.splitlines() if ln.startswith(series + " ")]
        return float(line[0].split()[-1]) if line else 0.0

    ok = 'recsys_requests_total{endpoint="/recommend",status="200"}'
    bad = 'recsys_requests_total{endpoint="/recommend",status="422"}'
    assert value(text, ok) - value(before, ok) == 1 and value(text, bad) - value(before, bad) == 1
    assert 'recsys_request_latency_seconds_count{endpoint="/recommend"}' in text
    assert 'recsys_model_info{model_version="dfm-1+i2v-1",ranker_version="dfm-1",retrieval_version="i2v-1"} 1.0' \
        in text


def test_reload_policy():
    p = VersionChangePolicy()
    assert p.decide(("a", "b"), ("a", "b")).value == "keep"
    assert p.decide(("a", "b"), ("a", "c")).value == "reload"
    assert p.decide(("a", "b"), None, force=True).value == "keep"


def test_reload_under_concurrent_requests_drops_nothing(tmp_path):
    """Readers hammer both endpoints while v2 is exported and loaded: every request succeeds and each answer
    is wholly v1 or wholly v2 (its version and its items agree)."""
    from fastapi.testclient import TestClient

    from serving.app import create_app

    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    _write_lake(cfg)
    t1 = _write_item2vec(cfg, seed=0, version="i2v-1")
    _write_deepfm(cfg, seed=0, version="dfm-1")
    run_export(cfg, HnswParams(m=8, ef_construction=64, ef_search=64), models=("item2vec",))
    expected = {"dfm-1+i2v-1": [100 + i for i in _cosine_top(t1, 5, 4) if i != 5][:3]}
    with TestClient(create_app(cfg, spec=SPEC)) as c:
        with _concurrent_readers(c) as (failures, answers):
            t2 = _write_item2vec(cfg, seed=1, version="i2v-2")
            _write_deepfm(cfg, seed=1, version="dfm-2")
            run_export(cfg, HnswParams(m=8, ef_construction=64, ef_search=64), models=("item2vec",))
            expected["dfm-2+i2v-2"] = [100 + i for i in _cosine_top(t2, 5, 4) if i != 5][:3]
            assert c.post("/admin/reload").json() == {"decision": "reload", "model_version": "dfm-2+i2v-2"}
        assert c.post("/admin/reload").json()["decision"] == "keep"
    assert failures == []
    versions = [v for v, _ in answers]
    assert versions[0] == "dfm-1+i2v-1" and versions[-1] == "dfm-2+i2v-2"
    assert all(items == expected[v] for v, items in answers)


def test_watcher_loads_a_new_export_by_itself(tmp_path):
    """With ``watch_s`` the policy is asked periodically: a new export is served without any reload call."""
    from fastapi.testclient import TestClient

    from serving.app import create_app

    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    _write_lake(cfg)
    _write_item2vec(cfg, seed=0, version="i2v-1")
    _write_deepfm(cfg, seed=0, version="dfm-1")
    params = HnswParams(m=8, ef_construction=64, ef_search=64)
    run_export(cfg, params, models=("item2vec",))
    with TestClient(create_app(cfg, spec=SPEC, watch_s=0.1)) as c:
        assert c.get("/health").json()["model_version"] == "dfm-1+i2v-1"
        _write_item2vec(cfg, seed=2, version="i2v-3")
        run_export(cfg, params, models=("item2vec",))
        deadline = time.time() + 30
        while c.get("/health").json()["model_version"] != "dfm-1+i2v-3":
            assert time.time() < deadline, "the watcher did not load the new export"
            time.sleep(0.1)
        c.app.state.holder.stop()


FUZZ_EXAMPLES = 30  # per operation and generation mode: the fuzz stays well under a minute


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_openapi_no_server_errors(world, mode):
    """Schemathesis generates requests for every operation of the app's own OpenAPI schema (valid ones in
    ``positive`` mode, schema-violating ones in ``negative``): none gets a 5xx, and valid ones get a 2xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    from serving.app import create_app

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(world[0], spec=SPEC))
    gen_mode = GenerationMode(mode)
    seen: list[tuple[str, str, int]] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if gen_mode is GenerationMode.NEGATIVE and not list(operation.query):
            continue                                        # nothing to get wrong in /health, /metrics

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=gen_mode))
        def check(case) -> None:
            response = case.call()
            seen.append((case.method, case.path, response.status_code))
            assert response.status_code < 500, (case.method, case.path, case.query, response.text)
            if gen_mode is GenerationMode.POSITIVE:
                # a well-formed registry version that does not exist is a documented 404 (this world has no registry)
                unknown_version = case.path == "/admin/reload" and (case.query or {}).get("version") is not None
                assert response.status_code < 300 or (unknown_version and response.status_code == 404), \
                    (case.method, case.path, case.query, response.text)

        check()
    paths = {p for _, p, _ in seen}
    assert {"/recommend", "/similar-items", "/admin/reload"} <= paths
    if gen_mode is GenerationMode.NEGATIVE:
        assert any(code == 422 for _, _, code in seen)     # the invalid inputs were really invalid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_python_m_serving_app_serves_on_loopback(world):
    """The real command: uvicorn on 127.0.0.1, queried with httpx over TCP."""
    import httpx

    cfg = world[0]
    port = _free_port()
    env = {"PYTHONPATH": str(ROOT), "RECSYS_DATA_DIR": str(cfg.data_dir),
           "RECSYS_ARTIFACTS_DIR": str(cfg.artifacts_dir), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "serving.app", "--port", str(port), "--recent-items", "3",
                             "--per-item", "4"], env=env, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, "service did not start"
                time.sleep(0.5)
        assert r.json()["model_version"] == "dfm-1+i2v-1" and r.json()["items"] == N_ITEMS
        body = httpx.get(f"http://127.0.0.1:{port}/recommend", params={"user_id": 4, "k": 5}).json()
        _, ref, table, model = world
        assert [x["item_id"] for x in body["items"]] == [i for i, _ in _reference_recommend(table, model, ref, 4, 5)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------ registry versions (Spark)
REGISTRY_PARAMS = HnswParams(m=8, ef_construction=64, ef_search=64)
RECORDED = {"gold.item_sequences": 4, "silver.item_vocab": 2}   # as the trainer records them in meta.json


@pytest.fixture(scope="module")
def registry_world(spark, tmp_path_factory):
    """Two item2vec versions exported into gold.item_embeddings (real Delta), a DeepFM ranker and a lake."""
    tmp = tmp_path_factory.mktemp("registry")
    cfg = PlatformConfig(data_dir=tmp / "data", artifacts_dir=tmp / "artifacts")
    _write_lake(cfg)
    _write_deepfm(cfg, seed=0, version="dfm-1")
    tables = {}
    for seed, version in ((0, "i2v-1"), (1, "i2v-2")):
        tables[version] = _write_item2vec(cfg, seed, version)
        meta = cfg.run_dir / "models" / "item2vec" / "meta.json"
        meta.write_text(json.dumps({"model_version": version, "training_versions": RECORDED}))
        run_export(cfg, HnswParams(m=4, ef_construction=8, ef_search=4), models=("item2vec",), spark=spark)
    return cfg, tables


def _similar_reference(table: np.ndarray, item_idx: int, k: int) -> list[int]:
    return [100 + i for i in _cosine_top(table, item_idx, k + 1) if i != item_idx][:k]


@pytest.mark.integration
def test_serves_a_registry_version_with_its_saved_index_and_swaps_under_load(registry_world):
    """The service serves a chosen registry version: its index is built from the Delta rows with the requested
    parameters (efSearch included) and its recall@10, stored beside it, equals a brute-force recount. A switch to
    the other version under concurrent requests fails none and each answer is wholly one version."""
    from fastapi.testclient import TestClient

    from serving.ann import ItemIndex
    from serving.app import create_app
    from serving.registry import version_dir

    cfg, tables = registry_world
    spec = BundleSpec("item2vec", "deepfm", SPEC.recent_items, SPEC.per_item, source="registry", version="i2v-1",
                      hnsw=REGISTRY_PARAMS)
    with TestClient(create_app(cfg, spec=spec)) as c:
        health = c.get("/health").json()
        assert (health["model_version"], health["retrieval_source"], health["ef_search"]) == \
            ("dfm-1+i2v-1", "registry", 64)
        saved = json.loads((version_dir(cfg, "item2vec", "i2v-1") / "index.json").read_text())
        assert (saved["m"], saved["ef_construction"], saved["ef_search"]) == (8, 64, 64)
        assert saved["model_version"] == "i2v-1" and saved["training_versions"] == RECORDED
        assert saved["registry_table"] == "gold.item_embeddings" and saved["registry_table_version"] == 1
        index = ItemIndex.load(version_dir(cfg, "item2vec", "i2v-1") / "index.faiss")
        assert index.ef_search == 64                                   # restored, not faiss' default 16/10
        t1 = tables["i2v-1"]
        _, got = index.search(t1[1:], 10)
        recount = np.mean([len(set(got[q - 1].tolist()) & set(_cosine_top(t1, q, 10))) / 10
                           for q in range(1, N_ITEMS + 1)])
        assert saved["recall@10"] == pytest.approx(recount) and health["recall_at_10"] == saved["recall@10"]

        expected = {f"dfm-1+{v}": _similar_reference(t, 5, 3) for v, t in tables.items()}
        with _concurrent_readers(c) as (failures, answers):
            r = c.post("/admin/reload", params={"version": "i2v-2"})  # reads the registry with Spark meanwhile
        assert r.json() == {"decision": "reload", "model_version": "dfm-1+i2v-2"}
        assert failures == []
        versions = [v for v, _ in answers]
        assert versions[0] == "dfm-1+i2v-1" and versions[-1] == "dfm-1+i2v-2"
        assert all(items == expected[v] for v, items in answers)
        assert c.post("/admin/reload").json() == {"decision": "keep", "model_version": "dfm-1+i2v-2"}  # pinned
        r = c.post("/admin/reload", params={"version": "i2v-9"})
        assert r.status_code == 404 and "no 'item2vec' version 'i2v-9'" in r.json()["detail"]
        assert c.get("/health").json()["model_version"] == "dfm-1+i2v-2"


@pytest.mark.integration
def test_service_follows_the_publish_gate(registry_world):
    """``source="published"``: the service serves the version the gate's pointer names; a candidate whose replay
    metrics do not beat the serving ones is rejected and the service keeps its version; a better one is published
    and the service then serves it."""
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from evaluation.gate import Decision, PublishGate, gate_and_publish
    from serving.publish import pointer_path

    cfg, tables = registry_world
    pointer, gate = pointer_path(cfg.artifacts_dir), PublishGate(metric="ndcg@10", guard=("hr@10",))
    assert gate_and_publish(gate, pointer, "item2vec", "i2v-1", {"ndcg@10": 0.05, "hr@10": 0.10})[0] \
        is Decision.PUBLISH
    spec = BundleSpec("item2vec", "deepfm", SPEC.recent_items, SPEC.per_item, source="published",
                      hnsw=REGISTRY_PARAMS)
    with TestClient(create_app(cfg, spec=spec)) as c:
        def served() -> tuple[str, list[int]]:
            body = c.get("/similar-items", params={"item_id": 105, "k": 3}).json()
            return body["model_version"], [x["item_id"] for x in body["items"]]

        assert served() == ("dfm-1+i2v-1", _similar_reference(tables["i2v-1"], 5, 3))
        assert c.get("/health").json()["retrieval_source"] == "published"
        worse = {"ndcg@10": 0.04, "hr@10": 0.12}
        assert gate_and_publish(gate, pointer, "item2vec", "i2v-2", worse)[0] is Decision.REJECT
        assert c.post("/admin/reload").json()["decision"] == "keep"
        assert served() == ("dfm-1+i2v-1", _similar_reference(tables["i2v-1"], 5, 3))
        better = {"ndcg@10": 0.06, "hr@10": 0.10}
        assert gate_and_publish(gate, pointer, "item2vec", "i2v-2", better)[0] is Decision.PUBLISH
        assert c.post("/admin/reload").json() == {"decision": "reload", "model_version": "dfm-1+i2v-2"}
        assert served() == ("dfm-1+i2v-2", _similar_reference(tables["i2v-2"], 5, 3))


def test_recommend_with_a_sequence_ranker_matches_its_reference(world, tmp_path):
    """``--ranker din``: any registered ranker serves; DIN gets each candidate with the user's behaviour history and
    the stars given to it, as it was trained (one row at a time in the reference, batched in the service)."""
    import shutil

    from fastapi.testclient import TestClient

    from features.definitions import rating_levels
    from serving.app import create_app
    from training.models.din import DIN, DINConfig

    cfg, ref, table, _ = world
    local = PlatformConfig(data_dir=cfg.data_dir, artifacts_dir=tmp_path / "artifacts")
    shutil.copytree(cfg.run_dir, local.run_dir)
    torch.manual_seed(3)
    conf = DINConfig(embedding_dim=8, attention_hidden=(6,), hidden=(16,), dropout=0.0, init_range=0.5,
                     dense_features=DENSE_NAMES)
    model = DIN(synthetic_vocab_sizes(), conf).eval()
    save_model(local.run_dir / "models" / "din", get_model("din"), conf, model.state_dict(), model_version="din-1",
               options={}, vocab_sizes=synthetic_vocab_sizes(), sharding_plan={}, metrics={}, training_versions={})
    spec = BundleSpec(retrieval_model="item2vec", ranker_model="din", recent_items=3, per_item=4)
    rated = {i for _, its, _ in ref.values() for i in its}
    with TestClient(create_app(local, spec=spec)) as client:
        for u in USERS:
            feats, items, stars = ref[u]
            body = client.get("/recommend", params={"user_id": u, "k": 5}).json()
            assert {x["source"] for x in body["items"]} == {"ann+din"} and body["model_version"] == "din-1+i2v-1"
            cand = []
            for q in items[-SPEC.recent_items:]:
                cand += [c for c in _cosine_top(table, q, SPEC.per_item) if c not in items and c not in cand]
            with torch.no_grad():
                probs = [float(torch.sigmoid(model(kjt_of_rows([{
                    **feats, "item_idx": c, "genre_idx": [c % 19 + 1] if c in rated else [],
                    "hist_item_idx": items, "hist_rating": rating_levels(stars).tolist()}], conf.features),
                    _reference_dense(ref, u, c)))[0]) for c in cand]
            want = sorted(zip(cand, probs), key=lambda x: (-x[1], x[0]))[:5]
            assert [x["item_id"] for x in body["items"]] == [100 + c for c, _ in want]
            assert [x["score"] for x in body["items"]] == pytest.approx([p for _, p in want], abs=1e-5)


def test_bundle_spec_refuses_a_ranker_that_is_not_registered():
    with pytest.raises(ValueError, match="registered ranker"):
        BundleSpec(ranker_model="item2vec")
