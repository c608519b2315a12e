"""The recommendation HTTP service (FastAPI; OpenAPI schema at ``/openapi.json``, docs at ``/docs``).

    python -m serving.app [--host 127.0.0.1] [--port 8000] [--retrieval NAME] [--ranker NAME] [--watch-s 0]
                          [--embedding-version VERSION|published]

Endpoints:
- ``GET /similar-items?item_id=&k=``: the ``k`` items most similar (cosine, HNSW) to an item, itself excluded.
- ``GET /recommend?user_id=&k=``: candidates from the ANN index via the user's recent items, ranked by the
  ranker (``--ranker``, any registered ranker; see ``serving.bundle`` for the exact rule).
- ``GET /health``: served versions and sizes. ``GET /metrics``: Prometheus text (``recsys_requests_total`` by
  endpoint and status, ``recsys_request_latency_seconds`` histogram by endpoint, ``recsys_model_info`` with the
  served versions as labels, ``recsys_reloads_total``).
- ``POST /admin/reload?force=``: load the versions now on disk if ``VersionChangePolicy`` says so.
  ``POST /admin/reload?version=V``: serve registry version ``V`` of the retrieval model from now on (hot swap);
  404 when the registry has no such version.

Embedding versions: by default the retrieval embeddings are the run dir's newest export. ``--embedding-version V``
serves version ``V`` of the Delta registry ``gold.item_embeddings``; ``--embedding-version published`` serves the
version the publish gate points at and follows the pointer (on ``/admin/reload`` or with ``--watch-s``). A registry
version's HNSW index is built once, its recall@10 measured, and both saved with all their parameters
(``serving.registry.materialize``; reading the registry needs Spark the first time).

Fallback (documented contract): an unknown ``item_id`` or ``user_id`` is not an error; the answer is the most
popular items (positive ratings in the train split) with ``"fallback": "popularity"``; a known user whose
candidates run short gets the list filled with unseen popular items (``source: "popularity"``).
Bad parameters (missing, not an integer, ``k`` outside [1, 100], ids outside int32) get a 422 naming the
parameter; no input yields a 5xx.

Reload: every request reads the current ``ServingBundle`` once and answers from it; a reload builds a whole new
bundle off the request path and replaces the reference in one assignment, so no request is dropped or sees a
mix of versions. A watcher thread (``--watch-s`` > 0) asks the policy every that many seconds.

The service binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import replace

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from features.config import PlatformConfig, load_config
from features.errors import PlatformError
from serving.ann import HnswParams
from serving.bundle import (BundleSpec, ReloadDecision, Scored, ServingBundle, VersionChangePolicy, load_bundle,
                            on_disk_versions)
from serving.registry import VERSION_PATTERN, VersionNotFoundError

log = logging.getLogger("serving.app")

MAX_K = 100
INT32_MAX = 2**31 - 1
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds


class ScoredItem(BaseModel):
    item_id: int
    score: float = Field(description="cosine similarity (ann), P(rating >= 4) (ann+<ranker>) or positive count "
                                     "(popularity)")
    source: str = Field(description="ann | ann+<ranker> | popularity")


class ItemsResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_version: str
    fallback: str | None = Field(None, description="'popularity' when the id is unknown, else null")
    items: list[ScoredItem]


class SimilarItemsResponse(ItemsResponse):
    item_id: int


class RecommendResponse(ItemsResponse):
    user_id: int


class HealthResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    status: str
    model_version: str
    ranker_version: str
    retrieval_model: str
    retrieval_version: str
    retrieval_source: str = Field(description="export | registry | published")
    items: int
    users: int
    ef_search: int
    recall_at_10: float | None = Field(description="the index's recall@10 against exact search, measured when it "
                                                   "was built")


class ReloadResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    decision: str
    model_version: str


class BundleHolder:
    """The served bundle: ``current`` is swapped whole; reloads are serialised by a lock (readers never wait)."""

    def __init__(self, cfg: PlatformConfig, spec: BundleSpec, policy: VersionChangePolicy = VersionChangePolicy()):
        self.cfg, self.spec, self.policy = cfg, spec, policy
        self.current: ServingBundle = load_bundle(cfg, spec)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def select(self, version: str) -> None:
        """Serve registry version ``version`` of the retrieval model from now on: build its bundle off the request
        path, then swap it in (the spec follows, so later reloads keep this version).

        Raises:
            VersionNotFoundError: the registry lacks the version.
            ValueError: not a valid version name.
            PlatformError: the version cannot be served (e.g. its index files disagree).
        """
        with self._lock:
            spec = replace(self.spec, source="registry", version=version)
            new = load_bundle(self.cfg, spec)
            old, self.spec, self.current = self.current, spec, new      # the atomic swap
            log.info("selected: %s -> %s", old.version, new.version)

    def maybe_reload(self, force: bool = False) -> ReloadDecision:
        """Ask the policy; on RELOAD build the new bundle and swap it in. Load errors keep the served bundle
        (logged) and return KEEP."""
        with self._lock:
            b = self.current
            try:
                on_disk = on_disk_versions(self.cfg, self.spec)
            except PlatformError:  # an unreadable publish pointer must not take the service down either
                log.exception("cannot read the versions to serve; still serving %s", b.version)
                return ReloadDecision.KEEP
            decision = self.policy.decide((b.ranker_version, b.retrieval_version), on_disk, force)
            if decision is ReloadDecision.RELOAD:
                try:
                    new = load_bundle(self.cfg, self.spec)
                except Exception:  # a half-written export must not take the service down
                    log.exception("reload failed; still serving %s", b.version)
                    return ReloadDecision.KEEP
                self.current = new                      # one reference assignment: the atomic swap
                log.info("reloaded: %s -> %s", b.version, new.version)
            return decision

    def watch(self, interval_s: float) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.maybe_reload()
        t = threading.Thread(target=loop, name="bundle-watcher", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()


def _items(scored: list[Scored]) -> list[ScoredItem]:
    return [ScoredItem(item_id=s.item_id, score=s.score, source=s.source) for s in scored]


def create_app(cfg: PlatformConfig, model: str | None = None, spec: BundleSpec | None = None,
               watch_s: float = 0.0) -> FastAPI:
    """Build the service over ``cfg.run_dir``.

    Args:
        model: the retrieval model (default: ``cfg.models.retrieval``; ignored when ``spec`` is given).
        spec: models and candidate-generation parameters.
        watch_s: seconds between reload checks by a watcher thread; 0 disables it.

    Raises:
        IndexFileError: the retrieval model has not been exported.
        BundleError: the ranker's weights do not fit its configuration.
    """
    holder = BundleHolder(cfg, spec or BundleSpec(retrieval_model=model or cfg.models.retrieval,
                                                  ranker_model=cfg.models.ranker))
    registry = CollectorRegistry()
    requests = Counter("recsys_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("recsys_request_latency_seconds", "request latency (seconds)", ["endpoint"],
                        buckets=LATENCY_BUCKETS, registry=registry)
    info = Gauge("recsys_model_info", "served versions (value 1)", ["model_version", "ranker_version",
                                                                     "retrieval_version"], registry=registry)
    reloads = Counter("recsys_reloads", "bundle reloads", registry=registry)

    app = FastAPI(title="recsys serving", version="1",
                  description=__doc__.split("\n\n", 2)[2].split("\n\nThe service binds")[0])
    app.state.holder = holder
    if watch_s > 0:
        holder.watch(watch_s)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")          # bounded label set: routes, or "other"
        latency.labels(endpoint).observe(time.perf_counter() - t0)
        requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.get("/health", response_model=HealthResponse)
    def health() -> HealthResponse:
        b = holder.current
        return HealthResponse(status="ok", model_version=b.version, ranker_version=b.ranker_version,
                              retrieval_model=b.spec.retrieval_model, retrieval_version=b.retrieval_version,
                              retrieval_source=b.spec.source, items=b.index.ntotal, users=len(b.users),
                              ef_search=b.index.ef_search, recall_at_10=b.index.extra.get("recall@10"))

    @app.get("/similar-items", response_model=SimilarItemsResponse)
    def similar_items(item_id: int = Query(..., ge=0, le=INT32_MAX, description="MovieLens item id"),
                      k: int = Query(10, ge=1, le=MAX_K, description="number of items")) -> SimilarItemsResponse:
        """The ``k`` items most similar (cosine) to ``item_id``; popularity fallback for an unknown item."""
        b = holder.current
        scored, fallback = b.similar_items(item_id, k)
        return SimilarItemsResponse(item_id=item_id, model_version=b.version, fallback=fallback,
                                    items=_items(scored))

    @app.get("/recommend", response_model=RecommendResponse)
    def recommend(user_id: int = Query(..., ge=0, le=INT32_MAX, description="MovieLens user id"),
                  k: int = Query(10, ge=1, le=MAX_K, description="number of items")) -> RecommendResponse:
        """Top-``k`` items for ``user_id``: ANN candidates ranked by the ranker; popularity fallback if unknown."""
        b = holder.current
        scored, fallback = b.recommend(user_id, k)
        return RecommendResponse(user_id=user_id, model_version=b.version, fallback=fallback, items=_items(scored))

    @app.post("/admin/reload", response_model=ReloadResponse,
              responses={404: {"description": "the registry has no such version"},
                         409: {"description": "the version exists but cannot be served"}})
    def reload(force: bool = Query(False, description="reload even when the versions are unchanged"),
               version: str | None = Query(None, pattern=VERSION_PATTERN, max_length=128,
                                           description="serve this registry version of the retrieval model")
               ) -> ReloadResponse:
        """Load the versions now on disk when the policy says so (or ``force``); with ``version``, switch to that
        registry version (hot swap: requests keep being answered by the old bundle until the new one is built)."""
        if version is not None:
            try:
                holder.select(version)
            except VersionNotFoundError as e:
                raise HTTPException(404, str(e)) from e
            except PlatformError as e:
                raise HTTPException(409, str(e)) from e
            reloads.inc()
            return ReloadResponse(decision=ReloadDecision.RELOAD.value, model_version=holder.current.version)
        decision = holder.maybe_reload(force)
        if decision is ReloadDecision.RELOAD:
            reloads.inc()
        return ReloadResponse(decision=decision.value, model_version=holder.current.version)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        b = holder.current
        info.clear()
        info.labels(b.version, b.ranker_version, b.retrieval_version).set(1)
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: list[str] | None = None) -> int:
    import faiss
    import torch
    import uvicorn

    p = argparse.ArgumentParser(description="recsys serving: /similar-items, /recommend, /health, /metrics")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    from serving.embeddings import MODELS
    from training.registry import list_models

    p.add_argument("--retrieval", default=None, choices=MODELS,
                   help="model whose embeddings give candidates and similar items (a model with an item table; "
                        "default: the configuration's models.retrieval)")
    p.add_argument("--ranker", default=None, choices=list_models("ranker"),
                   help="registered ranker that orders the candidates of /recommend (default: the "
                        "configuration's models.ranker)")
    p.add_argument("--recent-items", type=int, default=BundleSpec.recent_items)
    p.add_argument("--per-item", type=int, default=BundleSpec.per_item)
    p.add_argument("--watch-s", type=float, default=0.0, help="seconds between reload checks; 0: only on POST")
    p.add_argument("--embedding-version", default=None, metavar="VERSION|published",
                   help="serve this version of the registry gold.item_embeddings, or 'published': the version the "
                        "publish gate points at (default: the run dir's newest export)")
    p.add_argument("--hnsw-m", type=int, default=HnswParams.m, help="HNSW M of an index built for a registry version")
    p.add_argument("--ef-construction", type=int, default=HnswParams.ef_construction)
    p.add_argument("--ef-search", type=int, default=HnswParams.ef_search)
    p.add_argument("--threads", type=int, default=1, help="torch and faiss threads per request")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    source = {None: "export", "published": "published"}.get(args.embedding_version, "registry")
    cfg = load_config()
    spec = BundleSpec(args.retrieval or cfg.models.retrieval, args.ranker or cfg.models.ranker, args.recent_items,
                      args.per_item, source=source,
                      version=args.embedding_version if source == "registry" else None,
                      hnsw=HnswParams(args.hnsw_m, args.ef_construction, args.ef_search))
    app = create_app(cfg, spec=spec, watch_s=args.watch_s)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def __getattr__(name: str):  # ``uvicorn serving.app:app`` builds the app on first access, not at import
    if name == "app":
        return create_app(load_config())
    raise AttributeError(name)


if __name__ == "__main__":
    raise SystemExit(main())
