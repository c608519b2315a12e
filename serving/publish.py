"""The publish pointer: which embedding version serving should load, one JSON file at
``<artifacts_dir>/serving/current.json``::

    {"model": "item2vec", "model_version": "item2vec-20261121T185130Z", "metrics": {"ndcg@10": ..., ...},
     "published_at": "2026-11-21T19:00:00+00:00"}

Written by the publish gate (evaluation.gate, on a PUBLISH decision) and read by the HTTP service
(serving.bundle, ``BundleSpec.source="published"``). It lives in serving, which evaluation may import and which
must not import evaluation, so the service reads the pointer without loading the evaluation code.

>>> import tempfile
>>> path = pointer_path(tempfile.mkdtemp())
>>> read_pointer(path) is None                     # nothing published yet
True
>>> write_pointer(path, "item2vec", "v1", {"ndcg@10": 0.05})["model_version"]
'v1'
>>> read_pointer(path)["metrics"]
{'ndcg@10': 0.05}
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from features.errors import PlatformError


class PointerError(PlatformError):
    """The serving pointer file exists but cannot be read, or lacks the gate's metric."""


def pointer_path(artifacts_dir: str | Path) -> Path:
    """``<artifacts_dir>/serving/current.json``."""
    return Path(artifacts_dir) / "serving" / "current.json"


def read_pointer(path: str | Path) -> dict | None:
    """The serving pointer, ``None`` when no version has been published.

    Raises:
        PointerError: the file is not valid JSON or lacks ``metrics``.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        pointer = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PointerError(f"serving pointer {path} is not valid JSON ({e}); delete it to publish afresh") from e
    if not isinstance(pointer, dict) or "metrics" not in pointer:
        raise PointerError(f"serving pointer {path} lacks 'metrics'; delete it to publish afresh")
    return pointer


def write_pointer(path: str | Path, model: str, model_version: str, metrics: dict[str, float]) -> dict:
    """Point serving at ``model_version`` (written to a temporary file, then renamed over ``path``, so a reader
    sees the old pointer or the new one, never a part); returns the pointer written.

    Args:
        metrics: the version's replay metrics (the gate compares the next candidate with them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pointer = {"model": model, "model_version": model_version, "metrics": metrics,
               "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(pointer, indent=2, sort_keys=True))
    tmp.replace(path)
    return pointer
