"""Where the skip-gram trainer's time goes: ``python -m bench.sgns_step`` (no data needed).

Issue #15 asks the SGNS trainer (item2vec, DeepWalk, Node2vec) for at least gensim's pairs/s on one worker; the
last side-by-side run (``make bench-models``) had ours 6.1x slower. This measures one SGNS step as the trainer runs
it -- the registered item2vec model (K = 5 negatives, D = 32) built and sharded by ``training.trainer._build`` on one
gloo rank, fused row-wise Adagrad in backward, torch on one thread -- split into building the KeyedJaggedTensor, the
forward pass with the loss, and the backward pass with the fused table update, at several batch sizes B, on random
pairs over ML-100K's 1,683 item rows.

The model reads its two tables through one ``EmbeddingCollection`` (unpooled lookups: the center feature, B ids,
and one targets feature, B x (1 + K) ids; ``training.data.sgns_kjt``). Beside it, the same step in the
layout the model had before (a pooled ``EmbeddingBagCollection`` with 2 + K features of one id each,
``_pooled_kjt``), the reference the new layout is measured against.

At each B the two layouts' steps are interleaved, so that other processes on a shared machine slow them alike;
pairs/s is given at the mean and at the median step. Writes
``bench/results/sgns-step.json`` (commit, UTC time, load average, settings, ms per step and pairs/s).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np

from bench.report import machine
from bench.serving_load import _commit
from features.config import ROOT

RESULTS = ROOT / "bench" / "results" / "sgns-step.json"
NUM_ITEMS, DIM, NEGATIVES = 1683, 32, 5


def _pooled_kjt(center, context, negatives):
    """The KJT of the layout before: keys ``center``, ``context``, ``neg_0..neg_{K-1}``, one id per row.

    Args:
        center: (B,) item indices; context: (B,); negatives: (B, K).
    """
    import torch
    from torchrec import KeyedJaggedTensor

    b, k = negatives.shape
    keys = ["center", "context", *[f"neg_{i}" for i in range(k)]]
    values = torch.cat([center, context, negatives.t().reshape(-1)]).to(torch.int64)  # key-major (2 + K) * B
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values,
                                               lengths=torch.ones(len(keys) * b, dtype=torch.int64))


def _pooled_model():
    """The layout before: both tables in one EmbeddingBagCollection read by 2 + K one-id features (center; context
    and the negatives); forward -> logits (B, 1 + K)."""
    import torch
    from torch import nn
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    targets = ["context", *[f"neg_{k}" for k in range(NEGATIVES)]]

    class Tables(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sparse_arch = EmbeddingBagCollection([
                EmbeddingBagConfig(name="t_in", embedding_dim=DIM, num_embeddings=NUM_ITEMS, feature_names=["center"]),
                EmbeddingBagConfig(name="t_out", embedding_dim=DIM, num_embeddings=NUM_ITEMS,
                                   feature_names=targets)], device=torch.device("meta"))

        def forward(self, kjt):
            pooled = self.sparse_arch(kjt).to_dict()  # {feature: (B, D)}
            out = torch.stack([pooled[name] for name in targets], dim=1)  # (B, 1 + K, D)
            return (pooled["center"].unsqueeze(1) * out).sum(2)  # (B, 1 + K)

    return Tables()


def _step(dmp, make_kjt, center, context, negatives) -> tuple[float, float, float]:
    """One SGNS step; seconds spent building the KJT, in the forward pass with the loss, in the backward pass."""
    from training.models.item2vec import sgns_loss

    t0 = time.perf_counter()
    kjt = make_kjt(center, context, negatives)
    t1 = time.perf_counter()
    loss = sgns_loss(dmp(kjt))
    t2 = time.perf_counter()
    loss.backward()  # the fused row-wise Adagrad updates the tables here
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def measure(layouts: dict, batches: list[int], steps: int, warmup: int = 5) -> dict:
    """Per layout and batch size: mean ms per step of each part over ``steps`` steps after ``warmup``, pairs/s at
    the mean step and at the median step. At each batch size in turn the layouts' steps are interleaved (one step of
    each a round), so that other processes' bursts on a shared machine hit them alike; batch sizes are not
    interleaved, as a small batch's step after a large one's pays for the memory the large one gave back.

    Args:
        layouts: ``{name: (model with its tables on meta, make_kjt(center, context, negatives))}``.
        batches: the batch sizes B.
    """
    import torch

    from training.trainer import _build

    opts = SimpleNamespace(lr_sparse=0.2, sharding="planner", lr_dense=1e-3, weight_decay=0.0)
    dmps = {name: (_build(model, opts, 1, 0, torch.device("cpu"))[0], make) for name, (model, make) in layouts.items()}
    rng = np.random.default_rng(0)
    parts = {(name, b): [] for name in dmps for b in batches}
    for b in batches:
        for s in range(steps + warmup):
            pairs = (torch.from_numpy(rng.integers(1, NUM_ITEMS, b)), torch.from_numpy(rng.integers(1, NUM_ITEMS, b)),
                     torch.from_numpy(rng.integers(1, NUM_ITEMS, (b, NEGATIVES))))
            for name, (dmp, make) in dmps.items():
                took = _step(dmp, make, *pairs)
                if s >= warmup:
                    parts[name, b].append(took)
    out = {name: [] for name in dmps}
    for (name, b), took in parts.items():
        ms = np.mean(took, axis=0) * 1e3  # (3,)
        out[name].append({"batch": b, "kjt_ms": round(ms[0], 3), "forward_ms": round(ms[1], 3),
                          "backward_ms": round(ms[2], 3), "pairs_per_s": round(b / (ms.sum() / 1e3)),
                          "pairs_per_s_median": round(b / np.median(np.sum(took, axis=1)))})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batches", default="4096,16384", help="batch sizes B (pairs per step), comma-separated")
    p.add_argument("--steps", type=int, default=30, help="timed steps per layout and batch size")
    p.add_argument("--model-only", action="store_true", help="skip the pooled layout of before")
    p.add_argument("--no-write", action="store_true", help=f"print only; leave {RESULTS.name} alone")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from training.data import sgns_kjt
    from training.registry import get_model

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("gloo", rank=0, world_size=1)
    spec = get_model("item2vec")
    load_before = os.getloadavg()
    layouts = {"model: one EmbeddingCollection (2 features)":
               (spec.build({"item": NUM_ITEMS}, spec.default_config(), sparse_device=torch.device("meta")), sgns_kjt)}
    if not args.model_only:
        layouts["before: pooled EmbeddingBagCollection (2 + K features)"] = (_pooled_model(), _pooled_kjt)
    rows = measure(layouts, [int(x) for x in args.batches.split(",")], args.steps)
    dist.destroy_process_group()
    result = {"commit": _commit(), "measured_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "machine": machine(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
              "settings": {"items": NUM_ITEMS, "dim": DIM, "negatives": NEGATIVES, "steps": args.steps, "threads": 1,
                           "ranks": 1, "sparse_optimizer": "fused row-wise Adagrad", "layouts_interleaved": True},
              "layouts": rows}
    print(json.dumps(result, indent=1))
    if not args.no_write:
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
