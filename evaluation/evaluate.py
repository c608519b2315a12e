"""Stage ``evaluate`` (``python -m evaluation.evaluate``): every offline evaluation of the run, in one result.

The stage only orchestrates; each part is its module's:

1. the static replay of the test period (evaluation.replay; Li et al. 2011's replay method applied to top-K
   retrieval, on the cases of evaluation.cases): HR@K, NDCG@K, MRR@K of popularity and of every exported model
   on the same cases (a model with its own query encoder, e.g. MF's user vector, queried by it), and HR@K over K
   (``hr_curve``, K in ``evaluation.replay.CURVE_KS``); then every ranker trained in the run reorders the served
   retriever's (``models.retrieval``) first 100 candidates of every case with the case's point-in-time features
   (evaluation.ranking): HR@K, NDCG@K, MRR@K of the ranked lists beside each ranker's test AUC, GAUC and logloss;
2. the prequential replay with rolling retraining (evaluation.prequential), per window and overall;
3. team-draft interleaving (evaluation.interleaving; Radlinski et al. 2008) of every pair of policies above, on the
   test cases and in every prequential window, each beside the sign of the HR@K difference, and the share of
   comparisons where the two agree (``sign_agreement``);
4. the replay estimator of Li et al. 2011 (evaluation.estimators) for the explore/exploit policies
   (evaluation.policies) on a logged uniformly random slice (``--bandit-log`` Parquet in the generator's shape, or
   a simulated one with known CTRs), with Wilson 95 % intervals; on a simulated log, beside them the true values
   the simulator knows (``estimators.simulated_truth``);
5. the publish gate (evaluation.gate) for the configured retriever's version (``models.retrieval``, item2vec by
   default) against the version serving now (``<artifacts_dir>/serving/current.json``, serving.publish); the
   pointer is rewritten on PUBLISH.

Stage result (``<run_dir>/stages/evaluate.json``)::

    {"retrieval": {"item2vec": {"hr@10", "ndcg@10", "mrr@10", "cases", "fallback_cases", "model_version"},
                   "deepfm": {...}, "popularity": {...}},
     "cold_start_cases", "cases", "k", "n_recent",
     "hr_curve": {policy: {"1": HR@1, ...}},
     "ranking": {"retriever", "candidates", "recall@100", "retriever_order": {...}, "rankers": {name: {...}}},
     "prequential": {"windows": [...], "overall": {...}, "k", "n_windows", "n_recent", "wall_s"},
     "interleaving": {"comparisons": [...], "sign_agreement"},
     "bandit": {"source", "events", "candidates", "expected_kept", "policies": {...}, "uniform_ctr", "wall_s",
                "truth": {"uniform_ctr", "arm_ctr", "policies": {...}, "method"}},   # truth: simulated log only
     "gate": {"decision", "candidate", "serving", "pointer", "candidate_metrics", "previous", "rule"},
     "evaluate_wall_s"}

Every ``*wall_s`` is seconds. ``prequential`` is absent on a log of one event, ``gate`` when the configured
retriever was not exported.
"""

from __future__ import annotations

import argparse
import logging
import time

import faiss
import numpy as np

from evaluation import estimators, interleaving, prequential, replay
from evaluation.ranking import RankingParams, ranker_replay
from evaluation.cases import build_cases, build_log, read_samples
from evaluation.gate import PublishGate, gate_and_publish
from evaluation.replay import ReplayParams
from features.config import PlatformConfig, load_config
from features.results import write_stage_result
from serving.embeddings import embedding_models
from serving.publish import pointer_path, read_pointer

log = logging.getLogger("evaluation.evaluate")


