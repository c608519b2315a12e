"""A model's declaration: ``ModelSpec`` (its facts), ``TrainDefaults`` (the trainer's knobs at its defaults) and
``register``, which a model file of ``training/models/`` calls as its last statement. The lookups are in
``training.registry``, which imports the model files; a model file imports only this module, so that the two form
no import cycle.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from features.errors import PlatformError
from features.tables import TableSpec

KINDS = ("ranker", "retriever")


class UnknownModelError(PlatformError, KeyError):
    """A model name that no file of ``training/models/`` registers."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ModelOptionError(PlatformError, ValueError):
    """A model option that is not a field of the model's config, or a value that does not fit it."""


@dataclass(frozen=True)
class TrainDefaults:
    """The trainer's knobs at this model's defaults (``training.trainer.TrainOptions`` takes these when a knob is
    left unset). Chosen on the validation split; the choices and their figures are in docs/tuning.md.

    Args:
        epochs: passes over the training data (early stopping may end sooner).
        batch_size: global rows (or pairs) per step.
        lr_sparse: the tables' fused row-wise Adagrad learning rate.
        lr_dense: AdamW's learning rate for the dense parameters.
        weight_decay: AdamW's decoupled weight decay.
        mba_lambda: mini-batch aware L2 on the id rows (Zhou et al. 2018); 0 off.
        id_dropout: probability a train sample's id is read as the OOV row (``training.modules.cold_ids``).
        recency_half_life_days: days over which a train sample's loss weight halves; 0 off.
    """

    epochs: int
    batch_size: int
    lr_sparse: float
    lr_dense: float = 1e-3
    weight_decay: float = 1e-4
    mba_lambda: float = 0.0
    id_dropout: float = 0.0
    recency_half_life_days: float = 0.0


