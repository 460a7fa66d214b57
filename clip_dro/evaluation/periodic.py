"""The evaluations of a training run (every ``train.eval_every`` steps and at the end), on every process."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from clip_dro.distributed import EvaluationStopped, Processes
from clip_dro.evaluation.run import check_eval_options, evaluate_sets, prepare_eval_sets


class PeriodicEvaluation:
    """The configured sets, checked once when the run starts (no image is decoded), so that a bad set fails
    before training rather than after it."""

    def __init__(self, retrieval_dirs: Sequence[str | Path], zeroshot_dirs: Sequence[str | Path], batch_size: int,
                 workers: int, on_bad_image: str) -> None:
        check_eval_options(batch_size, workers, on_bad_image)
        self.retrieval_sets, self.zeroshot_sets = prepare_eval_sets(retrieval_dirs, zeroshot_dirs)
        self.batch_size, self.workers, self.on_bad_image = batch_size, workers, on_bad_image

    def __bool__(self) -> bool:
        return bool(self.retrieval_sets or self.zeroshot_sets)

    def run(self, model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, device: torch.device,
            should_stop: Callable[[], bool]) -> Optional[list[dict[str, Any]]]:
        """The results (the same on every process: a collective), or None when a stop was requested."""
        try:
            return evaluate_sets(model, tokenizer, preprocess, self.retrieval_sets, self.zeroshot_sets,
                                 self.batch_size, device, workers=self.workers, on_bad_image=self.on_bad_image,
                                 processes=Processes.current(), should_stop=should_stop)
        except EvaluationStopped:
            return None


def describe(result: dict[str, Any], step: int) -> str:
    """One line for the console."""
    skipped = f" ({result['skipped_images']} undecodable images skipped)" if result["skipped_images"] else ""
    metrics = ", ".join(f"{k}={v:.2f}" for k, v in result["metrics"].items())
    return f"eval {result['dataset']} ({result['task']}) at step {step}: {metrics}{skipped}"
