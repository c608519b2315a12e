"""The item graph and the random walks of DeepWalk / node2vec (training.modules.item_graph), and the skip-gram task
training on a model's corpus (``ModelSpec.corpus``):

- the graph's weights by hand on a tiny sequence set;
- DeepWalk's transition frequencies match the edge weights (within a binomial bound);
- node2vec's second-order transitions match ``alpha(t, x) * w(v, x)`` normalised, and p / q move the return and
  outward rates in the stated direction;
- a seed gives the same walks; the skip-gram task's sentences are the model's walks, the users' sequences without a
  corpus; the walk models' configs check their options; a tiny training separates two communities.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy import sparse

from features.tables import ITEM_SEQUENCES, parquet_export
from training.modules.item_graph import item_graph, random_walks, walk_corpus
from training.registry import ModelOptionError, get_model

WALK_MODELS = ("deepwalk", "node2vec")


def _weighted_graph():
    """5 nodes (0 isolated): a triangle 1-2-3 with a tail 3-4, weights 1..4 by hand."""
    w = np.zeros((5, 5))
    for a, b, weight in ((1, 2, 1.0), (2, 3, 3.0), (1, 3, 2.0), (3, 4, 4.0)):
        w[a, b] = w[b, a] = weight
    return sparse.csr_matrix(w), w


def _within(count: np.ndarray, total: np.ndarray, p: np.ndarray, sigmas: float = 5.0) -> np.ndarray:
    """Whether observed counts fit binomial(total, p) within ``sigmas`` standard deviations (+1 for p near 0)."""
    return np.abs(count - total * p) <= sigmas * np.sqrt(total * p * (1 - p)) + 1


def test_graph_weights_by_hand():
    seqs = [np.array([1, 2, 3, 2]), np.array([3, 2, 5]), np.array([4, 4, 1]), np.array([6])]
    want = np.zeros((7, 7))
    # 1-2 once; 2-3 three times (2,3 / 3,2 / 3,2); 2-5 once; 4,4 no self-loop; 4-1 once; a lone 6 no edge
    for a, b, n in ((1, 2, 1), (2, 3, 3), (2, 5, 1), (1, 4, 1)):
        want[a, b] = want[b, a] = n
    g = item_graph(seqs)
    assert g.shape == (7, 7) and g.has_sorted_indices
    np.testing.assert_array_equal(g.toarray(), want)
    assert item_graph(seqs, num_nodes=10).shape == (10, 10)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        item_graph(seqs, num_nodes=5)


def test_deepwalk_transitions_follow_the_edge_weights():
    g, w = _weighted_graph()
    walks = random_walks(g, walks_per_node=200, walk_length=25, seed=1)
    assert walks.shape == (4 * 200, 25)
    # every node with an edge starts walks_per_node walks; the isolated node 0 never appears
    np.testing.assert_array_equal(np.bincount(walks[:, 0], minlength=5), [0, 200, 200, 200, 200])
    counts = np.zeros((5, 5))
    np.add.at(counts, (walks[:, :-1].ravel(), walks[:, 1:].ravel()), 1)
    assert (counts[w == 0] == 0).all()  # only edges are walked
    p = w[1:] / w[1:].sum(axis=1, keepdims=True)  # (4, 5) transition probabilities
    total = counts[1:].sum(axis=1, keepdims=True)
    assert (total > 1000).all()
    assert _within(counts[1:], total, p).all(), (counts[1:] / total).round(3)


def _second_order_counts(walks: np.ndarray, n: int) -> np.ndarray:
    """(N, N, N) counts of (previous, current, next) over the walks' second-order steps."""
    counts = np.zeros((n, n, n))
    np.add.at(counts, (walks[:, :-2].ravel(), walks[:, 1:-1].ravel(), walks[:, 2:].ravel()), 1)
    return counts


def _node2vec_probabilities(w: np.ndarray, p: float, q: float) -> np.ndarray:
    """(N, N, N) naive node2vec transition probabilities P(next x | previous t, current v) from the paper's alpha."""
    n = len(w)
    out = np.zeros((n, n, n))
    for t in range(n):
        for v in range(n):
            if w[t, v] == 0:
                continue
            alpha = np.array([1 / p if x == t else 1.0 if w[t, x] > 0 else 1 / q for x in range(n)])
            out[t, v] = alpha * w[v] / (alpha * w[v]).sum()
    return out


@pytest.mark.parametrize("p,q", [(0.25, 1.0), (4.0, 1.0), (1.0, 0.25), (1.0, 4.0)])
def test_node2vec_second_order_transitions_match_alpha_times_weight(p, q):
    g, w = _weighted_graph()
    walks = random_walks(g, walks_per_node=300, walk_length=30, seed=2, p=p, q=q)
    counts = _second_order_counts(walks, 5)
    want = _node2vec_probabilities(w, p, q)
    total = counts.sum(axis=2, keepdims=True)  # (t, v, 1) steps out of v having come from t
    seen = total[..., 0] > 0
    assert (want.sum(axis=2)[seen] > 0.99).all()  # no walk took a step from a non-edge (t, v)
    assert _within(counts, total, want).all()


def test_p_and_q_move_the_return_and_outward_rates():
    g, w = _weighted_graph()

    def rates(p: float, q: float) -> tuple[float, float]:
        walks = random_walks(g, walks_per_node=300, walk_length=30, seed=3, p=p, q=q)
        t, x = walks[:, :-2].ravel(), walks[:, 2:].ravel()
        returned = float(np.mean(t == x))
        outward = float(np.mean((t != x) & (w[t, x] == 0)))  # x two hops from t: not a neighbour of t
        return returned, outward

    low_p, base, high_p = rates(0.25, 1.0), rates(1.0, 1.0), rates(4.0, 1.0)
    assert low_p[0] > base[0] + 0.1 > high_p[0] + 0.2
    low_q, high_q = rates(1.0, 0.25), rates(1.0, 4.0)
    assert low_q[1] > base[1] + 0.05 > high_q[1] + 0.1