@dataclass(frozen=True)
class ModelSpec:
    """Everything the platform needs to know about one model.

    Args:
        name: the registry key (``--model NAME``); lower case, ``[a-z0-9_]``.
        kind: ``ranker`` or ``retriever``.
        task: the ``training.tasks`` task that trains it (``ctr``, ``skipgram``, ...).
        config: the model's frozen config dataclass; ``config()`` is the model's default configuration.
        build: ``build(vocab_sizes, config, sparse_device) -> nn.Module``; tables on ``sparse_device`` (``meta``
            before sharding).
        train: the trainer's knobs at this model's defaults.
        tables: the Delta tables (their Parquet exports) it is trained on; provenance of the saved model.
        paper: the source, cited in the report and docs.
        item_table: state-dict key of the (R, D) item embedding table, row = item_idx (exported for ANN search);
            ``None`` when the model has none.
        item_vectors: ``item_vectors(state, config) -> (R, D')`` float32: the item vectors exported and searched
            when they are not the item table itself (e.g. with biases, MIPS-transformed: ``training.query``).
        id_tables: ``{table: KJT features that read it}``: what id dropout and the mini-batch aware L2 count over.
        id_dropout_features: the one-hot id features id dropout may replace by the OOV row.
        features: ``features(config) -> tuple[SparseFeature]``: the KJT keys a ranker reads, in batch order.
        adapt: ``adapt(config, columns) -> config``: the config fitted to the export's columns (e.g. a column
            older exports lack); identity when ``None``.
        id_lookups: ``id_lookups(sparse_arch, kjt, out, real) -> {table: [(ids (N,), rows (N, D))]}``: the id rows
            the last forward looked up, for the mini-batch aware L2 (a ranker with ``id_tables``).
        query_encoder: ``query_encoder(state, config) -> training.query.QueryEncoder`` for a model whose query is
            its own (e.g. a user vector); ``None``: the mean of the user's recent items (``RecentItemsMean``).
        ctr_loss: ``ctr_loss(config, vocab_sizes) -> BatchLoss | None`` for a model of the ``ctr`` task whose data
            loss is its own (e.g. MF's BPR); ``None`` (or a ``None`` returned for a config): the task's weighted
            BCE. A ``BatchLoss`` is called ``(model, batch, generator) -> (loss, rows)`` and runs the model once
            (``training.tasks.ctr.CtrObjective``).
        init_from: ``init_from(config) -> str | tuple[str, ...] | None``: the registered model (or models, each in
            turn) whose saved tables, in the same run folder, initialise this model's tables of the same state-dict
            key and shape before training starts (not on a resume; ``training.trainer.init_tables``), e.g. FNN's
            from FM's, NeuMF's from GMF's and MLP's; ``None`` (or a ``None`` returned for a config): the tables
            start from their random init.
        init_state: ``init_state(config, sources) -> {state-dict key: tensor}``: for a model with ``init_from``,
            the values of its other parameters computed from the sources' saved state dicts (``sources``: ``{name:
            state}``), copied after the tables (e.g. NeuMF's hidden layers and the alpha mix of its sources'
            prediction layers); ``None``: only the tables are copied.
        corpus: ``corpus(config, sequences, seed) -> sequences``: the sentences the ``skipgram`` task trains on,
            made from the users' item sequences (``list[(n_u,) int64]``) and the run's seed, the same on every rank
            (e.g. random walks over the item graph, ``training.modules.item_graph``); ``None``: the users' item
            sequences themselves.

    Raises:
        ValueError: a bad name or kind, a config that is not a frozen dataclass, a ranker without ``features``,
            or a ``ctr_loss`` (``corpus``) on a model of another task than ``ctr`` (``skipgram``).
    """

    name: str
    kind: str
    task: str
    config: type
    build: Callable[..., Any]
    train: TrainDefaults
    tables: tuple[TableSpec, ...]
    paper: str = ""
    item_table: str | None = None
    id_tables: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    id_dropout_features: tuple[str, ...] = ()
    features: Callable[[Any], tuple] | None = None
    adapt: Callable[[Any, set], Any] | None = None
    id_lookups: Callable[..., dict] | None = None
    item_vectors: Callable[..., Any] | None = None
    query_encoder: Callable[..., Any] | None = None
    ctr_loss: Callable[..., Any] | None = None
    init_from: Callable[[Any], str | tuple[str, ...] | None] | None = None
    init_state: Callable[[Any, Mapping[str, Any]], dict] | None = None
    corpus: Callable[[Any, list, int], list] | None = None

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c == "_" for c in self.name) or self.name != self.name.lower():
            raise ValueError(f"model name must be lower case [a-z0-9_], got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"model {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        params = getattr(self.config, "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise ValueError(f"model {self.name}: config must be a frozen dataclass, got {self.config!r}")
        if self.kind == "ranker" and self.features is None:
            raise ValueError(f"model {self.name}: a ranker declares the features it reads")
        if self.ctr_loss is not None and self.task != "ctr":
            raise ValueError(f"model {self.name}: ctr_loss is read by the ctr task only, not by {self.task!r}")
        if self.init_state is not None and self.init_from is None:
            raise ValueError(f"model {self.name}: init_state computes from the init_from models; it names none")
        if self.corpus is not None and self.task != "skipgram":
            raise ValueError(f"model {self.name}: corpus is read by the skipgram task only, not by {self.task!r}")

    # ------------------------------------------------------------------------------------------- configs
    def default_config(self):
        return self.config()

    def make_config(self, options: Mapping[str, Any] | None = None, base=None):
        """``base`` (default: the model's defaults) with ``options`` applied, each checked against the config's
        fields and converted to the field's type (strings from the command line, lists from JSON).

        Raises:
            ModelOptionError: an option that is not a field (with the fields listed), or a value that does not
                convert or that the config's own validation rejects.
        """
        base = self.config() if base is None else base
        if not options:
            return base
        fields = {f.name: f for f in dataclasses.fields(self.config)}
        hints = typing.get_type_hints(self.config)
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ModelOptionError(f"model {self.name} has no option(s) {unknown}; its options: {sorted(fields)}")
        values = {k: _convert(v, hints[k], f"{self.name}.{k}") for k, v in options.items()}
        try:
            return dataclasses.replace(base, **values)
        except (TypeError, ValueError) as e:
            raise ModelOptionError(f"model {self.name}: {e}") from e

    def config_from_dict(self, data: Mapping[str, Any]):
        """The config a saved model recorded (``config_to_dict``'s output).

        Raises:
            ModelOptionError: a key that is not a field of the config (a model saved by another version).
        """
        return self.make_config(dict(data), base=self.config())

    def init_source(self, config) -> str | tuple[str, ...] | None:
        """The registered model(s) whose saved tables initialise this model built with ``config``; None: random."""
        return self.init_from(config) if self.init_from is not None else None

    def init_sources(self, config) -> tuple[str, ...]:
        """``init_source`` as a tuple of names: empty for random tables, one name for a single source."""
        source = self.init_source(config)
        return () if source is None else (source,) if isinstance(source, str) else tuple(source)

    def features_of(self, config) -> tuple:
        """The KJT features a ranker built with ``config`` reads."""
        if self.features is None:
            raise ValueError(f"model {self.name} is a {self.kind}: it reads no CTR features")
        return tuple(self.features(config))


def config_to_dict(config) -> dict:
    """A JSON-able dict of a config dataclass (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _convert(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the type ``hint`` (int, float, bool, str, tuple[...]); strings are parsed.

    >>> _convert("3", int, "x"), _convert("0.5", float, "x"), _convert("false", bool, "x")
    (3, 0.5, False)
    >>> _convert("200,80", tuple[int, ...], "x"), _convert([1, 2], tuple[int, ...], "x")
    ((200, 80), (1, 2))
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    try:
        if origin is tuple:
            inner = typing.get_args(hint)[0] if typing.get_args(hint) else str
            items = [s for s in value.split(",") if s.strip()] if isinstance(value, str) else list(value)
            return tuple(_convert(x, inner, name) for x in items)
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"not a boolean: {value!r}")
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"not an integer: {value!r}")
            return hint(value)
    except (TypeError, ValueError) as e:
        raise ModelOptionError(f"option {name}={value!r} is not a {getattr(hint, '__name__', hint)}: {e}") from e
    return value


#: name -> spec, filled by ``register`` as ``training.registry`` imports the model files.
_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry; returns it (a model file's last statement: ``SPEC = register(...)``).

    Raises:
        ValueError: the model's file is not ``training/models/<name>.py`` (which also makes names unique).
    """
    module = spec.build.__module__
    if module != f"training.models.{spec.name}":
        raise ValueError(f"model {spec.name!r} must be declared in training/models/{spec.name}.py, not in {module}")
    _REGISTRY[spec.name] = spec
    return spec
