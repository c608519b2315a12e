"""Stage command: train any registered model with Ray Train over sharded TorchRec tables, on CPU or GPU.

    python -m training.train --model NAME [--epochs N] [--batch-size B] [--option FIELD=VALUE ...] [--use-gpu]

``--model`` takes any model of ``training.registry.list_models()``; ``--option`` sets a field of that model's config
(``--option hidden=200,80``), checked against the config's fields, so a typo is an error. Knobs left unset take the
model's defaults (``ModelSpec.train``). The trainer is ``training.trainer``; the model folder it writes is
``training.artifacts``'; the stage result is ``train_<model>``.
"""

from __future__ import annotations

import argparse
import sys

from features.config import load_config
from training.trainer import SCHEDULES, SHARDINGS, TrainOptions, train

__all__ = ["TrainOptions", "train", "main", "parser"]


def parser() -> argparse.ArgumentParser:
    """The command line; building it imports no model (``--help`` returns at once)."""
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    unset = "the model's default"
    p.add_argument("--model", required=True, metavar="NAME",
                   help="a registered model (training.registry.list_models())")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the data; default: {unset}")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch size (rows or pairs), split over the workers; default: {unset}")
    p.add_argument("--embedding-dim", type=int, default=None,
                   help="D of every table, a multiple of 4 (the config's embedding_dim)")
    p.add_argument("--dropout", type=float, default=None, help="the config's dropout, where it has one")
    p.add_argument("--lr-sparse", type=float, default=None,
                   help=f"the tables' row-wise Adagrad learning rate (per step); default: {unset}")
    p.add_argument("--lr-dense", type=float, default=None,
                   help=f"AdamW's learning rate for the dense layers (per step); default: {unset}")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW's weight decay; default: {unset}")
    p.add_argument("--mba-lambda", type=float, default=None,
                   help="CTR task: mini-batch aware L2 on the id rows (Zhou et al. 2018); 0 off; default: "
                        f"{unset}")
    p.add_argument("--id-dropout", type=float, default=None,
                   help="CTR task: probability a train id is read as the OOV row, and never-trained ids read as it "
                        f"(training.modules.cold_ids); 0 off; default: {unset}")
    p.add_argument("--recency-half-life-days", type=float, default=None,
                   help=f"CTR task: days over which a train sample's loss weight halves; 0 off; default: {unset}")
    p.add_argument("--no-dense-features", action="store_true",
                   help="models that read the point-in-time counters: sparse features only")
    p.add_argument("-o", "--option", action="append", default=[], metavar="FIELD=VALUE",
                   help="a field of the model's config (repeatable), e.g. history_ratings=false, window=5")
    p.add_argument("--sharding", choices=SHARDINGS, default="planner",
                   help="TorchRec's planner, or every table row-wise")
    p.add_argument("--patience", type=int, default=2, help="epochs without a better valid metric before stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr-schedule", choices=SCHEDULES, default="warmup_cosine", help="dense learning-rate schedule")
    p.add_argument("--save-predictions", action="store_true",
                   help="CTR task: write the saved epoch's per-row test predictions to the model folder "
                        "(predictions.parquet: row, event_id, user, label, score)")
    p.add_argument("--use-gpu", action="store_true",
                   help="one GPU per worker, NCCL (as RECSYS_TRAIN__USE_GPU=true; default: the configuration's)")
    return p


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``["a=1", "b=x,y"]`` -> ``{"a": "1", "b": "x,y"}``.

    >>> parse_options(["hidden=200,80", "history_ratings=false"])
    {'hidden': '200,80', 'history_ratings': 'false'}

    Raises:
        ValueError: an item without ``=``.
    """
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option takes FIELD=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    from training.registry import ModelOptionError, UnknownModelError

    p = parser()
    a = p.parse_args(argv)
    try:
        opts = TrainOptions(model=a.model, epochs=a.epochs, batch_size=a.batch_size, embedding_dim=a.embedding_dim,
                            dropout=a.dropout, lr_sparse=a.lr_sparse, lr_dense=a.lr_dense,
                            weight_decay=a.weight_decay, mba_lambda=a.mba_lambda, id_dropout=a.id_dropout,
                            recency_half_life_days=a.recency_half_life_days, model_options=parse_options(a.option),
                            dense_features=not a.no_dense_features, sharding=a.sharding, patience=a.patience,
                            seed=a.seed, lr_schedule=a.lr_schedule, save_predictions=a.save_predictions)
    except (UnknownModelError, ModelOptionError, ValueError) as e:
        p.error(str(e))
    cfg = load_config()
    if a.use_gpu:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"use_gpu": True})})
    result = train(cfg, opts)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"train {opts.model}")
    table.add_column("figure")
    table.add_column("value")
    for k, v in result.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
