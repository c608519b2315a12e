"""Matrix factorisation: the logit by hand, the query encoder's order equals the logit's order (MIPS by cosine),
sharded equals unsharded on the same weights is covered by the registry's round trip; here the model's own facts."""

from __future__ import annotations

import numpy as np
import torch

from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.mf import ITEM_BIAS, ITEM_TABLE, MF, MF_FEATURES, USER_TABLE, MFConfig
from training.query import mips_items
from training.registry import get_model


def _model(seed: int = 0) -> MF:
    torch.manual_seed(seed)
    model = MF(synthetic_vocab_sizes(), MFConfig(embedding_dim=8, init_range=0.5)).eval()
    with torch.no_grad():  # biases start at 0: give them values so that they are tested
        for bag in model.biases.weights.values():
            bag.weight.uniform_(-1, 1)
        model.biases.bias.fill_(0.3)
    return model


def test_logit_is_the_dot_product_plus_biases():
    model = _model()
    state = model.state_dict()
    rows = [{"user_idx": u, "item_idx": i} for u, i in ((1, 2), (3, 4), (5, 39))]
    logits = model(kjt_of_rows(rows, MF_FEATURES))
    user_bias = state["biases.weights.t_user.weight"]
    want = [float(state[USER_TABLE][u] @ state[ITEM_TABLE][i] + user_bias[u, 0] + state[ITEM_BIAS][i, 0] + 0.3)
            for u, i in ((1, 2), (3, 4), (5, 39))]
    np.testing.assert_allclose(logits.detach().numpy(), want, rtol=1e-5)


def test_query_encoder_ranks_items_as_the_logit_does():
    """Cosine over the MIPS item vectors with the user's query gives the model's own order of every item."""
    spec, model = get_model("mf"), _model(1)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    items = spec.item_vectors(state, model.config)  # (R, D + 2)
    assert np.allclose(np.linalg.norm(items, axis=1), np.linalg.norm(items, axis=1)[0], rtol=1e-5)
    queries, ok = spec.query_encoder(state, model.config).encode(np.array([1, 7]), [np.array([]), np.array([3])])
    assert ok.all() and queries.shape == (2, items.shape[1])
    n_items = synthetic_vocab_sizes()["item"]
    for b, u in enumerate((1, 7)):
        cosine = items @ queries[b] / np.linalg.norm(items, axis=1) / np.linalg.norm(queries[b])  # (R,)
        logits = model(kjt_of_rows([{"user_idx": u, "item_idx": i} for i in range(n_items)], MF_FEATURES))
        assert np.argsort(-cosine, kind="stable").tolist()[:10] == \
            np.argsort(-logits.detach().numpy(), kind="stable").tolist()[:10]


def test_mips_items_keeps_the_inner_product_and_equalises_norms():
    v = np.random.default_rng(0).normal(size=(20, 5)).astype(np.float32)
    m = mips_items(v)
    q = np.random.default_rng(1).normal(size=5).astype(np.float32)
    np.testing.assert_allclose(m @ np.r_[q, 0.0], v @ q, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), np.linalg.norm(v, axis=1).max(), rtol=1e-5)


def test_mf_is_a_retriever_trained_on_the_ctr_task_with_l2_on_both_tables():
    spec = get_model("mf")
    assert spec.kind == "retriever" and spec.task == "ctr" and spec.query_encoder is not None
    assert set(spec.id_tables) == {"t_user", "t_item"} and spec.train.mba_lambda > 0