def test_a_seed_gives_the_same_walks():
    g, _ = _weighted_graph()
    for p, q in ((1.0, 1.0), (0.5, 2.0)):
        a = random_walks(g, walks_per_node=3, walk_length=12, seed=7, p=p, q=q)
        np.testing.assert_array_equal(a, random_walks(g, walks_per_node=3, walk_length=12, seed=7, p=p, q=q))
        assert not np.array_equal(a, random_walks(g, walks_per_node=3, walk_length=12, seed=8, p=p, q=q))
    assert random_walks(item_graph([np.array([1])]), 2, 5, seed=0).shape == (0, 5)
    with pytest.raises(ValueError, match="p and q"):
        random_walks(g, 1, 5, seed=0, q=0.0)
    with pytest.raises(ValueError, match="symmetric"):
        random_walks(sparse.csr_matrix(np.triu(g.toarray())), 1, 5, seed=0)


def _write_sequences(lake, seqs: list[list[int]]) -> None:
    out = Path(parquet_export(ITEM_SEQUENCES, lake))
    out.mkdir(parents=True)
    n = len(seqs)
    pq.write_table(pa.table({"user_id": np.arange(1, n + 1, dtype=np.int32),
                             "user_idx": np.arange(1, n + 1, dtype=np.int32),
                             "item_idx": pa.array(seqs, pa.list_(pa.int32())),
                             "seq_len": np.array([len(s) for s in seqs], np.int32)}), out / "part-0.parquet")


def _task(lake, name: str, seed: int = 5, **options):
    from training.tasks.context import TaskContext
    from training.tasks.skipgram import SkipGramTask

    spec = get_model(name)
    ctx = TaskContext(spec, spec.make_config(options), SimpleNamespace(seed=seed), str(lake), {"item": 12}, rank=0,
                      world_size=1, device=torch.device("cpu"), local_batch_size=64)
    return SkipGramTask(ctx)


# two communities, {1..5} and {6..10}, that no user's sequence joins
COMMUNITIES = [[1, 2, 3, 4, 5, 3, 1], [2, 4, 1, 5], [6, 7, 8, 9, 10, 8], [7, 9, 6, 10]] * 3


def test_skipgram_task_trains_on_the_models_walks(tmp_path):
    _write_sequences(tmp_path, COMMUNITIES)
    plain = _task(tmp_path, "item2vec")
    assert [s.tolist() for s in plain.sequences] == COMMUNITIES  # no corpus: the users' sequences
    for name in WALK_MODELS:
        task = _task(tmp_path, name, walks_per_node=2, walk_length=7)
        config = task.ctx.config
        want = walk_corpus(plain.sequences, 2, 7, seed=5, p=getattr(config, "p", 1.0), q=getattr(config, "q", 1.0))
        assert len(task.sequences) == 2 * 10 and all(len(s) == 7 for s in task.sequences)
        np.testing.assert_array_equal(np.stack(task.sequences), np.stack(want))
        assert not np.array_equal(np.stack(task.sequences), np.stack(_task(tmp_path, name, seed=6, walks_per_node=2,
                                                                           walk_length=7).sequences))


@pytest.mark.parametrize("name", WALK_MODELS)
def test_walk_model_options_are_checked(name):
    spec = get_model(name)
    assert spec.make_config({"walks_per_node": "3", "walk_length": "8"}).walk_length == 8
    with pytest.raises(ModelOptionError, match="walk_length"):
        spec.make_config({"walk_length": "1"})
    with pytest.raises(ModelOptionError, match="multiple of 4"):
        spec.make_config({"embedding_dim": "6"})
    with pytest.raises(ValueError, match="skipgram task only"):
        dataclasses.replace(spec, task="ctr", name=name)


def test_node2vec_rejects_non_positive_p_q():
    with pytest.raises(ModelOptionError, match="p and q"):
        get_model("node2vec").make_config({"q": "0"})


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # the task's float(loss)
@pytest.mark.parametrize("name", WALK_MODELS)
def test_tiny_training_separates_two_communities(name, tmp_path):
    """SGNS on the walks through the task's own batches and loss (unsharded): items of one community end up more
    alike than items of the two."""
    _write_sequences(tmp_path, COMMUNITIES)
    task = _task(tmp_path, name, walks_per_node=10, walk_length=10, embedding_dim=8, subsample=1.0)
    spec, config = task.ctx.spec, task.ctx.config
    torch.manual_seed(0)
    model = spec.build({"item": 12}, config)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.2)
    for epoch in range(3):
        for batch in task.batches(epoch):
            opt.zero_grad()
            task.loss(model, batch).backward()
            opt.step()
    emb = model.state_dict()[spec.item_table][1:11]
    emb = torch.nn.functional.normalize(emb, dim=1)
    cos = (emb @ emb.T).numpy()  # (10, 10)
    same = np.kron(np.eye(2), np.ones((5, 5))).astype(bool) & ~np.eye(10, dtype=bool)
    across = ~np.kron(np.eye(2), np.ones((5, 5))).astype(bool)
    assert cos[same].mean() > cos[across].mean() + 0.3, (cos[same].mean(), cos[across].mean())
