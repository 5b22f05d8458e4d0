"""The ``fmcib`` command line. One module per command group; each only parses options and calls the library,
and :class:`~fmcib.cli.common.Commands` turns the package's errors into one-line messages.

    extract    fmcib extract                                 (extract.py)
    seeds      fmcib seeds, fmcib qc                         (seeds.py)
    weights    fmcib models, weights convert|download, hub push (weights.py)
    analysis   fmcib probe, survival, stability, tsne, saliency (analysis.py)
    training   fmcib finetune, predict, pretrain simclr|jepa  (training.py)
    longitudinal  fmcib pretrain jepa-multimodal|align|layered, embed; finetune/predict --table (longitudinal.py)
"""

from __future__ import annotations

import logging
import sys

import click

from .._version import __version__
from . import analysis, extract, longitudinal, seeds, training, weights
from .common import EXIT_ROWS_FAILED, Commands, PerAxis

__all__ = ["main", "EXIT_ROWS_FAILED", "PerAxis"]


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="fmcib")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of short error messages.")
@click.pass_context
def main(ctx: click.Context, verbose: int, debug: bool) -> None:
    """Foundation-model features for CT lesions (seed points -> encoder features), and what to do with them."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"debug": debug}


for _command in (extract.extract, seeds.seeds, seeds.qc, weights.models_cmd, weights.weights, analysis.probe,
                 analysis.survival, analysis.stability, analysis.tsne, analysis.saliency, training.finetune,
                 training.predict, training.pretrain, longitudinal.embed, weights.hub):
    main.add_command(_command)
