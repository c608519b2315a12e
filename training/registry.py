"""The model registry: every model's facts, declared once in the model's own file.

A model file ends with one ``register(ModelSpec(...))``: its name, its kind (``ranker``: features in, a logit out;
``retriever``: a query encoder and item vectors for ANN search), its frozen config dataclass (whose defaults are the
model's defaults), how to build it from the vocabularies, the training task that trains it (``training.tasks``),
its tables and the features it reads. Every stage finds models here (``get_model`` / ``list_models``, as timm's
``create_model`` / ``list_models``): the trainer's ``--model`` choices, the demo's and the DAG's train stages, the
artifact loader, export, serving and the replay. No other file branches on a model's name.

>>> {"deepfm", "din", "item2vec"} <= set(model_names()) == set(list_models())
True
>>> get_model("din").kind, get_model("item2vec").task
('ranker', 'skipgram')
>>> get_model("wide_and_shallow")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
training.spec.UnknownModelError: unknown model 'wide_and_shallow'; registered: ...
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from training.spec import (KINDS, ModelOptionError, ModelSpec, TrainDefaults, UnknownModelError, _REGISTRY,
                           config_to_dict, register)

__all__ = ["KINDS", "ModelOptionError", "ModelSpec", "TrainDefaults", "UnknownModelError", "config_to_dict",
           "get_model", "list_models", "model_names", "register"]

_LOADED = False  # every file of training/models/ imported (and so registered)


def model_names() -> tuple[str, ...]:
    """The registered models' names without importing them: the files of ``training/models/``, since each model
    lives in ``training/models/<name>.py`` (``register`` enforces it). Sorted."""
    folder = Path(__file__).resolve().parent / "models"
    return tuple(sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")))


def _load_all() -> None:
    """Import every module of ``training/models/`` once, so that each registers its model."""
    global _LOADED
    if _LOADED:
        return
    import training.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED = True


def get_model(name: str) -> ModelSpec:
    """The registered model called ``name``.

    Raises:
        UnknownModelError: no model of that name (the message lists the registered ones).
    """
    _load_all()
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_models(kind: str | None = None, task: str | None = None) -> tuple[str, ...]:
    """Names of the registered models, in registration order (the order of ``training/models/`` files), optionally
    only those of one ``kind`` or trained by one ``task``.

    Raises:
        ValueError: an unknown kind.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _load_all()
    return tuple(n for n, s in _REGISTRY.items() if (kind is None or s.kind == kind) and (task is None or
                                                                                          s.task == task))
