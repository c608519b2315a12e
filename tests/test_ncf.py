"""Neural Collaborative Filtering (He et al. 2017): GMF's, MLP's and NeuMF's logits by hand; GMF's query encoder
ranks items as its logit does (MIPS by cosine); NeuMF's pre-training through the trainer's init step with a tuple
of sources (``ModelSpec.init_from``): its towers' tables are exactly the saved GMF's and MLP's, its MLP layers the
MLP's, its prediction layer the alpha mix (so its first logit is the alpha mix of the two logits). Into a sharded
model the same values go through ``copy_full_into`` over the DMP state dict, as FNN's init and every sharded
model's load do (tests/test_fnn.py, tests/test_sharded_models.py). A missing source, tables or layers of another
size and two sources of one table are errors; the config's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.artifacts import ModelOutputError, model_dir, save_model
from training.data import kjt_of_rows, synthetic_vocab_sizes
from training.models.gmf import GMF, GMFConfig
from training.models.gmf import SPEC as GMF_SPEC
from training.models.ncf_mlp import SPEC as MLP_SPEC
from training.models.ncf_mlp import NCFMLP, NCFMLPConfig
from training.models.neumf import SPEC as NEUMF_SPEC
from training.models.neumf import NeuMF, NeuMFConfig
from training.modules.ncf import GMF_ITEM_TABLE, GMF_USER_TABLE, MLP_ITEM_TABLE, MLP_USER_TABLE, NCF_FEATURES
from training.registry import ModelOptionError
from training.trainer import ModelInitError, _provenance, _resume_or_init, init_source

VOCAB = synthetic_vocab_sizes()
PAIRS = ((1, 2), (3, 4), (5, 39), (0, 7))


def _kjt(pairs=PAIRS):
    return kjt_of_rows([{"user_idx": u, "item_idx": i} for u, i in pairs], NCF_FEATURES)


def _tower(state: dict, hidden: int, x: torch.Tensor) -> torch.Tensor:
    """The MLP tower by hand: Linear, ReLU per layer (``mlp.dense_arch.layers.{0, 2, 4}``)."""
    for layer in range(hidden):
        x = torch.relu(x @ state[f"mlp.dense_arch.layers.{2 * layer}.weight"].T
                       + state[f"mlp.dense_arch.layers.{2 * layer}.bias"])
    return x


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with every parameter drawn anew (a stand-in for a trained one: biases and h not at their init)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    return model.eval()


def _save(run_dir, spec, model, config, version: str) -> dict:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_model(model_dir(run_dir, spec.name), spec, config, state, model_version=version, options={},
               vocab_sizes=VOCAB, sharding_plan={}, metrics={}, training_versions={})
    return state


def _trained_sources(run_dir, gmf_config=GMFConfig(), mlp_config=NCFMLPConfig()) -> tuple[dict, dict]:
    """A GMF and an MLP with random weights, saved into ``run_dir`` as the trainer saves them; their states."""
    gmf = _save(run_dir, GMF_SPEC, _randomised(GMF(VOCAB, gmf_config), 1), gmf_config, "gmf-20240101T000000Z")
    mlp = _save(run_dir, MLP_SPEC, _randomised(NCFMLP(VOCAB, mlp_config), 2), mlp_config,
                "ncf_mlp-20240101T000000Z")
    return gmf, mlp


@torch.no_grad()
def test_gmf_logit_is_the_weighted_product_of_user_and_item_vectors():
    model = _randomised(GMF(VOCAB, GMFConfig(embedding_dim=8)), 0)
    state = model.state_dict()
    h, b = state["predict.weight"][0], state["predict.bias"][0]
    want = [float((state[GMF_USER_TABLE][u] * state[GMF_ITEM_TABLE][i] * h).sum() + b) for u, i in PAIRS]
    np.testing.assert_allclose(model(_kjt()).numpy(), want, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_gmf_query_encoder_ranks_items_as_the_logit_does():
    """Cosine over the MIPS item vectors with the query ``p_u * h`` gives the model's own order of every item."""
    model = _randomised(GMF(VOCAB, GMFConfig(embedding_dim=8)), 3)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    items = GMF_SPEC.item_vectors(state, model.config)  # (R, D + 1)
    assert items.shape == (VOCAB["item"], 9)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), np.linalg.norm(items, axis=1)[0], rtol=1e-5)
    queries, ok = GMF_SPEC.query_encoder(state, model.config).encode(np.array([1, 7]), [np.array([]), np.array([3])])
    assert ok.all() and queries.shape == (2, 9)
    for b, u in enumerate((1, 7)):
        cosine = items @ queries[b] / np.linalg.norm(items, axis=1) / np.linalg.norm(queries[b])  # (R,)
        logits = model(_kjt([(u, i) for i in range(VOCAB["item"])])).numpy()
        assert np.argsort(-cosine, kind="stable").tolist() == np.argsort(-logits, kind="stable").tolist()