def gate_decision(cfg: PlatformConfig, retrieval: dict, k: int) -> dict | None:
    """Apply the publish gate to the configured retriever's replay figures (``ndcg@k`` must improve, ``hr@k`` must
    not fall) and publish on PUBLISH; ``None`` when that retriever has no figures (it was not exported).

    Args:
        retrieval: the static replay's ``retrieval`` result, policy -> figures.

    Returns:
        ``{"decision", "candidate", "serving", "pointer", "candidate_metrics", "previous", "rule"}``: the decision,
        the candidate's model_version, the version serving afterwards (``None`` if none), the pointer's path, the
        candidate's replay metrics, the pointer as it stood before the decision (``{"model_version", "metrics"}``,
        ``None`` when nothing was published yet: a first publication) and the gate's rule (``PublishGate``'s
        fields).

    Raises:
        PointerError: the pointer is unreadable, or its metrics lack ``ndcg@k`` or ``hr@k``.
    """
    gated = cfg.models.retrieval  # the retriever the service publishes
    if gated not in retrieval:
        return None
    cand = retrieval[gated]
    metrics = {m: v for m, v in cand.items() if m.startswith(("hr@", "ndcg@", "mrr@"))}
    gate = PublishGate(metric=f"ndcg@{k}", guard=(f"hr@{k}",))
    before = read_pointer(pointer_path(cfg.artifacts_dir))   # what the gate compares the candidate with
    decision, serving = gate_and_publish(gate, pointer_path(cfg.artifacts_dir), gated, cand["model_version"],
                                         metrics)
    return {"decision": decision.value, "candidate": cand["model_version"],
            "serving": serving["model_version"] if serving else None,
            "pointer": str(pointer_path(cfg.artifacts_dir)), "candidate_metrics": metrics,
            "previous": {"model_version": before["model_version"], "metrics": before["metrics"]} if before else None,
            "rule": {"metric": gate.metric, "min_gain": gate.min_gain, "guard": list(gate.guard),
                     "max_drop": gate.max_drop}}


def ranker_evaluation(cfg: PlatformConfig, cases, log_, retrieval: tuple, encoder, retriever: str,
                      params: ReplayParams) -> dict | None:
    """Every ranker trained in the run reorders the served retriever's first ``RankingParams.candidates`` items of
    every case (the seen-item rule applied; cold cases take popularity's), ``evaluation.ranking``; None when the
    run trained no ranker."""
    from training.artifacts import ModelLayout, model_dir
    from training.registry import list_models

    rankers = tuple(m for m in list_models("ranker") if ModelLayout(model_dir(cfg.run_dir, m)).state.exists())
    if not rankers:
        return None
    ranking = RankingParams(k=params.k)
    n_items = int(max(log_.item_idx.max(initial=0), cases.target.max(initial=0))) + 1
    pop = replay.popularity_recs(cases, log_, ranking.candidates, n_items, params.batch)
    index, matrix, _ = retrieval
    cands, _ = replay.embedding_recs(cases, index, matrix, ReplayParams(k=ranking.candidates,
                                                                        n_recent=params.n_recent,
                                                                        batch=params.batch),
                                     fallback=pop, encoder=encoder)
    return ranker_replay(cfg, cases, cands, retriever, ranking, rankers)


