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
  404 when the registry has no such version. With an admin token configured (``RECSYS_SERVING__ADMIN_TOKEN`` or
  ``serving.admin_token_file``) both need ``Authorization: Bearer <token>``; a missing or wrong token gets a 401.

Embedding versions: by default the retrieval embeddings are the run dir's newest export. ``--embedding-version V``
serves version ``V`` of the Delta registry ``gold.item_embeddings``; ``--embedding-version published`` serves the
version the publish gate points at and follows the pointer (on ``/admin/reload`` or with ``--watch-s``). A registry
version's HNSW index is built once, its recall@10 measured, and both saved with all their parameters
(``serving.registry.materialize``; the registry is read with delta-rs, never Spark).

Fallback (documented contract): an unknown ``item_id`` or ``user_id`` is not an error; the answer is the most
popular items (positive ratings in the train split) with ``"fallback": "popularity"``; a known user whose
candidates run short gets the list filled with unseen popular items (``source: "popularity"``).
Bad parameters (missing, not an integer, ``k`` outside [1, 100], ids outside int32) get a 422 naming the
parameter; no input yields a 5xx.

Reload: every request reads the current ``ServingBundle`` once and answers from it; a reload builds a whole new
bundle off the request path and replaces the reference in one assignment, so no request is dropped or sees a
mix of versions. A watcher thread (``--watch-s`` > 0) asks the policy every that many seconds.

