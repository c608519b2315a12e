"""The publish gate: decisions on hand-made metrics and the serving pointer file under artifacts."""

from __future__ import annotations

import json

import pytest

from evaluation.gate import Decision, PublishGate, gate_and_publish
from serving.publish import PointerError, pointer_path, read_pointer


def test_decisions():
    gate = PublishGate(metric="ndcg@10", min_gain=0.002, guard=("hr@10",), max_drop=0.005)
    serving = {"ndcg@10": 0.050, "hr@10": 0.100}
    assert gate.decide({"ndcg@10": 0.053, "hr@10": 0.097}, serving) is Decision.PUBLISH   # hr drop .003 ok
    assert gate.decide({"ndcg@10": 0.053, "hr@10": 0.094}, serving) is Decision.REJECT    # hr drop .006
    assert gate.decide({"ndcg@10": 0.052, "hr@10": 0.120}, serving) is Decision.REJECT    # gain .002 not >
    assert gate.decide({"ndcg@10": 0.0}, None) is Decision.PUBLISH                        # nothing serves
    with pytest.raises(PointerError, match="lack"):
        gate.decide({"ndcg@10": 0.06}, serving)
    with pytest.raises(ValueError):
        PublishGate(min_gain=-1)


def test_pointer_moves_only_on_publish(tmp_path):
    path = pointer_path(tmp_path)
    assert path == tmp_path / "serving" / "current.json" and read_pointer(path) is None
    gate = PublishGate()
    d, p = gate_and_publish(gate, path, "item2vec", "v1", {"ndcg@10": 0.05, "hr@10": 0.1})
    assert d is Decision.PUBLISH and json.loads(path.read_text())["model_version"] == "v1"
    d, p = gate_and_publish(gate, path, "item2vec", "v2", {"ndcg@10": 0.04, "hr@10": 0.1})
    assert d is Decision.REJECT and p["model_version"] == "v1" and read_pointer(path)["model_version"] == "v1"
    d, p = gate_and_publish(gate, path, "item2vec", "v3", {"ndcg@10": 0.06, "hr@10": 0.1})
    assert d is Decision.PUBLISH and read_pointer(path)["model_version"] == "v3"
    path.write_text("{not json")
    with pytest.raises(PointerError, match="not valid JSON"):
        read_pointer(path)


def test_cli_reports_the_evaluate_stage_decision(tmp_path, monkeypatch, capsys):
    from features.config import PlatformConfig
    from features.results import read_stage_result, write_stage_result
    from evaluation import gate as gate_mod

    monkeypatch.setenv("RECSYS_ARTIFACTS_DIR", str(tmp_path))
    cfg = PlatformConfig(artifacts_dir=tmp_path)
    with pytest.raises(gate_mod.PlatformError):
        gate_mod.main([])                                   # no evaluate result yet
    decision = {"decision": "reject", "candidate": "item2vec-2", "serving": "item2vec-1", "pointer": "p"}
    write_stage_result(cfg, "evaluate", {"retrieval": {}, "gate": decision})
    assert gate_mod.main([]) == 0
    assert read_stage_result(cfg, "publish") == decision
    assert "reject item2vec-2 (serving now: item2vec-1)" in capsys.readouterr().out
