"""``clip-dro train``: the accelerate-driven training loop (SPEC 2, 4.6, 6).

One process or many (``accelerate launch`` / ``torchrun``): the loader makes the global batch independent of
the number of processes, and the losses make the step the same computation, so a run is reproducible and
exactly resumable from any checkpoint.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from clip_dro.checkpoint import (LOSS_STATE, MODEL_FILE, TEMPERATURES_FILE, CheckpointError, TrainerState,
                                 check_same_settings, prune, publish, resolve_resume, write_temperatures)
from clip_dro.config import Config, load_config, save_config
from clip_dro.data.train_loader import TrainBatch, TrainLoader, check_layout
from clip_dro.errors import UserError
from clip_dro.evaluation.run import evaluate_sets, prepare_eval_sets
from clip_dro.losses import build_loss
from clip_dro.manifest import load_manifest
from clip_dro.models import build_model
from clip_dro.optim import build_optimizer, warmup_cosine
from clip_dro.resources import resolve_config_path

log = logging.getLogger("clip_dro.train")

PER_SAMPLE_TEMPERATURE_LOSSES = {"isogclr"}


class NonFiniteLoss(UserError):
    """Training produced NaN or inf; the message names the step and the batch's sample indices."""


def train_from_cli(config_path: Path, overrides: list[str]) -> Path:
    """``--config`` is a YAML file or the name of a shipped config (``tiny_cpu``), so installs from a wheel
    need no checkout."""
    return train(load_config(resolve_config_path(config_path), overrides))


def _accelerator(precision: str, run_dir: Path) -> Accelerator:
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: fp16 needs a GPU; use bf16 or fp32 on the CPU")
    try:
        import tensorboard  # noqa: F401  (only to know whether the tracker can be used)
        log_with = "tensorboard"
    except ImportError:
        log_with = None
    # Without CUDA a plain Accelerator() under torchrun leaves ranks unsynchronized (ENVIRONMENT.md).
    return Accelerator(cpu=not torch.cuda.is_available(),
                       mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
                       log_with=log_with, project_dir=str(run_dir))


