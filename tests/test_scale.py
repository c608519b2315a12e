"""The scale run's code path on a small table (``training.scale``): a DIN item table that one worker's memory budget
cannot hold (the planner refuses a one-worker plan) is split by the planner over 2 Ray Train workers, each holding
only its shard -- its rows, their bytes and their Adagrad state -- within the budget."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

# the item table with its Adagrad state: 300,000 x (8 + 1) x 4 B = 10.3 MiB; the planner keeps part of each budget
# for the dense part and the inputs, so the budget must leave room for half the table plus that reservation
ITEMS, DIM, BUDGET_MIB = 300_000, 8, 8.0


def test_each_rank_holds_only_its_shard_within_the_budget(ray_cluster):
    from training.scale import MIB, ScaleOptions, one_worker_refused, run

    opts = ScaleOptions(num_items=ITEMS, embedding_dim=DIM, budget_mib=BUDGET_MIB, num_workers=2, steps=3,
                        batch_size=32, history=5)
    assert opts.table_bytes() == ITEMS * (DIM + 1) * 4 > BUDGET_MIB * MIB
    assert "insufficient storage" in one_worker_refused(opts)
    with pytest.raises(ValueError, match="fit one worker"):  # a table that fits one worker shows nothing
        one_worker_refused(ScaleOptions(num_items=1000, embedding_dim=DIM, budget_mib=BUDGET_MIB))

    out = run(opts)

    assert out["plan"]["t_item"] == "row_wise@rank0,1", out["plan"]
    key = "sparse_arch.sequence.embedding_collection.embeddings.t_item.weight"
    held = [r["rows"][key] for r in sorted(out["ranks"], key=lambda r: r["rank"])]
    assert sum(held) == ITEMS and all(0 < h < ITEMS for h in held), held  # the rows are split, none held twice
    for r, rows in zip(sorted(out["ranks"], key=lambda r: r["rank"]), held):
        side_rows = sum(n for k, n in r["rows"].items() if k != key)  # the small table-wise side tables it owns
        b = r["bytes"]
        assert b["tables"] == (rows + side_rows) * DIM * 4  # float32 shards, nothing more
        assert b["table_optimizer"] >= rows * 4  # row-wise Adagrad: one float per held row
        assert b["tables"] + b["table_optimizer"] <= BUDGET_MIB * MIB
        assert r["rss_end_mib"] > 0 and r["samples_per_s"] > 0
