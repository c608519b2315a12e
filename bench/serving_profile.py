"""Where a request's time goes: ``python -m bench.serving_profile`` (run ``make demo`` first).

In one process, over the demo's artifacts, with torch and faiss on one thread as the service runs them:
1. ``/recommend``'s own work per known user, split into its steps: ANN candidates (``ServingBundle.candidates``),
   the ranker's inputs (``RankerInputs.build``), the ranker's forward pass, and the whole ``recommend`` call;
2. the same requests through the ASGI app without a socket (``httpx.ASGITransport``), for ``/similar-items`` and
   ``/recommend``, and ``/similar-items`` through the plain app of ``bench.plain_serving``: the framework's share.

Milliseconds per request, the mean of ``--repeats`` passes over the same ids after one warm-up pass. Writes
``bench/results/serving-profile.json`` (with commit, UTC time and load average); the figures bound what
``bench.serving_load`` can reach on one process: at C closed-loop connections the mean latency is at least
C x the per-request time (Little's law).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from datetime import datetime, timezone

import numpy as np

from bench.report import machine
from bench.serving_load import _commit
from features.config import ROOT, load_config

RESULTS = ROOT / "bench" / "results" / "serving-profile.json"


def _ms_per(fn, ids: list[int], repeats: int) -> float:
    for i in ids:  # warm-up
        fn(i)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in ids:
            fn(i)
    return (time.perf_counter() - t0) / (repeats * len(ids)) * 1e3


async def _asgi_ms(app, path: str, param: str, ids: list[int], repeats: int) -> float:
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://profile") as client:
        for i in ids:
            (await client.get(path, params={param: i})).raise_for_status()
        t0 = time.perf_counter()
        for _ in range(repeats):
            for i in ids:
                await client.get(path, params={param: i})
        return (time.perf_counter() - t0) / (repeats * len(ids)) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--users", type=int, default=300, help="known users profiled (the first ones)")
    p.add_argument("--items", type=int, default=1000, help="known items profiled (the first ones)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help=f"print only; leave {RESULTS.name} alone")
    args = p.parse_args(argv)

    import faiss
    import torch

    from bench.plain_serving import create_plain_app
    from serving.app import create_app
    from serving.embeddings import embeddings_dir

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    cfg = load_config()
    load_before = os.getloadavg()
    app = create_app(cfg)
    bundle = app.state.holder.current
    users, items = list(bundle.users)[:args.users], list(bundle.row_of_id)[:args.items]

    def forward(u: int) -> None:
        profile = bundle.users[u]
        features, dense = bundle.ranker_inputs.build(profile, np.asarray(bundle.candidates(profile)))
        with torch.inference_mode():
            bundle.ranker.module(features, dense)

    candidates = _ms_per(lambda u: bundle.candidates(bundle.users[u]), users, args.repeats)
    inputs = _ms_per(lambda u: bundle.ranker_inputs.build(bundle.users[u],
                                                          np.asarray(bundle.candidates(bundle.users[u]))),
                     users, args.repeats) - candidates
    steps = {
        "candidates_ms": candidates,
        "ranker_inputs_ms": inputs,
        "ranker_forward_ms": _ms_per(forward, users, args.repeats) - candidates - inputs,
        "recommend_ms": _ms_per(lambda u: bundle.recommend(u, 10), users, args.repeats),
        "similar_items_ms": _ms_per(lambda i: bundle.similar_items(i, 10), items, args.repeats),
        "mean_candidates": float(np.mean([len(bundle.candidates(bundle.users[u])) for u in users])),
    }
    plain = create_plain_app(embeddings_dir(cfg, cfg.models.retrieval))
    asgi = {
        "service_similar_items_ms": asyncio.run(_asgi_ms(app, "/similar-items", "item_id", items, args.repeats)),
        "plain_similar_items_ms": asyncio.run(_asgi_ms(plain, "/similar-items", "item_id", items, args.repeats)),
        "service_recommend_ms": asyncio.run(_asgi_ms(app, "/recommend", "user_id", users, args.repeats)),
    }
    result = {"commit": _commit(), "measured_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "machine": machine(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
              "settings": {"users": len(users), "items": len(items), "repeats": args.repeats, "k": 10,
                           "ranker": bundle.spec.ranker_model, "retrieval": bundle.spec.retrieval_model,
                           "threads": 1},
              "bundle": steps, "asgi": asgi}
    print(json.dumps(result, indent=1))
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
