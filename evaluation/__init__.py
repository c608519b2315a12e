"""Offline evaluation: how good a trained model is on the logged data, and whether its version goes to serving.

Modules, from the protocol up:

- ``cases``: cases and protocols -- the log in replay order, what a case is (a positive event), what counts as
  seen (every item of the user's earlier events; never recommended) and what a model may know at each case; the
  one rule of both replays.
- ``metrics``: HR@K, NDCG@K, MRR@K, mAP@K, coverage, novelty, ROC and precision-recall points, and AUC, GAUC,
  logloss (re-exported from training.metrics).
- ``replay``: the static replay of the test period (Li et al. 2011's replay method for top-K retrieval):
  popularity and every exported model's ANN index on the same cases, each model queried by its query encoder.
- ``ranking``: the rankers in the replay: every trained ranker reorders the served retriever's candidates of each
  case with the case's point-in-time features.
- ``prequential``: the prequential replay (Gama et al. 2013): the log in time windows, an item co-occurrence model
  and popularity retrained before each window, every positive event of the window a case.
- ``estimators`` and ``policies``: the replay estimator of Li et al. 2011 (with Wilson intervals) for
  explore/exploit policies (epsilon-greedy, Thompson sampling, UCB1, LinUCB, popularity, an embedding policy) on
  logged uniformly random exposures.
- ``interleaving``: team-draft interleaving (Radlinski et al. 2008) of every pair of policies on the same cases.
- ``gate``: the publish gate, which moves serving's pointer (serving.publish) to a new version only when its
  replay metrics beat the serving version's.
- ``evaluate``: the ``evaluate`` stage command, which runs all of the above and writes one stage result.
- ``report``: the ``report`` stage command, one HTML page of the run's evaluation.

Data flow (``evaluate`` runs the first five lines, then writes ``<run_dir>/stages/evaluate.json``)::

    ctr_samples export (features.tables) --> cases --> replay (+ serving's exported ANN index) --> lists, HR/NDCG/MRR
                                                   --> prequential (retrained per window)      --> lists, per window
    the lists of both replays --> interleaving --> preference of each pair vs. its HR difference
    logged random slice (pipelines/generator.py) or a simulated one --> estimators (policies) --> CTR per policy
    the configured retriever's replay figures --> gate --> <artifacts_dir>/serving/current.json (serving.publish)
    evaluate.json + the trained rankers (training.artifacts) --> report --> <run_dir>/report.html

Imports point one way: evaluation imports features, training and serving (it searches serving's exported index
and writes its publish pointer); nothing in features, training or serving imports evaluation, and evaluation
imports neither pipelines nor dags (tests/test_import_graph.py).
"""
