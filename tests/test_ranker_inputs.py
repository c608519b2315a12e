"""serving.bundle.RankerInputs builds, with numpy, exactly the ranker inputs that the documented per-row rule
(``serving.bundle.request_rows`` turned into a KJT by ``training.data.kjt_of_rows``) gives: same keys, values,
lengths and dense matrix, for the pooled features and for a behaviour sequence with its stars."""

import numpy as np
import pytest
import torch

from features.definitions import (DENSE_FEATURES, HISTORY_FEATURE, HISTORY_RATING_FEATURE, MAX_HISTORY,
                                  SPARSE_FEATURES, dense_inputs)
from serving.bundle import RankerInputs, UserProfile, request_rows
from training.data import kjt_of_rows

GENRES = {0: (1,), 1: (2, 3), 2: (), 3: (4, 5, 6), 5: (7,)}
COUNTERS = {0: {"item_prior_events": 3, "item_prior_rating": 4.0}, 3: {"item_prior_events": 1,
                                                                       "item_prior_rating": 2.0}}
PROFILE = UserProfile({"user_idx": 7, "age_idx": 2, "gender_idx": 1, "occupation_idx": 4, "zip_idx": 9},
                      items=tuple(range(10, 10 + MAX_HISTORY + 5)), counters={"user_prior_events": 12,
                                                                             "user_prior_rating": 3.5},
                      levels=tuple((i % 5) + 1 for i in range(MAX_HISTORY + 5)))


def assert_same_kjt(a, b) -> None:
    assert a.keys() == b.keys()
    assert torch.equal(a.values(), b.values())
    assert torch.equal(a.lengths(), b.lengths())


@pytest.mark.parametrize("features", [SPARSE_FEATURES,
                                      (*SPARSE_FEATURES, HISTORY_FEATURE, HISTORY_RATING_FEATURE)],
                         ids=["pooled", "with-history"])
@pytest.mark.parametrize("cand", [[3, 0, 2, 5, 1], [2], [4, 4, 3]], ids=["five", "no-genre", "unknown-item"])
def test_sparse_inputs_equal_the_per_row_rule(features, cand):
    inputs = RankerInputs(features, (), GENRES, COUNTERS, n_rows=6)
    kjt, dense = inputs.build(PROFILE, np.array(cand))
    assert dense is None
    assert_same_kjt(kjt, kjt_of_rows(request_rows(PROFILE, cand, GENRES), features))


def test_dense_inputs_equal_the_counters_with_nulls_as_zero():
    names = tuple(f.name for f in DENSE_FEATURES)
    inputs = RankerInputs(SPARSE_FEATURES, names, GENRES, COUNTERS, n_rows=6)
    cand = [0, 1, 3]
    _, dense = inputs.build(PROFILE, np.array(cand))
    columns = {n: [PROFILE.counters.get(n)] * len(cand) if n.startswith("user_") else
               [COUNTERS.get(c, {}).get(n) for c in cand] for n in names}
    assert torch.equal(dense, torch.from_numpy(dense_inputs(columns, DENSE_FEATURES)))
    assert dense[1].tolist()[2:] == [0.0, 0.0]  # item 1 has no event yet: read as 0, as in training


def test_a_user_without_stars_reads_level_zero():
    profile = UserProfile(PROFILE.features, items=(1, 2, 3))
    features = (*SPARSE_FEATURES, HISTORY_FEATURE, HISTORY_RATING_FEATURE)
    kjt, _ = RankerInputs(features, (), GENRES, {}, n_rows=6).build(profile, np.array([0, 1]))
    assert kjt["hist_rating"].values().tolist() == [0, 0, 0, 0, 0, 0]
    assert kjt["hist_item_idx"].lengths().tolist() == [3, 3]