The service binds 127.0.0.1 unless told otherwise. A ``--host`` beyond loopback (anything but 127.0.0.0/8, ``::1``
and ``localhost``) needs an admin token, else the service refuses to start (exit status 2); on loopback without one
``/admin/reload`` stays open to local processes.
"""

from __future__ import annotations

import argparse
import gc
import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.responses import PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from features.config import PlatformConfig, ServingConfig, load_config
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


def _frozen(bundle: ServingBundle) -> ServingBundle:
    """``bundle``, with every object alive now moved out of the cyclic garbage collector's reach (``gc.freeze``): a
    bundle holds about a million small objects (profiles, dicts) that never die while it is served, and a full
    collection walking them all stalls every request in flight for tens of milliseconds. A replaced bundle is
    then freed by reference counting alone (it holds no cycles of its own)."""
    gc.collect()
    gc.freeze()
    return bundle


class BundleHolder:
    """The served bundle: ``current`` is swapped whole; reloads are serialised by a lock (readers never wait)."""

    def __init__(self, cfg: PlatformConfig, spec: BundleSpec, policy: VersionChangePolicy = VersionChangePolicy()):
        self.cfg, self.spec, self.policy = cfg, spec, policy
        self.current: ServingBundle = _frozen(load_bundle(cfg, spec))
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
            new = _frozen(load_bundle(self.cfg, spec))
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
                    new = _frozen(load_bundle(self.cfg, self.spec))
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


class RequestMetrics:
    """ASGI middleware counting and timing every HTTP request by route template (a bounded label set: the routes,
    or ``other``) and status. Plain ASGI rather than ``@app.middleware("http")``, whose per-request task and
    streamed body cost a large share of a sub-millisecond answer.

    Args:
        app: the ASGI app it wraps.
        requests: Counter labelled (endpoint, status).
        latency: Histogram labelled (endpoint), in seconds.
    """

    def __init__(self, app, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # an exception before the response started is answered 500 by the server

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")  # the router sets it on this scope
            self.latency.labels(endpoint).observe(time.perf_counter() - t0)
            self.requests.labels(endpoint, str(status)).inc()


def _json(answer: BaseModel) -> Response:
    """``answer`` serialised once (pydantic's own JSON encoder). Returned as a ``Response``, FastAPI neither dumps it
    to a dict nor validates it a second time against the route's ``response_model``, which still documents it."""
    return Response(answer.model_dump_json(), media_type="application/json")


def _items(scored: list[Scored]) -> list[ScoredItem]:
    return [ScoredItem(item_id=s.item_id, score=s.score, source=s.source) for s in scored]


# ------------------------------------------------------------------------------------------ admin authentication
TOKEN_SETTING = "RECSYS_SERVING__ADMIN_TOKEN (or serving.admin_token_file in the YAML config)"


class AdminTokenError(PlatformError):
    """The admin token is configured but unusable: its file is unreadable or empty, it is not a bearer token
    (printable ASCII without spaces), or both ``serving.admin_token`` and ``serving.admin_token_file`` are set.
    The message names the setting or file, never the token."""


class AdminAuthRequiredError(PlatformError):
    """The service would bind beyond loopback with no admin token, leaving ``POST /admin/reload`` open."""

    def __init__(self, host: str) -> None:
        super().__init__(f"--host {host!r} is beyond loopback and no admin token is configured, so anyone who can "
                         f"reach the port could reload the service; set {TOKEN_SETTING}, or bind 127.0.0.1")
        self.host = host


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine: an address in 127.0.0.0/8, ``::1`` (also as
    ``[::1]`` or IPv4-mapped ``::ffff:127.x.y.z``) or the name ``localhost``. Any other name counts as beyond
    loopback, as it may resolve to any address.

    >>> [is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost")]
    [True, True, True, True]
    >>> [is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org", "")]
    [False, False, False, False, False]
    """
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False                                    # a host name other than localhost
    mapped = getattr(address, "ipv4_mapped", None)      # ::ffff:127.0.0.1 is IPv4 loopback
    return (mapped or address).is_loopback


def admin_auth_required(host: str, token: SecretStr | None) -> bool:
    """Whether ``POST /admin/reload`` asks for the bearer token when the service binds ``host``: whenever a token
    is configured; never on loopback without one (only local processes reach it, as before tokens existed).

    >>> admin_auth_required("127.0.0.1", None), admin_auth_required("0.0.0.0", SecretStr("s3cret"))
    (False, True)

    Raises:
        AdminAuthRequiredError: ``host`` is beyond loopback (``is_loopback``) and ``token`` is None.
    """
    if token is not None:
        return True
    if not is_loopback(host):
        raise AdminAuthRequiredError(host)
    return False


def _checked_token(text: str, source: str) -> SecretStr:
    token = text.strip()
    if not token:
        raise AdminTokenError(f"{source} is empty; put the token there, or unset it to serve without one "
                              f"(loopback only)")
    if not all("!" <= c <= "~" for c in token):
        raise AdminTokenError(f"{source} holds spaces or characters outside printable ASCII, which an "
                              f"'Authorization: Bearer' header cannot carry; use e.g. `openssl rand -hex 32`")
    return SecretStr(token)


def resolve_admin_token(serving: ServingConfig) -> SecretStr | None:
    """The admin token: ``serving.admin_token`` (surrounding whitespace stripped), else the stripped content of
    the UTF-8 file ``serving.admin_token_file``, else None (no token: ``/admin/reload`` is open).

    Raises:
        AdminTokenError: both settings are set; the file is missing, unreadable or not UTF-8; the token is empty
            or not printable ASCII without spaces. The message names the setting or file, never the token.
    """
    if serving.admin_token is not None and serving.admin_token_file is not None:
        raise AdminTokenError("both serving.admin_token (RECSYS_SERVING__ADMIN_TOKEN) and serving.admin_token_file "
                              "are set; keep one")
    if serving.admin_token is not None:
        return _checked_token(serving.admin_token.get_secret_value(),
                              "serving.admin_token (RECSYS_SERVING__ADMIN_TOKEN)")
    if serving.admin_token_file is None:
        return None
    path = serving.admin_token_file
    source = f"the admin token file {str(path)!r} (serving.admin_token_file)"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise AdminTokenError(f"cannot read {source}: {reason}; create it with the token, readable by this "
                              f"user, or point RECSYS_SERVING__ADMIN_TOKEN_FILE elsewhere") from e
    return _checked_token(text, source)


def _bearer_check(token: SecretStr) -> Callable[..., None]:
    """A FastAPI dependency that lets a request through only with ``Authorization: Bearer <token>`` (the scheme
    case-insensitive, RFC 6750), comparing in constant time; else 401 with ``WWW-Authenticate: Bearer``."""
    expected = token.get_secret_value().encode()
    bearer = HTTPBearer(auto_error=False, description="the admin token (serving.admin_token)")

    def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        # Starlette decodes headers as latin-1, so any header re-encodes; a non-ASCII one just never matches.
        given = credentials.credentials.encode() if credentials is not None else b""
        if hmac.compare_digest(given, expected):
            return
        client = request.client.host if request.client else "?"
        detail = ("wrong bearer token" if credentials is not None else
                  "missing 'Authorization: Bearer <token>' header") + " for the admin token (serving.admin_token)"
        log.warning("refused %s %s from %s: %s", request.method, request.url.path, client, detail)
        raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})

    return check


def create_app(cfg: PlatformConfig, model: str | None = None, spec: BundleSpec | None = None,
               watch_s: float = 0.0, admin_token: SecretStr | None = None) -> FastAPI:
    """Build the service over ``cfg.run_dir``.

    Args:
        model: the retrieval model (default: ``cfg.models.retrieval``; ignored when ``spec`` is given).
        spec: models and candidate-generation parameters.
        watch_s: seconds between reload checks by a watcher thread; 0 disables it.
        admin_token: the bearer token ``POST /admin/reload`` requires (``resolve_admin_token``); None leaves it
            open, which only a loopback bind may do (``admin_auth_required``).

    Raises:
        ValueError: ``admin_token`` is empty.
        IndexFileError: the retrieval model has not been exported.
        BundleError: the ranker's weights do not fit its configuration.
    """
    if admin_token is not None and not admin_token.get_secret_value():
        raise ValueError("create_app: admin_token is empty; pass None for an open /admin/reload (loopback only) "
                         "or a non-empty token")
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

    app.add_middleware(RequestMetrics, requests=requests, latency=latency)

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        b = holder.current
        return HealthResponse(status="ok", model_version=b.version, ranker_version=b.ranker_version,
                              retrieval_model=b.spec.retrieval_model, retrieval_version=b.retrieval_version,
                              retrieval_source=b.spec.source, items=b.index.ntotal, users=len(b.users),
                              ef_search=b.index.ef_search, recall_at_10=b.index.extra.get("recall@10"))

    @app.get("/similar-items", response_model=SimilarItemsResponse)
    async def similar_items(item_id: int = Query(..., ge=0, le=INT32_MAX, description="item id of the data source"),
                            k: int = Query(10, ge=1, le=MAX_K, description="number of items")) -> Response:
        """The ``k`` items most similar (cosine) to ``item_id``; popularity fallback for an unknown item."""
        b = holder.current
        scored, fallback = b.similar_items(item_id, k)
        return _json(SimilarItemsResponse(item_id=item_id, model_version=b.version, fallback=fallback,
                                          items=_items(scored)))

    @app.get("/recommend", response_model=RecommendResponse)
    async def recommend(user_id: int = Query(..., ge=0, le=INT32_MAX, description="user id of the data source"),
                        k: int = Query(10, ge=1, le=MAX_K, description="number of items")) -> Response:
        """Top-``k`` items for ``user_id``: ANN candidates ranked by the ranker; popularity fallback if unknown."""
        b = holder.current
        scored, fallback = b.recommend(user_id, k)
        return _json(RecommendResponse(user_id=user_id, model_version=b.version, fallback=fallback,
                                       items=_items(scored)))

    @app.post("/admin/reload", response_model=ReloadResponse,
              dependencies=[Depends(_bearer_check(admin_token))] if admin_token is not None else [],
              responses={401: {"description": "missing or wrong 'Authorization: Bearer <token>' (only when an admin "
                                              "token is configured)"},
                         404: {"description": "the registry has no such version"},
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
    p = argparse.ArgumentParser(description="recsys serving: /similar-items, /recommend, /health, /metrics",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (loopback by default; any other needs an admin token: "
                        "RECSYS_SERVING__ADMIN_TOKEN or serving.admin_token_file)")
    p.add_argument("--port", type=int, default=8000)
    # Model names are checked after parsing: the registry imports every model (torch), which --help must not wait for
    p.add_argument("--retrieval", default=None, metavar="NAME",
                   help="registered model whose item embeddings give candidates and similar items (a model with an "
                        "item table; default: the configuration's models.retrieval)")
    p.add_argument("--ranker", default=None, metavar="NAME",
                   help="registered ranker that orders the candidates of /recommend (default: the "
                        "configuration's models.ranker)")
    p.add_argument("--recent-items", type=int, default=BundleSpec.recent_items,
                   help="most recent items of a user used as ANN queries")
    p.add_argument("--per-item", type=int, default=BundleSpec.per_item, help="ANN neighbours per recent item")
    p.add_argument("--watch-s", type=float, default=0.0, help="seconds between reload checks; 0: only on POST")
    p.add_argument("--embedding-version", default=None, metavar="VERSION|published",
                   help="serve this version of the registry gold.item_embeddings, or 'published': the version the "
                        "publish gate points at (default: the run dir's newest export)")
    p.add_argument("--hnsw-m", type=int, default=HnswParams.m, help="HNSW M of an index built for a registry version")
    p.add_argument("--ef-construction", type=int, default=HnswParams.ef_construction)
    p.add_argument("--ef-search", type=int, default=HnswParams.ef_search)
    p.add_argument("--threads", type=int, default=1, help="torch and faiss threads per request")
    args = p.parse_args(argv)
    import faiss
    import torch
    import uvicorn

    from serving.embeddings import embedding_models
    from training.registry import list_models

    if args.retrieval is not None and args.retrieval not in embedding_models():
        p.error(f"argument --retrieval: {args.retrieval!r} is not a model with item embeddings; choose from "
                f"{', '.join(embedding_models())}")
    if args.ranker is not None and args.ranker not in list_models("ranker"):
        p.error(f"argument --ranker: {args.ranker!r} is not a registered ranker; choose from "
                f"{', '.join(list_models('ranker'))}")
    cfg = load_config()
    try:  # before anything is loaded: a refused bind needs no run dir
        admin_token = resolve_admin_token(cfg.serving)
        admin_auth_required(args.host, admin_token)
    except (AdminTokenError, AdminAuthRequiredError) as e:
        p.exit(2, f"serving.app: error: {e}\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    source = {None: "export", "published": "published"}.get(args.embedding_version, "registry")
    spec = BundleSpec(args.retrieval or cfg.models.retrieval, args.ranker or cfg.models.ranker, args.recent_items,
                      args.per_item, source=source,
                      version=args.embedding_version if source == "registry" else None,
                      hnsw=HnswParams(args.hnsw_m, args.ef_construction, args.ef_search))
    app = create_app(cfg, spec=spec, watch_s=args.watch_s, admin_token=admin_token)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def __getattr__(name: str):  # ``uvicorn serving.app:app`` builds the app on first access, not at import
    if name == "app":  # uvicorn's own --host is unknown here: the token is enforced if set, the bind not checked
        cfg = load_config()
        return create_app(cfg, admin_token=resolve_admin_token(cfg.serving))
    raise AttributeError(name)


if __name__ == "__main__":
    raise SystemExit(main())
