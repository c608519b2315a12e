"""Stage results: each stage's command line writes the figures it measured to
``<run_dir>/stages/<stage>.json``; the demo and the DAG read them back. Tasks pass paths, never data.

>>> import tempfile, pathlib
>>> from features.config import PlatformConfig
>>> cfg = PlatformConfig(artifacts_dir=pathlib.Path(tempfile.mkdtemp()))
>>> _ = write_stage_result(cfg, "ingest", {"events_bronze": 3})
>>> read_stage_result(cfg, "ingest")
{'events_bronze': 3}
"""

from __future__ import annotations

import json
from pathlib import Path

from features.config import PlatformConfig
from features.errors import PlatformError


def stage_result_path(cfg: PlatformConfig, stage: str) -> Path:
    return cfg.run_dir / "stages" / f"{stage}.json"


def write_stage_result(cfg: PlatformConfig, stage: str, result: dict) -> Path:
    path = stage_result_path(cfg, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=float))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def read_stage_result(cfg: PlatformConfig, stage: str) -> dict:
    """Raises:
        PlatformError: the stage has not written its result (it has not run, or it failed).
    """
    path = stage_result_path(cfg, stage)
    if not path.exists():
        raise PlatformError(f"no result for stage {stage!r} at {path}; run that stage first")
    return json.loads(path.read_text())
