"""Offline evaluation beyond the static replay: prequential replay with rolling retraining (prequential.py),
the replay estimator of Li et al. 2011 on logged random exposures (estimators.py), explore/exploit policies
(policies.py), team-draft interleaving (interleaving.py) and the publish gate (gate.py)."""
