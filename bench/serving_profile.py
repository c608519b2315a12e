"""Where a request's time goes: ``python -m bench.serving_profile`` (run ``make demo`` first).

In one process, over the demo's artifacts, with torch and faiss on one thread as the service runs them:
1. ``/recommend``'s own work per known user, split into its steps: ANN candidates (``ServingBundle.candidates``),
   the ranker's inputs (``RankerInputs.build``), the ranker's forward pass as served (lookups fused,
   ``serving.fused``; on inputs built beforehand), and the whole ``recommend`` call; beside them, on the same
   users, what the fast paths replaced: one HNSW search per request (``ann_search_ms``, the search alone) and the
   model's own forward, rebuilt unfused from its folder (``ranker_forward_own_ms``);
2. the same requests through the ASGI app without a socket (``httpx.ASGITransport``), for ``/similar-items`` and
   ``/recommend``, and ``/similar-items`` through the plain app of ``bench.plain_serving``: the framework's share,
   with the in-process client's own cost in it;
3. the same requests handed to the app directly (``app(scope, receive, send)``, no client): the server's share.

Milliseconds per request, the mean of ``--repeats`` passes over the same ids after one warm-up pass (which also
fills the neighbour cache of ``candidates``, as the service's first requests do), in elapsed time or, with
``--clock cpu``, in this process's CPU time (steadier while other processes share the cores; the in-process
client's share of the ``asgi`` figures is then counted too, as it is in elapsed time). ``fused_max_abs_diff`` is the
largest difference between the served and the model's own logits over the profiled users' requests. Writes
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
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # seconds


def _ms_per(fn, ids: list[int], repeats: int, clock=time.perf_counter) -> float:
    for i in ids:  # warm-up
        fn(i)
    t0 = clock()
    for _ in range(repeats):
        for i in ids:
            fn(i)
    return (clock() - t0) / (repeats * len(ids)) * 1e3


async def _asgi_ms(app, path: str, param: str, ids: list[int], repeats: int, clock=time.perf_counter) -> float:
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://profile") as client:
        for i in ids:
            (await client.get(path, params={param: i})).raise_for_status()
        t0 = clock()
        for _ in range(repeats):
            for i in ids:
                await client.get(path, params={param: i})
        return (clock() - t0) / (repeats * len(ids)) * 1e3


async def _direct_ms(app, path: str, param: str, ids: list[int], repeats: int, clock=time.perf_counter) -> float:
    """Milliseconds per ``GET path?param=<id>&k=10`` handed to the ASGI ``app`` as uvicorn hands it one, without a
    client: routing, validation, the endpoint, serialisation and the middleware."""
    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"{path}: status {message['status']}")

    def scope(i: int) -> dict:
        return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                "query_string": f"{param}={i}&k=10".encode(), "headers": [(b"host", b"profile")],
                "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    for i in ids:
        await app(scope(i), receive, send)
    t0 = clock()
    for _ in range(repeats):
        for i in ids:
            await app(scope(i), receive, send)
    return (clock() - t0) / (repeats * len(ids)) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--users", type=int, default=300, help="known users profiled (the first ones)")
    p.add_argument("--items", type=int, default=1000, help="known items profiled (the first ones)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help=f"print only; leave {RESULTS.name} alone")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time (what a client sees); cpu: this process's CPU time, steadier while "
                        "other processes share the cores")
    args = p.parse_args(argv)

    import faiss
    import torch

    from bench.plain_serving import create_plain_app
    from serving.app import create_app
    from serving.embeddings import embeddings_dir, model_dir
    from training.artifacts import load_model

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    clock = CLOCKS[args.clock]
    cfg = load_config()
    load_before = os.getloadavg()
    app = create_app(cfg)
    bundle = app.state.holder.current
    users, items = list(bundle.users)[:args.users], list(bundle.row_of_id)[:args.items]

    own = load_model(model_dir(cfg, bundle.spec.ranker_model)).module  # unfused, as the model defines it

    requests = {u: bundle.ranker_inputs.build(bundle.users[u], np.asarray(bundle.candidates(bundle.users[u])))
                for u in users}  # (KJT, dense) of each user's candidates, built once: the forward passes alone

    def forward(module):
        def run(u: int) -> None:
            with torch.inference_mode():
                module(*requests[u])
        return run

    def search(u: int) -> None:  # the candidates' ANN step without the neighbour cache: one search per request
        rows = [bundle.row_of_idx[i] for i in bundle.users[u].items if i in bundle.row_of_idx]
        if rows:
            bundle.index.search(bundle.vectors[rows[-bundle.spec.recent_items:]], bundle.neighbours.k)

    def logit_diff(u: int) -> float:
        with torch.inference_mode():
            return (bundle.ranker.module(*requests[u]) - own(*requests[u])).abs().max().item()

    def ms(fn, ids: list[int]) -> float:
        return _ms_per(fn, ids, args.repeats, clock)

    def through(measure, served, path: str, param: str, ids: list[int]) -> float:
        return asyncio.run(measure(served, path, param, ids, args.repeats, clock))

    candidates = ms(lambda u: bundle.candidates(bundle.users[u]), users)
    inputs = ms(lambda u: bundle.ranker_inputs.build(bundle.users[u], np.asarray(bundle.candidates(bundle.users[u]))),
                users) - candidates
    steps = {
        "candidates_ms": candidates,
        "ann_search_ms": ms(search, users),
        "ranker_inputs_ms": inputs,
        "ranker_forward_ms": ms(forward(bundle.ranker.module), users),
        "ranker_forward_own_ms": ms(forward(own), users),
        "recommend_ms": ms(lambda u: bundle.recommend(u, 10), users),
        "similar_items_ms": ms(lambda i: bundle.similar_items(i, 10), items),
        "mean_candidates": float(np.mean([len(bundle.candidates(bundle.users[u])) for u in users])),
        "fused_max_abs_diff": max(logit_diff(u) for u in users),
    }
    plain = create_plain_app(embeddings_dir(cfg, cfg.models.retrieval))
    asgi = {
        "service_similar_items_ms": through(_asgi_ms, app, "/similar-items", "item_id", items),
        "plain_similar_items_ms": through(_asgi_ms, plain, "/similar-items", "item_id", items),
        "service_recommend_ms": through(_asgi_ms, app, "/recommend", "user_id", users),
    }
    direct = {
        "service_similar_items_ms": through(_direct_ms, app, "/similar-items", "item_id", items),
        "service_recommend_ms": through(_direct_ms, app, "/recommend", "user_id", users),
    }
    result = {"commit": _commit(), "measured_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "machine": machine(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
              "settings": {"users": len(users), "items": len(items), "repeats": args.repeats, "k": 10,
                           "ranker": bundle.spec.ranker_model, "retrieval": bundle.spec.retrieval_model,
                           "threads": 1, "clock": args.clock},
              "bundle": steps, "asgi": asgi, "asgi_direct": direct}
    print(json.dumps(result, indent=1))
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
