"""Where the skip-gram trainer's time goes: ``python -m bench.sgns_step`` (no data needed).

Issue #15 asks the SGNS trainer (item2vec, DeepWalk, Node2vec) for at least gensim's pairs/s on one worker; the
last side-by-side run (``make bench-models``) had ours 6.1x slower. This measures one SGNS step as the trainer runs
it -- the registered item2vec model (K = 5 negatives, D = 32) built and sharded by ``training.trainer._build`` on one
gloo rank, fused row-wise Adagrad in backward, torch on one thread -- split into building the KeyedJaggedTensor, the
forward pass with the loss, and the backward pass with the fused table update, at several batch sizes B, on random
pairs over ML-100K's 1,683 item rows.

Beside it, the same step with the tables laid out as one ``EmbeddingCollection`` (unpooled lookups: the center
feature, B ids, and one targets feature, B x (1 + K) ids) instead of the model's pooled ``EmbeddingBagCollection``
with 2 + K features of one id each: the same arithmetic through fewer, larger kernel calls, to size what that layout
would give before changing the model.

Writes ``bench/results/sgns-step.json`` (commit, UTC time, load average, settings, ms per step and pairs/s).
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


def _collection_model():
    """The alternative layout: both tables in one EmbeddingCollection; forward -> logits (B, 1 + K)."""
    import torch
    from torch import nn
    from torchrec import EmbeddingCollection, EmbeddingConfig

    class Tables(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sparse_arch = EmbeddingCollection([
                EmbeddingConfig(name="t_in", embedding_dim=DIM, num_embeddings=NUM_ITEMS, feature_names=["center"]),
                EmbeddingConfig(name="t_out", embedding_dim=DIM, num_embeddings=NUM_ITEMS,
                                feature_names=["targets"])], device=torch.device("meta"))

        def forward(self, kjt):
            out = self.sparse_arch(kjt)
            center, targets = out["center"].values(), out["targets"].values()  # (B, D), (B * (1 + K), D)
            return (center.unsqueeze(1) * targets.view(center.shape[0], NEGATIVES + 1, DIM)).sum(2)

    return Tables()


def _collection_kjt(center, context, negatives):
    import torch
    from torchrec import KeyedJaggedTensor

    b = len(center)
    values = torch.cat([center, torch.cat([context.unsqueeze(1), negatives], 1).reshape(-1)])
    lengths = torch.cat([torch.ones(b, dtype=torch.int64), torch.full((b,), NEGATIVES + 1, dtype=torch.int64)])
    return KeyedJaggedTensor.from_lengths_sync(keys=["center", "targets"], values=values, lengths=lengths)


def measure(model, make_kjt, batch: int, steps: int, warmup: int = 5) -> dict:
    """Mean ms per step of each part over ``steps`` steps after ``warmup``, and pairs/s."""
    import torch

    from training.models.item2vec import sgns_loss
    from training.trainer import _build

    dmp, _, _ = _build(model, SimpleNamespace(lr_sparse=0.2, sharding="planner", lr_dense=1e-3, weight_decay=0.0),
                       1, 0, torch.device("cpu"))
    rng = np.random.default_rng(0)
    n = (steps + warmup) * batch
    center, context = (torch.from_numpy(rng.integers(1, NUM_ITEMS, n)) for _ in range(2))
    negatives = torch.from_numpy(rng.integers(1, NUM_ITEMS, (n, NEGATIVES)))
    parts = np.zeros(3)
    for s in range(steps + warmup):
        rows = slice(s * batch, (s + 1) * batch)
        t0 = time.perf_counter()
        kjt = make_kjt(center[rows], context[rows], negatives[rows])
        t1 = time.perf_counter()
        loss = sgns_loss(dmp(kjt))
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        if s >= warmup:
            parts += (t1 - t0, t2 - t1, t3 - t2)
    ms = parts / steps * 1e3
    return {"batch": batch, "kjt_ms": round(ms[0], 3), "forward_ms": round(ms[1], 3), "backward_ms": round(ms[2], 3),
            "pairs_per_s": round(batch / (ms.sum() / 1e3))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batches", default="4096,16384", help="batch sizes B (pairs per step), comma-separated")
    p.add_argument("--steps", type=int, default=30, help="timed steps per batch size")
    p.add_argument("--no-write", action="store_true", help=f"print only; leave {RESULTS.name} alone")
    args = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from training.data import pairs_kjt
    from training.registry import get_model

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("gloo", rank=0, world_size=1)
    spec = get_model("item2vec")
    load_before = os.getloadavg()
    rows = {"model's pooled EmbeddingBagCollection (2 + K features)": [], "one EmbeddingCollection (2 features)": []}
    for b in (int(x) for x in args.batches.split(",")):
        model = spec.build({"item": NUM_ITEMS}, spec.default_config(), sparse_device=torch.device("meta"))
        rows["model's pooled EmbeddingBagCollection (2 + K features)"].append(measure(model, pairs_kjt, b, args.steps))
        rows["one EmbeddingCollection (2 features)"].append(measure(_collection_model(), _collection_kjt, b,
                                                                    args.steps))
    dist.destroy_process_group()
    result = {"commit": _commit(), "measured_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "machine": machine(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
              "settings": {"items": NUM_ITEMS, "dim": DIM, "negatives": NEGATIVES, "steps": args.steps, "threads": 1,
                           "ranks": 1, "sparse_optimizer": "fused row-wise Adagrad"},
              "layouts": rows}
    print(json.dumps(result, indent=1))
    if not args.no_write:
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
