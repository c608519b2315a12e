"""``recsys``: one command line for every stage of the main job, the demo and the configuration.

    recsys --help                           # the commands, in data-flow order
    recsys train --model deepfm --epochs 2  # = python -m training.train --model deepfm --epochs 2
    recsys ingest --help                    # the ingest stage's own options
    recsys config show                      # = python -m features.config show

Each command hands its arguments, unchanged, to the ``main(argv)`` of the stage's own entry point, so that entry
point's argparse parser stays the one definition of its options: ``recsys <command> --help`` prints that parser's
help, and the exit status is the entry point's. A stage's module is imported only when its command runs, so
``recsys --help`` imports click and nothing of torch, pyspark or ray.

Run it as ``bin/recsys`` (this checkout's code with its ``.venv``; see the script), ``python -m pipelines.cli``
with the checkout on ``PYTHONPATH``, or the ``recsys`` console script of an installed package (pyproject
``[project.scripts]``).

>>> [name for name, entry in COMMANDS.items() if entry.module.startswith("training.")]
['train']
>>> COMMANDS["features"].module
'pipelines.features_batch'
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import click


@dataclass(frozen=True)
class Entry:
    """A command of ``recsys``.

    Args:
        module: the entry point's module; it has ``main(argv: list[str] | None)`` returning the exit status (or
            None for 0) and parsing ``argv`` with its own argparse parser.
        summary: one line for ``recsys --help``.
    """

    module: str
    summary: str


#: The commands in the order the data flows (pipelines.stages for the stages' order); ``recsys --help`` lists them so.
COMMANDS: dict[str, Entry] = {
    "data": Entry("pipelines.data", "fetch the data source (RECSYS_SOURCE) and check it (make data)"),
    "produce": Entry("pipelines.produce", "replay the data source's log as events onto the Kafka topic"),
    "ingest": Entry("pipelines.ingest", "Kafka topic -> bronze and quarantine Delta tables (Spark)"),
    "features": Entry("pipelines.features_batch", "vocabularies, side features, gold training samples (Spark)"),
    "daily-features": Entry("pipelines.daily_features", "recompute one day's features from bronze (Spark batch)"),
    "train": Entry("training.train", "train a registered model (Ray Train, TorchRec)"),
    "export": Entry("serving.export", "item embeddings to Parquet, HNSW index and its recall@10"),
    "evaluate": Entry("evaluation.evaluate", "replay evaluation, bandit estimators, publish gate"),
    "report": Entry("evaluation.report", "the HTML evaluation report of a run"),
    "serve": Entry("serving.app", "the HTTP service: /similar-items, /recommend, /metrics"),
    "demo": Entry("pipelines.demo", "the main job end to end on the data source (make demo)"),
    "config": Entry("features.config", "config show: each configuration value and its source"),
}


class _PassThrough(click.Command):
    """A command whose arguments click leaves alone: no help option, no parsing, ``--`` kept (click's own parser,
    even with ``ignore_unknown_options`` and an UNPROCESSED argument, would drop a ``--``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.args = list(args)
        return ctx.args


def stage_command(name: str, entry: Entry) -> click.Command:
    """A click command that runs ``entry.module``'s ``main`` with every argument after ``name`` as given.

    ``--help``, ``-h``, ``--`` and every option reach the entry point's parser. While it runs, ``sys.argv`` is
    ``["recsys <name>", *args]``, what the entry point would see under ``python -m``, so a parser without its own
    ``prog`` shows ``usage: recsys <name>``.

    Raises:
        SystemExit: always, with the status ``main`` returned (None: 0) or raised.
    """

    @click.command(name=name, cls=_PassThrough, short_help=entry.summary, add_help_option=False,
                   help=f"{entry.summary} (python -m {entry.module})")
    @click.pass_context
    def run(ctx: click.Context) -> None:
        module = importlib.import_module(entry.module)  # here, not at the top: only the chosen stage is imported
        argv, sys.argv = sys.argv, [f"recsys {name}", *ctx.args]
        try:
            status = module.main(list(ctx.args))
        finally:
            sys.argv = argv
        raise SystemExit(status)

    return run


class _InOrder(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # data-flow order, not click's alphabetical one


@click.group(cls=_InOrder, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="recsys COMMAND --help prints that stage's own options; every argument after COMMAND goes to "
                    "it unchanged. The configuration comes from RECSYS_CONFIG and RECSYS_* variables (recsys "
                    "config show).")
def cli() -> None:
    """The recommender platform's stages, the demo and the configuration, each the command line of its own
    module (python -m MODULE)."""


for _name, _entry in COMMANDS.items():
    cli.add_command(stage_command(_name, _entry))


def main(argv: list[str] | None = None) -> None:
    """The ``recsys`` console script (pyproject ``[project.scripts]``); ``argv`` defaults to ``sys.argv[1:]``.

    Raises:
        SystemExit: always, with the command's exit status (2 for an unknown command, with click's message).
    """
    cli.main(args=argv, prog_name="recsys")


if __name__ == "__main__":
    main()
