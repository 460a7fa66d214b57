"""``clip-dro quickstart``: the whole product on the built-in long-tailed data, on a CPU, in minutes.

Prepares the synthetic data, trains CLIP, SogCLR and iSogCLR (or the ``--losses`` given, SigLIP among them) with
the setup's config (``pretrained_cpu.yaml``
fine-tuning pretrained towers, the default, or ``tiny_cpu.yaml`` from scratch; the same model, steps and batch
for each loss), evaluates each, analyses iSogCLR's temperatures against concept frequency, and writes
``comparison.json``, ``comparison.md`` and ``comparison.png``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from clip_dro.checkpoint import CheckpointError, load_checkpoint_model
from clip_dro.compare import parse_losses, temperature_row
from clip_dro.config import load_config
from clip_dro.errors import UserError
from clip_dro.evaluation.run import evaluate
from clip_dro.losses import LOSSES as KNOWN_LOSSES
from clip_dro.resources import CONFIGS_DIR
from clip_dro.trainer import train

LOSSES = ("clip", "sogclr", "isogclr")  # the default comparison
# The two setups: pretrained EfficientNet-Lite0 + MiniLM fine-tuned as the paper fine-tunes ResNet-50 +
# DistilBERT (the default: 8.7 min on 2 cores), or a tiny ViT trained from scratch (11 min).
SETUPS = {"pretrained": "pretrained_cpu", "scratch": "tiny_cpu"}
TABLE_METRICS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "r_mean", "acc1",
                 "tau_img_mean", "tau_txt_mean", "tau_img_freq_spearman", "tau_txt_freq_spearman",
                 "tau_img_freq_spearman_per_concept", "tau_txt_freq_spearman_per_concept")


def _markdown(table: dict[str, dict[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"

    lines = ["| metric | " + " | ".join(table) + " |", "|---|" + "---:|" * len(table)]
    lines += [f"| {m} | " + " | ".join(fmt(table[loss].get(m)) for loss in table) + " |" for m in TABLE_METRICS]
    return "\n".join(lines) + "\n"


def _plot(table: dict[str, dict[str, Any]], path: Path, setup: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["i2t_R@1", "t2i_R@1", "r_mean", "acc1"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(table)
    for i, (loss, row) in enumerate(table.items()):
        ax.bar([m + i * width for m in range(len(metrics))], [row[k] for k in metrics], width, label=loss)
    ax.set_xticks([m + width * (len(table) - 1) / 2 for m in range(len(metrics))], metrics)
    ax.set_ylabel("%")
    ax.set_title(f"quickstart ({setup}): synthetic long-tailed data, {SETUPS[setup]}.yaml")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_quickstart(output: Path, steps: Optional[int] = None, num_train: Optional[int] = None,
                   setup: str = "pretrained", seed: int = 0,
                   losses: str | Sequence[str] = LOSSES) -> dict[str, dict]:
    """Run the comparison of ``losses`` (names of ``loss.name``, or a comma-separated string of them) into
    ``output`` with the config of ``setup`` (``SETUPS``); ``steps`` and ``num_train`` shrink it (the tests use
    that); ``seed`` is the training seed (``train.seed``: the same data, another initialization and batch
    order), to see the spread between runs."""
    if setup not in SETUPS:
        raise UserError(f"--setup {setup!r}: must be one of {', '.join(SETUPS)}")
    losses = parse_losses(losses) if isinstance(losses, str) else list(losses)
    unknown = [name for name in losses if name not in KNOWN_LOSSES]
    if unknown:
        raise UserError(f"--losses: {unknown[0]!r} is not one of {', '.join(KNOWN_LOSSES)}")
    from data_prep.synthetic import prep_synthetic

    output = Path(output)
    data = output / "data"
    prep_synthetic(output=data, num_train=num_train or 4000, seed=0, workers=None)
    table: dict[str, dict[str, Any]] = {}
    for loss in losses:
        overrides = [f"loss.name={loss}", f"data.train={data / 'train'}", f"train.output_dir={output / 'runs' / loss}",
                     "eval.retrieval=[]", "eval.zeroshot=[]", "train.resume=latest", f"train.seed={seed}"]
        if steps is not None:
            overrides.append(f"train.max_steps={steps}")
        cfg = load_config(CONFIGS_DIR / f"{SETUPS[setup]}.yaml", overrides)
        try:
            final = train(cfg)
        except CheckpointError as exc:
            # train.resume=latest continues only the very same run; anything else must not pass for new.
            raise UserError(f"{output} holds a quickstart run with other settings ({exc}); choose another "
                            "--output or delete it") from None
        bundle, _ = load_checkpoint_model(final)
        results = evaluate(bundle.model, bundle.tokenizer, bundle.preprocess_eval, [data / "retrieval"],
                           [data / "zeroshot"], cfg.eval.batch_size, "cpu")
        row: dict[str, Any] = {}
        for result in results:
            row.update(result["metrics"])
        row.update(temperature_row(cfg, final, output / "temperatures" / loss))
        table[loss] = row
    (output / "comparison.json").write_text(json.dumps(table, indent=2) + "\n")
    markdown = _markdown(table)
    (output / "comparison.md").write_text(markdown)
    _plot(table, output / "comparison.png", setup)
    print(markdown)
    print(f"written: {output / 'comparison.json'}, {output / 'comparison.md'}, {output / 'comparison.png'}, "
          f"temperature plots in {output / 'temperatures'}")
    return table