def run_evaluation(cfg: PlatformConfig, params: ReplayParams = ReplayParams(),
                   models: tuple[str, ...] | None = None, windows: int = 8, bandit_path: str | None = None,
                   bandit_events: int = 10_000, seed: int = 0) -> dict:
    """Read the samples and exported models, run every evaluation (module docstring), write the stage result.

    Args:
        params: the static replay's K, query length and batch; the prequential replay uses the same.
        models: exported models to replay (a model without an export is skipped, logged).
        windows: prequential windows (fewer on a log with fewer events).
        bandit_path: Parquet logged-bandit table (the generator's output); ``None`` simulates ``bandit_events``.
        seed: seeds the interleaving coins, the simulated log and the randomised policies.

    Returns:
        The stage result (module docstring).

    Raises:
        TableNotFoundError: the ctr_samples export (or its test split) is missing.
        IndexFileError: an index and its parameter file disagree.
        BanditLogError: the ``bandit_path`` table is not in the logged-bandit shape.
        PointerError: the serving pointer is unreadable.
    """
    t0 = time.perf_counter()
    tables = read_samples(cfg)
    log_ = build_log(list(tables.values()))
    cases = build_cases(tables["test"], log_)
    models = models if models is not None else embedding_models()  # default: every model with an item table
    loaded = {m: x for m in models if (x := replay.load_model_index(cfg, m)) is not None}
    log.info("replay: %d positive test cases, %d logged events, models %s", len(cases), log_.item_idx.size,
             list(loaded))
    encoders = {m: e for m, (_, _, version) in loaded.items()
                if (e := replay.load_encoder(cfg, m, version)) is not None}
    result = replay.evaluate(cases, log_, loaded, params, encoders)
    rng = np.random.default_rng(seed)
    long_params = ReplayParams(k=max(replay.CURVE_KS), n_recent=params.n_recent, batch=params.batch)
    lists = replay.policy_lists(cases, log_, loaded, long_params, encoders)
    result["hr_curve"] = replay.hr_curve(lists, cases.target)
    comparisons = interleaving.pairwise_comparisons(lists, cases.target, params.k, "test", rng)
    retriever = cfg.models.retrieval  # the rankers reorder what the served retriever would return
    t1 = time.perf_counter()
    ranking = ranker_evaluation(cfg, cases, log_, loaded[retriever], encoders.get(retriever), retriever, params) \
        if retriever in loaded else None
    if ranking is not None:
        result["ranking"] = ranking | {"wall_s": time.perf_counter() - t1}

    t1 = time.perf_counter()
    window_lists: list = []
    elog = prequential.event_log(list(tables.values()))
    n_windows = min(windows, len(elog) - 1)          # a tiny log gets fewer windows (one event each at least)
    if n_windows >= 1:
        result["prequential"] = prequential.prequential(
            elog, prequential.PrequentialParams(n_windows=n_windows, k=params.k, n_recent=params.n_recent,
                                                batch=params.batch), lists_out=window_lists)
        result["prequential"]["wall_s"] = time.perf_counter() - t1
    for w, (wl, targets) in enumerate(window_lists, start=1):
        comparisons += interleaving.pairwise_comparisons(wl, targets, params.k, f"window {w}", rng)
    result["interleaving"] = {"comparisons": comparisons, "sign_agreement": interleaving.sign_agreement(
        [c["preference"] for c in comparisons], [c["hr_diff"] for c in comparisons])}
    t1 = time.perf_counter()
    result["bandit"] = estimators.bandit_evaluation(bandit_path, bandit_events, seed)  # with its truth if simulated
    result["bandit"]["wall_s"] = time.perf_counter() - t1
    gate = gate_decision(cfg, result["retrieval"], params.k)
    if gate is not None:
        result["gate"] = gate
    result["evaluate_wall_s"] = time.perf_counter() - t0
    write_stage_result(cfg, "evaluate", result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="models to replay (default: every registered model with an item table)")
    p.add_argument("--k", type=int, default=ReplayParams.k)
    p.add_argument("--n-recent", type=int, default=ReplayParams.n_recent)
    p.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    p.add_argument("--windows", type=int, default=8, help="prequential windows evaluated")
    p.add_argument("--bandit-log", default=None, help="Parquet logged-bandit table (default: simulated)")
    p.add_argument("--bandit-events", type=int, default=50_000, help="events of the simulated bandit log")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    unknown = sorted(set(args.models or ()) - set(embedding_models()))
    if unknown:  # checked after parsing: the registry imports every model (torch), which --help must not wait for
        p.error(f"argument --models: {', '.join(unknown)} not a model with item embeddings; choose from "
                f"{', '.join(embedding_models())}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faiss.omp_set_num_threads(args.threads)
    result = run_evaluation(load_config(), ReplayParams(k=args.k, n_recent=args.n_recent),
                            tuple(args.models or embedding_models()),
                            windows=args.windows, bandit_path=args.bandit_log, bandit_events=args.bandit_events,
                            seed=args.seed)
    for name, r in result["retrieval"].items():
        log.info("%-10s HR@%d %.4f  NDCG@%d %.4f  (%d cases)", name, result["k"], r[f"hr@{result['k']}"],
                 result["k"], r[f"ndcg@{result['k']}"], r["cases"])
    for name, r in result.get("prequential", {}).get("overall", {}).items():
        log.info("prequential %-12s HR@%d %.4f  coverage %.3f  novelty %.2f bits", name, result["k"],
                 r[f"hr@{result['k']}"], r["coverage"], r["novelty_bits"])
    for name, e in result["bandit"]["policies"].items():
        log.info("bandit %-20s CTR %.4f [%.4f, %.4f] (%d kept)", name, e["ctr"], e["low"], e["high"], e["kept"])
    log.info("interleaving sign agreement %.3f over %d comparisons", result["interleaving"]["sign_agreement"],
             len(result["interleaving"]["comparisons"]))
    if "gate" in result:
        log.info("gate: %s %s (serving: %s)", result["gate"]["decision"], result["gate"]["candidate"],
                 result["gate"]["serving"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