@torch.no_grad()
def test_mlp_logit_is_a_relu_tower_over_the_concatenated_vectors():
    model = _randomised(NCFMLP(VOCAB, NCFMLPConfig(embedding_dim=8, hidden=(12, 6, 4))), 4)
    state = model.state_dict()
    x = torch.stack([torch.cat([state[MLP_USER_TABLE][u], state[MLP_ITEM_TABLE][i]]) for u, i in PAIRS])
    want = _tower(state, 3, x) @ state["predict.weight"][0] + state["predict.bias"][0]  # (B,)
    torch.testing.assert_close(model(_kjt()), want, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_neumf_logit_is_one_prediction_layer_over_both_towers():
    config = NeuMFConfig(gmf_dim=4, mlp_dim=8, hidden=(8, 4))
    model = _randomised(NeuMF(VOCAB, config), 5)
    state = model.state_dict()
    gmf = torch.stack([state[GMF_USER_TABLE][u] * state[GMF_ITEM_TABLE][i] for u, i in PAIRS])  # (B, 4)
    mlp = _tower(state, 2, torch.stack([torch.cat([state[MLP_USER_TABLE][u], state[MLP_ITEM_TABLE][i]])
                                        for u, i in PAIRS]))  # (B, 4)
    want = torch.cat([gmf, mlp], dim=1) @ state["predict.weight"][0] + state["predict.bias"][0]
    torch.testing.assert_close(model(_kjt()), want, rtol=1e-5, atol=1e-6)
    # each tower has its own tables
    assert not torch.equal(state[GMF_ITEM_TABLE][:, :4], state[MLP_ITEM_TABLE][:, :4])


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_neumf_starts_from_the_trained_gmf_and_mlp(tmp_path, monkeypatch, alpha):
    """Through the driver's check (``init_source``) and the worker's fresh start (``_resume_or_init``): the towers'
    tables are the sources', the MLP's layers are the MLP's, the prediction layer is the alpha mix, so the first
    logit is ``alpha logit_GMF + (1 - alpha) logit_MLP``; the meta records both sources."""
    import training.trainer as trainer

    gmf_state, mlp_state = _trained_sources(tmp_path)
    config = NeuMFConfig(alpha=alpha)
    init = init_source(NEUMF_SPEC, config, tmp_path, VOCAB)
    assert [s["model"] for s in init["sources"]] == [GMF_SPEC.name, MLP_SPEC.name]
    assert [s["model_version"] for s in init["sources"]] == ["gmf-20240101T000000Z", "ncf_mlp-20240101T000000Z"]
    assert init["sources"][0]["tables"] == [GMF_USER_TABLE, GMF_ITEM_TABLE]
    assert init["sources"][1]["tables"] == [MLP_USER_TABLE, MLP_ITEM_TABLE]
    layers = sorted(k for k in mlp_state if k.startswith("mlp.dense_arch."))
    assert len(layers) == 6 and init["params"] == sorted(layers + ["predict.bias", "predict.weight"])
    assert _provenance(init) == {"sources": [{k: s[k] for k in ("model", "model_version", "tables")}
                                             for s in init["sources"]], "params": init["params"]}

    torch.manual_seed(0)
    model = NeuMF(VOCAB, config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(trainer, "_resume", lambda dmp, rank: None)  # a fresh start
    assert _resume_or_init(model, 0, init, NEUMF_SPEC, config) is None
    after = model.state_dict()
    assert set(after) == set(gmf_state) - {"predict.weight", "predict.bias"} | set(mlp_state)
    for key, value in after.items():
        if key.startswith("sparse_arch.gmf."):
            assert torch.equal(value, gmf_state[key]), key
        elif key.startswith(("sparse_arch.mlp.", "mlp.")):
            assert torch.equal(value, mlp_state[key]), key
        assert not torch.equal(value, before[key]), key  # really overwritten
    torch.testing.assert_close(after["predict.weight"], torch.cat([alpha * gmf_state["predict.weight"],
                                                                   (1 - alpha) * mlp_state["predict.weight"]], 1))
    torch.testing.assert_close(after["predict.bias"],
                               alpha * gmf_state["predict.bias"] + (1 - alpha) * mlp_state["predict.bias"])
    gmf, mlp = GMF(VOCAB).eval(), NCFMLP(VOCAB).eval()
    gmf.load_state_dict(gmf_state)
    mlp.load_state_dict(mlp_state)
    with torch.no_grad():
        torch.testing.assert_close(model(_kjt()), alpha * gmf(_kjt()) + (1 - alpha) * mlp(_kjt()),
                                   rtol=1e-5, atol=1e-6)


def test_neumf_from_scratch_needs_no_source(tmp_path):
    assert NEUMF_SPEC.init_sources(NEUMF_SPEC.make_config({"pretrained": "false"})) == ()
    assert init_source(NEUMF_SPEC, NeuMFConfig(pretrained=False), tmp_path, VOCAB) is None
    assert NEUMF_SPEC.init_sources(NeuMFConfig()) == (GMF_SPEC.name, MLP_SPEC.name)


def test_a_missing_or_mismatched_source_is_an_error_that_names_the_fix(tmp_path):
    _save(tmp_path, GMF_SPEC, GMF(VOCAB), GMFConfig(), "gmf-1")
    with pytest.raises(ModelOutputError, match=r"run `python -m training\.train --model ncf_mlp` first"):
        init_source(NEUMF_SPEC, NeuMFConfig(), tmp_path, VOCAB)
    _trained_sources(tmp_path)
    with pytest.raises(ModelInitError, match=r"gmf\..*t_user.weight: \(30, 12\) here, \(30, 8\) saved"):
        init_source(NEUMF_SPEC, NeuMFConfig(gmf_dim=12), tmp_path, VOCAB)  # the tables' D
    with pytest.raises(ModelInitError, match=r"init_state .* does not fit: mlp\.dense_arch\.layers\.4\.weight: "
                                             r"no such key"):
        init_source(NEUMF_SPEC, NeuMFConfig(hidden=(32, 16)), tmp_path, VOCAB)  # the tower's layers
    with pytest.raises(ModelInitError, match=r"predict.weight: \(1, 24\) here, \(1, 16\) computed"):
        init_source(NEUMF_SPEC, NeuMFConfig(hidden=(32, 16, 16)), tmp_path, VOCAB)


def test_two_sources_of_one_table_are_refused(tmp_path):
    import dataclasses

    _trained_sources(tmp_path)
    twice = dataclasses.replace(NEUMF_SPEC, init_from=lambda config: (GMF_SPEC.name, GMF_SPEC.name))
    with pytest.raises(ModelInitError, match=r"come from two init sources"):
        init_source(twice, NeuMFConfig(), tmp_path, VOCAB)
    with pytest.raises(ValueError, match="init_state"):
        dataclasses.replace(NEUMF_SPEC, init_from=None)


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of 4"):
        GMFConfig(embedding_dim=6)
    with pytest.raises(ValueError, match="at least one layer"):
        NCFMLPConfig(hidden=())
    with pytest.raises(ValueError, match="mlp_dim"):
        NeuMFConfig(mlp_dim=10)
    with pytest.raises(ValueError, match="alpha"):
        NeuMFConfig(alpha=1.5)
    assert NEUMF_SPEC.make_config({"alpha": "0.7", "pretrained": "false"}) == NeuMFConfig(alpha=0.7,
                                                                                         pretrained=False)
    with pytest.raises(ModelOptionError, match="pretrained"):
        NEUMF_SPEC.make_config({"pretrained": "maybe"})


def test_kinds_make_each_usable():
    """GMF is scored by an inner product (a retriever with its own query); MLP and NeuMF are not (rankers)."""
    assert (GMF_SPEC.kind, MLP_SPEC.kind, NEUMF_SPEC.kind) == ("retriever", "ranker", "ranker")
    assert GMF_SPEC.query_encoder is not None and GMF_SPEC.task == MLP_SPEC.task == NEUMF_SPEC.task == "ctr"


@torch.no_grad()
def test_the_rankers_score_the_services_inputs_as_their_training_rows():
    """Serving's ranker inputs (``serving.bundle.RankerInputs``, what ``/recommend`` and the ranker replay score)
    give MLP and NeuMF the same logits as the rows they were trained on: one user, each candidate item."""
    from serving.bundle import RankerInputs, UserProfile

    profile = UserProfile({"user_idx": 7, "age_idx": 2, "gender_idx": 1, "occupation_idx": 4, "zip_idx": 9},
                          items=(3, 5))
    cand = np.array([4, 1, 39, 12])
    for model in (_randomised(NCFMLP(VOCAB), 6), _randomised(NeuMF(VOCAB, NeuMFConfig(pretrained=False)), 7)):
        kjt, dense = RankerInputs(NCF_FEATURES, (), {}, {}, n_rows=VOCAB["item"]).build(profile, cand)
        assert dense is None
        torch.testing.assert_close(model(kjt), model(_kjt([(7, int(i)) for i in cand])))
