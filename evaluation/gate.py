"""Publish gate: a new embedding version goes to serving only if its replay metrics beat those of the version
serving now.

The serving version is a pointer file, ``<artifacts_dir>/serving/current.json``, read and written by
serving.publish (the HTTP service reads it without importing the gate)::

    {"model": "item2vec", "model_version": "item2vec-20261121T185130Z", "metrics": {"ndcg@10": ..., ...},
     "published_at": "2026-11-21T19:00:00+00:00"}

``PublishGate.decide`` returns ``Decision.PUBLISH`` when there is no pointer yet, or when the candidate's
``metric`` exceeds the serving one by more than ``min_gain`` and no metric of ``guard`` falls by more than
``max_drop``; otherwise ``Decision.REJECT``. ``gate_and_publish`` rewrites the pointer atomically on PUBLISH
(``serving.publish.write_pointer``).

>>> gate = PublishGate(metric="ndcg@10", min_gain=0.001)
>>> gate.decide({"ndcg@10": 0.051, "hr@10": 0.10}, None)
<Decision.PUBLISH: 'publish'>
>>> gate.decide({"ndcg@10": 0.051, "hr@10": 0.10}, {"ndcg@10": 0.0505, "hr@10": 0.09})   # gain 0.0005 < 0.001
<Decision.REJECT: 'reject'>
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from features.errors import PlatformError
from serving.publish import PointerError, read_pointer, write_pointer


class Decision(enum.Enum):
    PUBLISH = "publish"
    REJECT = "reject"


@dataclass(frozen=True)
class PublishGate:
    """Args:
        metric: the replay metric that must improve (a key of the stage's retrieval results, e.g. ``ndcg@10``).
        min_gain: absolute improvement required (same unit as the metric).
        guard: metrics that must not fall by more than ``max_drop``.
        max_drop: tolerated absolute fall of each guard metric.

    Raises:
        ValueError: a negative ``min_gain`` or ``max_drop``.
    """

    metric: str = "ndcg@10"
    min_gain: float = 0.0
    guard: tuple[str, ...] = ("hr@10",)
    max_drop: float = 0.0

    def __post_init__(self) -> None:
        if self.min_gain < 0 or self.max_drop < 0:
            raise ValueError(f"min_gain and max_drop must be >= 0, got {self.min_gain}, {self.max_drop}")

    def decide(self, candidate: dict[str, float], serving: dict[str, float] | None) -> Decision:
        """PUBLISH or REJECT for the candidate's metrics against the serving version's (``None``: none serves).

        Raises:
            PointerError: a metric the gate reads is missing from either side.
        """
        if serving is None:
            return Decision.PUBLISH
        for side, m in (("candidate", candidate), ("serving", serving)):
            lacking = [x for x in (self.metric, *self.guard) if x not in m]
            if lacking:
                raise PointerError(f"{side} metrics lack {lacking}; run the evaluate stage with the same k")
        if candidate[self.metric] - serving[self.metric] <= self.min_gain:
            return Decision.REJECT
        if any(serving[g] - candidate[g] > self.max_drop for g in self.guard):
            return Decision.REJECT
        return Decision.PUBLISH


def gate_and_publish(gate: PublishGate, path: str | Path, model: str, model_version: str,
                     metrics: dict[str, float]) -> tuple[Decision, dict | None]:
    """Decide against the current pointer and publish on PUBLISH. Returns the decision and the pointer that serves
    afterwards."""
    current = read_pointer(path)
    decision = gate.decide(metrics, current["metrics"] if current else None)
    if decision is Decision.PUBLISH:
        return decision, write_pointer(path, model, model_version, metrics)
    return decision, current


def main(argv: list[str] | None = None) -> int:
    """``python -m evaluation.gate``: the publish step of the ``evaluate_and_publish`` DAG.

    The evaluate stage (``evaluation.evaluate``) applies the gate right after it measures the candidate, so the decision
    and the pointer are taken in one place; this command reports that decision as the stage result ``publish``
    and prints it. A REJECT is an outcome, not a failure: the exit status is 0 either way.

    Raises:
        PlatformError: the evaluate stage has no gate decision (it has not run, or had no item2vec results).
    """
    import argparse

    from features.config import load_config
    from features.results import read_stage_result, write_stage_result

    argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0]).parse_args(argv)
    cfg = load_config()
    gate = read_stage_result(cfg, "evaluate").get("gate")
    if gate is None:
        raise PlatformError("the evaluate stage recorded no gate decision; run `python -m evaluation.evaluate` with "
                            "the item2vec embeddings exported")
    write_stage_result(cfg, "publish", gate)
    print(f"publish gate: {gate['decision']} {gate['candidate']} (serving now: {gate['serving']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
