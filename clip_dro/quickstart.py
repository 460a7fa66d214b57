"""``clip-dro quickstart``: the whole product on the built-in long-tailed data, on a CPU, in minutes.

Prepares the synthetic data, then runs ``clip-dro compare`` on it (:func:`clip_dro.compare.run_compare`): CLIP,
SogCLR and iSogCLR (or the ``--losses`` given, SigLIP among them) with several seeds each, one setup's config
for all of them, every run evaluated on the synthetic retrieval and zero-shot sets, and one table of the
losses' means, spreads and paired differences per seed with bootstrap intervals. A single seed has moved a
metric by more than the losses differ, so the default compares five.

Setups (``SETUPS``): ``locked`` (the default, ``locked_cpu.yaml``): heads trained on frozen pretrained towers
from cached features, five seeds of 20 epochs each; ``pretrained`` (``pretrained_cpu.yaml``): both towers
fine-tuned, as the paper fine-tunes, one seed; ``scratch`` (``tiny_cpu.yaml``): a tiny ViT from random weights,
one seed. A fine-tuned run costs what about seven locked ones do, hence their single seed.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import pandas as pd

from clip_dro.compare import parse_losses, run_compare
from clip_dro.errors import UserError
from clip_dro.losses import LOSSES as KNOWN_LOSSES
from clip_dro.resources import CONFIGS_DIR

LOSSES = ("clip", "sogclr", "isogclr")  # the default comparison


class Setup(NamedTuple):
    config: str  # a shipped config's name
    seeds: int  # the default number of seeds


SETUPS = {"locked": Setup("locked_cpu", 5), "pretrained": Setup("pretrained_cpu", 1), "scratch": Setup("tiny_cpu", 1)}


def run_quickstart(output: Path, steps: Optional[int] = None, num_train: Optional[int] = None,
                   setup: str = "locked", seeds: Optional[int] = None,
                   losses: str | Sequence[str] = LOSSES) -> pd.DataFrame:
    """Compare ``losses`` (names of ``loss.name``, or a comma-separated string of them) over ``seeds`` seeds
    (default: the setup's) with the config of ``setup`` on the synthetic data, into ``output``; ``steps`` and
    ``num_train`` shrink it (the tests use that). Returns the comparison table (``comparison.csv``)."""
    if setup not in SETUPS:
        raise UserError(f"--setup {setup!r}: must be one of {', '.join(SETUPS)}")
    losses = parse_losses(losses) if isinstance(losses, str) else list(losses)
    unknown = [name for name in losses if name not in KNOWN_LOSSES]
    if unknown:
        raise UserError(f"--losses: {unknown[0]!r} is not one of {', '.join(KNOWN_LOSSES)}")
    config, default_seeds = SETUPS[setup]
    from data_prep.synthetic import prep_synthetic

    data = Path(output) / "data"
    prep_synthetic(output=data, num_train=num_train or 4000, seed=0, workers=None)
    overrides = [f"data.train={data / 'train'}", f"eval.retrieval=[{data / 'retrieval'}]",
                 f"eval.zeroshot=[{data / 'zeroshot'}]"]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    return run_compare(CONFIGS_DIR / f"{config}.yaml", losses, default_seeds if seeds is None else seeds, Path(output),
                       overrides=overrides)
