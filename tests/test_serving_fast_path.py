"""serving's per-request fast paths give what the slow ones gave: the fused lookups (``serving.fused``) the same
logits as every registered ranker's own forward, on inputs built by ``serving.bundle.RankerInputs``, and fall back
to the model's own modules when they cannot; the neighbour cache the same ids as a fresh HNSW search. The
bundle-level check (a served ranker against its own forward on the users of a served bundle) is in
tests/test_app.py."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from features.definitions import DENSE_FEATURES
from serving.ann import HnswParams, ItemIndex
from serving.bundle import NeighbourCache, RankerInputs, UserProfile
from serving.fused import FusedBagCollection, FusedBags, FusedFirstOrder, fuse_lookups
from training.data import synthetic_vocab_sizes
from training.registry import get_model, list_models

N_ITEMS = 39  # item_idx 1..39, as synthetic_vocab_sizes' item vocabulary (40 rows) allows


def _world(seed: int = 0):
    """Item genres (0 to 3 per item, some items none) and counters (every fifth item without), and a profile
    maker: a user's side features, 7 rated items with stars, and counters."""
    rng = np.random.default_rng(seed)
    genres = {i: tuple(rng.integers(1, 20, rng.integers(0, 4)).tolist()) for i in range(1, N_ITEMS + 1)}
    counters = {i: {"item_prior_events": int(rng.integers(0, 9)), "item_prior_rating": float(rng.uniform(1, 5))}
                for i in range(1, N_ITEMS + 1) if i % 5}

    def profile(u: int) -> UserProfile:
        items = tuple(rng.integers(1, N_ITEMS + 1, 7).tolist())
        return UserProfile({"user_idx": u, "age_idx": u % 7 + 1, "gender_idx": u % 2 + 1, "occupation_idx": u + 2,
                            "zip_idx": u + 1}, items, frozenset(items),
                           {"user_prior_events": 7, "user_prior_rating": 3.25}, tuple(rng.integers(1, 6, 7).tolist()))

    return rng, genres, counters, profile


def _ranker(name: str, seed: int = 0):
    """Registered ranker ``name`` at its default config (reading every dense feature where it can), every
    parameter random (FM's first-order weights start at zero, which would hide a wrong lookup), in eval mode."""
    spec = get_model(name)
    config = spec.default_config()
    if "dense_features" in {f.name for f in dataclasses.fields(config)}:
        config = dataclasses.replace(config, dense_features=tuple(f.name for f in DENSE_FEATURES))
    torch.manual_seed(seed)
    module = spec.build(synthetic_vocab_sizes(), config)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)
    return spec, config, module.eval()


@pytest.mark.parametrize("name", list_models("ranker"))
def test_fused_lookups_give_the_ranker_own_logits(name):
    spec, config, module = _ranker(name)
    rng, genres, counters, profile = _world()
    inputs = RankerInputs(spec.features_of(config), getattr(config, "dense_features", ()), genres, counters,
                          N_ITEMS + 1)
    requests = [inputs.build(profile(u), rng.integers(1, N_ITEMS + 1, c)) for u, c in ((1, 13), (2, 1), (3, 29),
                                                                                     (4, 40))]
    own = copy.deepcopy(module)
    probe = requests[0]
    fused = fuse_lookups(module, lambda m: m(*probe))
    assert fused, f"{name}: nothing fused"
    for path in fused:
        assert isinstance(module.get_submodule(path), (FusedBagCollection, FusedFirstOrder))
    with torch.inference_mode():
        for features, dense in requests[1:]:  # requests other than the probe
            want, got = own(features, dense), module(features, dense)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-6


class _Pooled(nn.Module):
    """One collection of one table, its pooled embeddings as the output."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=5,
                                                                     feature_names=["f"])])

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(features).values()  # (B, 4)


class _ReadsTheTables(_Pooled):
    """A model whose forward reads its collection's tables directly, which a fused twin does not have."""

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return super().forward(features) * self.ebc.embedding_bags["t"].weight.mean()


def _kjt() -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([1, 2, 4]),
                                               lengths=torch.tensor([2, 0, 1]))


def test_fuse_lookups_keeps_the_model_own_modules_when_a_twin_fails():
    model, kjt = _ReadsTheTables().eval(), _kjt()
    with torch.inference_mode():
        want = model(kjt)
    assert fuse_lookups(model, lambda m: m(kjt)) == []
    assert type(model.ebc) is EmbeddingBagCollection
    with torch.inference_mode():
        assert torch.equal(model(kjt), want)


def test_fuse_lookups_keeps_the_model_own_modules_when_the_probe_disagrees(monkeypatch):
    model, kjt = _Pooled().eval(), _kjt()
    assert fuse_lookups(copy.deepcopy(model), lambda m: m(kjt)) == ["ebc"]  # fits, unless the twin is wrong:
    wrong = FusedBags.forward
    monkeypatch.setattr(FusedBags, "forward", lambda self, features: wrong(self, features) + 1e-3)
    assert fuse_lookups(model, lambda m: m(kjt)) == []
    assert type(model.ebc) is EmbeddingBagCollection


def test_fused_bags_pool_as_embedding_bags_do():
    """Mean pooling, empty bags, a table read by two features, a key that no table reads: against one
    ``torch.nn.functional.embedding_bag`` per feature on its own table."""
    torch.manual_seed(1)
    a, b = torch.randn(6, 3), torch.randn(4, 3)
    bags = FusedBags([(a, ["x", "y"]), (b, ["z"])], mode="mean")
    lengths = {"z": [1, 0, 3], "skip": [2, 2, 2], "x": [0, 1, 2], "y": [3, 1, 0]}
    tables = {"x": a, "y": a, "z": b, "skip": None}
    values = {k: torch.randint(0, 4, (sum(n),)) for k, n in lengths.items()}
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(lengths), values=torch.cat(list(values.values())),
                                              lengths=torch.tensor([n for ns in lengths.values() for n in ns]))
    got = bags(kjt)  # (3 features, 3 rows, 3)
    for j, name in enumerate(["x", "y", "z"]):
        offsets = torch.tensor([0, *np.cumsum(lengths[name]).tolist()])
        want = torch.nn.functional.embedding_bag(values[name], tables[name], offsets, mode="mean",
                                                 include_last_offset=True)
        assert torch.allclose(got[j], want, atol=1e-7)
    with pytest.raises(KeyError, match="no key"):
        bags(KeyedJaggedTensor.from_lengths_sync(keys=["x"], values=torch.tensor([1]), lengths=torch.tensor([1])))


def test_neighbour_cache_returns_what_a_fresh_search_returns():
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((60, 8)).astype(np.float32)
    index = ItemIndex.build(vectors, ids=np.arange(1, 61), params=HnswParams(m=4, ef_construction=16, ef_search=8))
    cache = NeighbourCache(index, vectors, k=7)
    for rows in ([3, 9, 3], [9, 59, 0, 12], [12], list(rng.integers(0, 60, 20))):  # rows seen before, and new
        assert np.array_equal(cache.of_rows(rows), index.search(vectors[rows], 7)[1])