@contextmanager
def _stop_on_signal() -> Iterator[list[bool]]:
    """Turn Ctrl-C (SIGINT) and a scheduler's SIGTERM into a flag checked between steps, so that the step in
    flight completes and a consistent checkpoint can be written."""
    flag = [False]
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        flag[0] = True

    for s in signals:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Trainer:
    """Builds everything a run needs from a validated config, then runs the loop."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator = _accelerator(cfg.train.precision, self.run_dir)
        acc = self.accelerator
        if cfg.data.train is None:
            raise UserError("data.train: not set; point it at a prep output directory")
        self.manifest = load_manifest(cfg.data.train)
        self.lanes = check_layout(cfg.data.train, len(self.manifest.shards), cfg.data.batch_size,
                                  acc.num_processes, cfg.data.workers, cfg.data.lanes)
        self.global_batch = cfg.data.batch_size * acc.num_processes
        # Checked now (no image is decoded) so that a bad eval set fails before training, not after it.
        self.eval_sets = prepare_eval_sets(cfg.eval.retrieval, cfg.eval.zeroshot)
        self.resume_from = resolve_resume(cfg.train.resume, self.run_dir)
        if self.resume_from is not None:
            self._check_resumable(self.resume_from)

        set_seed(cfg.train.seed)
        self.bundle = build_model(cfg.model.name, cfg.model.pretrained, cfg.model.text_tower,
                                  cfg.model.text_tower_pretrained)
        model = self.bundle.model
        # Our losses bring their own temperatures; an unused parameter would stall DDP.
        for name in ("logit_scale", "logit_bias"):
            if isinstance(getattr(model, name, None), torch.nn.Parameter):
                getattr(model, name).requires_grad_(False)

        self.loader = TrainLoader(cfg.data.train, self.bundle.preprocess_train, self.bundle.tokenizer,
                                  cfg.data.batch_size, seed=cfg.train.seed, rank=acc.process_index,
                                  world_size=acc.num_processes, workers=cfg.data.workers, lanes=self.lanes)
        loss_kwargs = {k: v for k, v in vars(cfg.loss).items() if k != "name"}
        self.loss_fn = build_loss(cfg.loss.name, self.manifest.num_images, self.manifest.num_texts,
                                  **loss_kwargs).to(acc.device)

        self.total_steps = cfg.train.max_steps or sum(self.loader.steps_in_epoch(e) for e in range(cfg.train.epochs))
        if self.total_steps < 1:
            raise UserError(f"data.train: {cfg.data.train} yields no full global batch of {self.global_batch}")
        optimizer = build_optimizer(model, self.loss_fn.parameters(), cfg.train.lr, cfg.train.weight_decay)
        # The schedule is by global step; accelerate's scheduler wrapper would step it once per process.
        self.scheduler = warmup_cosine(optimizer, cfg.train.warmup_steps, self.total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.global_step, self.epoch, self.step_in_epoch = 0, 0, 0
        if self.resume_from is not None:
            self._load(self.resume_from)
        if acc.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")
        if acc.log_with:
            acc.init_trackers("clip_dro")

    # -- checkpoints -------------------------------------------------------------------------------------

    def _state(self) -> TrainerState:
        return TrainerState(self.global_step, self.epoch, self.step_in_epoch, self.manifest.dataset_id,
                            self.manifest.num_images, self.manifest.num_texts, self.cfg.model.name,
                            self.cfg.loss.name, self.scheduler.state_dict(), self.global_batch, self.lanes)

    def _check_resumable(self, directory: Path) -> None:
        """Refuse, before anything is built, a checkpoint that would not continue this very run."""
        state = TrainerState.read(directory)
        state.check_compatible(directory, self.manifest.dataset_id, self.manifest.num_images,
                               self.manifest.num_texts, self.cfg.model.name, self.cfg.loss.name)
        state.check_same_sequence(directory, self.global_batch, self.lanes)
        try:
            saved = load_config(directory / "config.yaml")
        except UserError as exc:
            raise CheckpointError(f"checkpoint {directory}: its config.yaml cannot be used ({exc})") from None
        check_same_settings(directory, saved.to_dict(), self.cfg.to_dict())

    def _open_clip_state_dict(self) -> dict:
        state = self.accelerator.unwrap_model(self.model).state_dict()
        if "logit_scale" in state and hasattr(self.loss_fn, "logit_scale"):
            state["logit_scale"] = self.loss_fn.logit_scale.detach().reshape(state["logit_scale"].shape).cpu()
        return state

    def save(self, name: str) -> Path:
        """Write ``name`` (``checkpoints/step-N`` or ``final``) under a temporary name, then move it into place,
        so that an interrupted save never looks like a complete checkpoint."""
        acc = self.accelerator
        final_dir = self.run_dir / name
        tmp_dir = final_dir.with_name(final_dir.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.parent.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp_dir))
        if acc.is_main_process:
            torch.save(self.loss_fn.state_dict(), tmp_dir / LOSS_STATE)
            torch.save(self._open_clip_state_dict(), tmp_dir / MODEL_FILE)
            save_config(self.cfg, tmp_dir / "config.yaml")
            if self.cfg.loss.name in PER_SAMPLE_TEMPERATURE_LOSSES:
                write_temperatures(tmp_dir / TEMPERATURES_FILE, self.loss_fn.tau_img, self.loss_fn.tau_txt)
            self._state().write(tmp_dir)
            publish(tmp_dir, final_dir)
            prune(self.run_dir, self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        return final_dir

    def _load(self, directory: Path) -> None:
        state = TrainerState.read(directory)
        try:
            self.accelerator.load_state(str(directory))
            self.loss_fn.load_state_dict(torch.load(directory / LOSS_STATE, map_location=self.accelerator.device))
        except UserError:
            raise
        except Exception as exc:  # truncated or damaged files: torch, safetensors and pickle raise many kinds
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(f"checkpoint {directory} cannot be loaded ({type(exc).__name__}: "
                                  f"{first_line}); resume from another checkpoint (train.resume=PATH)") from None
        self.scheduler.load_state_dict(state.scheduler)
        self.global_step, self.epoch, self.step_in_epoch = state.global_step, state.epoch, state.step_in_epoch
        self.accelerator.print(f"resumed from {directory} at step {self.global_step}")

    # -- one step ----------------------------------------------------------------------------------------

    def _flags(self, features_finite: bool, stop_requested: bool) -> tuple[bool, bool]:
        """Agree across processes on whether this step's features are finite and whether to stop, so that no
        rank goes on alone into a collective."""
        flags = torch.tensor([0.0 if features_finite else 1.0, 1.0 if stop_requested else 0.0],
                             device=self.accelerator.device)
        flags = self.accelerator.reduce(flags, reduction="sum")
        return bool(flags[0] == 0), bool(flags[1] > 0)

    def _nonfinite(self, what: str, batch: TrainBatch) -> bool:
        """Report a NaN/inf; returns True when the run should skip the batch, raises when it should stop."""
        indices = batch.image_index.tolist()
        message = f"non-finite {what} at step {self.global_step + 1} (image_index of this process's batch: {indices})"
        if self.cfg.train.on_nonfinite == "skip":
            self.accelerator.print(f"warning: {message}; batch skipped")
            return True
        raise NonFiniteLoss(message + "; stopped, the last checkpoint is intact")

    def step(self, batch: TrainBatch, stop_requested: bool) -> tuple[Optional[float], bool]:
        """One optimizer step; returns (loss or None when skipped, whether every process agreed to stop)."""
        acc = self.accelerator
        images = batch.images.to(acc.device, non_blocking=True)
        tokens = batch.tokens.to(acc.device, non_blocking=True)
        with acc.autocast():
            image_features, text_features, _ = self.model(images, tokens)
        finite = bool(torch.isfinite(image_features).all() and torch.isfinite(text_features).all())
        finite, stop = self._flags(finite, stop_requested)
        if not finite:
            self._nonfinite("features", batch)
            return None, stop
        # Per-sample state updates inside the loss never see non-finite features (checked above).
        # Indices stay on the CPU: the loss's range check then needs no device sync.
        loss = self.loss_fn(image_features, text_features, batch.image_index, batch.text_index)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite loss at step {self.global_step + 1} with finite features "
                                f"(image_index: {batch.image_index.tolist()}); stopped")
        # The losses compute their own parameters' gradients (CLIP's logit scale) globally, identical on every
        # process, so only the model's gradients need DDP's averaging.
        acc.backward(loss)
        if self.cfg.train.grad_clip_norm is not None:
            acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn.after_optimizer_step()
        return loss.item(), stop

    # -- the loop ----------------------------------------------------------------------------------------

    def _log(self, metrics: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                                 step=self.global_step)

    def evaluate(self) -> None:
        retrieval_sets, zeroshot_sets = self.eval_sets
        if not (retrieval_sets or zeroshot_sets):
            return
        acc = self.accelerator
        if acc.is_main_process:
            results = evaluate_sets(acc.unwrap_model(self.model), self.bundle.tokenizer, self.bundle.preprocess_eval,
                                    retrieval_sets, zeroshot_sets, self.cfg.eval.batch_size, acc.device,
                                    workers=self.cfg.eval.workers, on_bad_image=self.cfg.eval.on_bad_image)
            for result in results:
                self._log({"step": self.global_step, "eval": result["task"], "dataset": result["dataset"],
                           **result["metrics"], "skipped_images": result["skipped_images"]})
                skipped = f" ({result['skipped_images']} undecodable images skipped)" if result["skipped_images"] else ""
                acc.print(f"eval {result['dataset']} ({result['task']}) at step {self.global_step}: "
                          + ", ".join(f"{k}={v:.2f}" for k, v in result["metrics"].items()) + skipped)
        acc.wait_for_everyone()

    def run(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        bar = tqdm(total=self.total_steps, initial=self.global_step, disable=not acc.is_local_main_process,
                   desc=f"train {cfg.loss.name}", dynamic_ncols=True)
        window_start, window_samples = time.perf_counter(), 0
        stopped = False
        # The bar closes (ending its line) whatever happens, so an error message starts on a line of its own.
        with _stop_on_signal() as stop_signal, bar:
            while self.global_step < self.total_steps and not stopped:
                steps = self.loader.steps_in_epoch(self.epoch)
                if self.step_in_epoch >= steps:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    continue
                for batch in self.loader.epoch(self.epoch, start_step=self.step_in_epoch):
                    self.loss_fn.set_epoch(self.epoch + self.step_in_epoch / steps)
                    loss, stopped = self.step(batch, stop_signal[0])
                    self.global_step += 1
                    self.step_in_epoch += 1
                    window_samples += self.global_batch
                    if loss is not None and self.global_step % cfg.train.log_every == 0:
                        elapsed = time.perf_counter() - window_start
                        metrics = {"step": self.global_step, "epoch": self.epoch, "loss": loss,
                                   "lr": self.scheduler.get_last_lr()[0],
                                   "samples_per_s": window_samples / max(elapsed, 1e-9), **self.loss_fn.stats()}
                        if torch.cuda.is_available():
                            metrics["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                        self._log(metrics)
                        bar.set_postfix(loss=f"{loss:.4f}", sps=f"{metrics['samples_per_s']:.0f}",
                                        lr=f"{metrics['lr']:.2e}",
                                        tau=f"{metrics.get('tau_img_mean', float('nan')):.3f}/"
                                            f"{metrics.get('tau_txt_mean', float('nan')):.3f}")
                        window_start, window_samples = time.perf_counter(), 0
                    bar.update(1)
                    if cfg.train.checkpoint_every and self.global_step % cfg.train.checkpoint_every == 0:
                        self.save(f"checkpoints/step-{self.global_step}")
                    if cfg.train.eval_every and self.global_step % cfg.train.eval_every == 0:
                        self.evaluate()
                    if stopped or self.global_step >= self.total_steps or self.step_in_epoch >= steps:
                        break
        if stopped:
            path = self.save(f"checkpoints/step-{self.global_step}")
            acc.print(f"interrupted at step {self.global_step}; resume with train.resume=latest ({path})")
            acc.end_training()
            raise KeyboardInterrupt
        final = self.save("final")
        self.evaluate()
        acc.end_training()
        return final


def train(cfg: Config) -> Path:
    """Train as configured; returns the ``final`` checkpoint directory."""
    return Trainer(cfg).run()