def test_recommend_with_mf_retrieves_by_the_users_own_vector(tmp_path):
    """``/recommend`` with MF as the retriever: the candidates are the items nearest to the user's vector (the
    exact inner-product order, seen items removed), then ranked by the ranker, as a brute-force reference does."""
    from fastapi.testclient import TestClient

    from features.config import PlatformConfig
    from serving.ann import HnswParams
    from serving.app import create_app
    from serving.bundle import BundleSpec
    from serving.export import run_export
    from test_app import USERS, _reference_dense, _write_deepfm, _write_lake
    from training.artifacts import save_model

    cfg = PlatformConfig(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts")
    ref = _write_lake(cfg)
    ranker = _write_deepfm(cfg, seed=0, version="dfm-1")
    mf = _model(2)
    state = {k: v.detach().clone() for k, v in mf.state_dict().items()}
    save_model(cfg.run_dir / "models" / "mf", get_model("mf"), mf.config, state, model_version="mf-1", options={},
               vocab_sizes=synthetic_vocab_sizes(), sharding_plan={}, metrics={}, training_versions={})
    run_export(cfg, HnswParams(m=8, ef_construction=64, ef_search=64), models=("mf",))
    spec = BundleSpec(retrieval_model="mf", ranker_model="deepfm", recent_items=2, per_item=3)
    rated = {i for _, its, _ in ref.values() for i in its}
    n_items = 39
    with TestClient(create_app(cfg, spec=spec)) as client:
        for u in USERS:
            feats, items, _ = ref[u]
            body = client.get("/recommend", params={"user_id": u, "k": 4}).json()
            logits = mf(kjt_of_rows([{"user_idx": u, "item_idx": i} for i in range(1, n_items + 1)], MF_FEATURES))
            order = [int(i) + 1 for i in np.argsort(-logits.detach().numpy(), kind="stable")]
            cand = [c for c in order[:spec.recent_items * spec.per_item + len(set(items))] if c not in items]
            with torch.no_grad():
                probs = [float(torch.sigmoid(ranker(kjt_of_rows([{**feats, "item_idx": c, "genre_idx":
                                                                  [c % 19 + 1] if c in rated else []}]),
                                                    _reference_dense(ref, u, c)))[0]) for c in cand]
            want = sorted(zip(cand, probs), key=lambda x: (-x[1], x[0]))[:4]
            assert [x["item_id"] for x in body["items"]] == [100 + c for c, _ in want]
            assert {x["source"] for x in body["items"]} == {"ann+deepfm"}
            assert body["model_version"] == "dfm-1+mf-1"


def test_replay_queries_mf_by_the_users_vector():
    """The replay's embedding policy for MF searches with the case user's own vector (not its recent items): its
    lists are the model's inner-product order over all items, minus what the user saw before the case."""
    from serving.ann import ItemIndex
    from evaluation.replay import ReplayParams, embedding_recs, item_matrix
    from test_replay import _inputs

    spec, mf = get_model("mf"), _model(4)
    state = {k: v.detach().clone() for k, v in mf.state_dict().items()}
    vectors = spec.item_vectors(state, mf.config)  # (R, D + 2)
    items = np.arange(1, vectors.shape[0])
    index = ItemIndex.build(vectors[items], items)
    # user u rates items u, u + 1 in train, then item u + 2 in test (the case); user 3 also item 30 after it
    events = [(f"e{u}{j}", u, u + j, 5, 10 * u + j, "train" if j < 2 else "test", []) for u in (1, 2, 3)
              for j in range(3)] + [("z", 3, 30, 5, 99, "test", [])]
    cases, _ = _inputs(events)
    k = 4
    recs, fell_back = embedding_recs(cases, index, item_matrix(items, vectors[items]), ReplayParams(k=k),
                                     fallback=np.full((len(cases), k), -1),
                                     encoder=spec.query_encoder(state, mf.config))
    assert fell_back == 0
    for b in range(len(cases)):
        u = int(cases.user[b])
        seen = {e[2] for e in events if e[1] == u and (e[4], e[0]) < (int(cases.event_time[b] // 1_000_000)
                                                                        - 1_704_067_200, cases.event_id[b])}
        logits = mf(kjt_of_rows([{"user_idx": u, "item_idx": int(i)} for i in items], MF_FEATURES))
        order = [int(items[j]) for j in np.argsort(-logits.detach().numpy(), kind="stable")]
        assert recs[b].tolist() == [i for i in order if i not in seen][:k], (u, seen)
