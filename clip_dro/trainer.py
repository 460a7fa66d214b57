"""``clip-dro train``: the accelerate-driven training loop (design.md §2, §7).

One process or many (``accelerate launch`` / ``torchrun``): the loader makes the global batch independent of
the number of processes, and the losses make the step the same computation, so a run is reproducible and
exactly resumable from any checkpoint.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from clip_dro import trackers
from clip_dro.checkpoint import (TrainerState, check_resumable, load_checkpoint, load_warm_start, prune,
                                 resolve_init_from, resolve_resume, save_checkpoint)
from clip_dro.config import Config, load_config, save_config
from clip_dro.data.sources import TrainSources
from clip_dro.data.train_loader import TrainBatch, TrainLoader, check_layout
from clip_dro.distributed import from_main, join_processes, peer_failures_in_one_line, sum_over_processes
from clip_dro.errors import UserError
from clip_dro.evaluation.periodic import PeriodicEvaluation, describe
from clip_dro.feature_cache import cached_training, open_clip_model
from clip_dro.grad_cache import TowerForward, describe_batchnorm
from clip_dro.losses import build_loss
from clip_dro.models import build_model
from clip_dro.optim import build_optimizer, warmup_cosine
from clip_dro.resources import resolve_config_path
from clip_dro.run_lock import RunDirBusy, lock_run_dir

log = logging.getLogger("clip_dro.train")


class NonFiniteLoss(UserError):
    """Training produced NaN or inf; the message names the step and the batch's sample indices."""


def train_from_cli(config_path: Path, overrides: list[str]) -> Path:
    """``--config`` is a YAML file or the name of a shipped config (``tiny_cpu``), so installs from a wheel
    need no checkout."""
    return train(load_config(resolve_config_path(config_path), overrides))


def _accelerator(precision: str, run_dir: Path, collective_timeout_s: int, report_to: list[str]) -> Accelerator:
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: fp16 needs a GPU; use bf16 or fp32 on the CPU")
    trackers.check_installed(report_to)
    processes = join_processes(collective_timeout_s)  # the Accelerator takes this state
    return Accelerator(cpu=processes.device.type == "cpu",
                       mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
                       **trackers.accelerator_arguments(report_to, run_dir))


@contextmanager
def _stop_on_signal() -> Iterator[list[bool]]:
    """Ctrl-C (SIGINT) and a scheduler's SIGTERM become a flag, read after each step's forward pass and between
    evaluation batches, so that the step in flight completes and a consistent checkpoint can be written."""
    flag = [False]

    def handler(signum, frame):
        flag[0] = True

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _forget_metrics_after(path: Path, step: int) -> None:
    """Drop the lines a stopped run logged after the step this run starts from (they will be logged again;
    all of them when it starts afresh), and a last line cut short by a kill, so that metrics.jsonl reads as
    one uninterrupted run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class Trainer:
    """Builds everything a run needs from a validated config, then runs the loop."""

    def __init__(self, cfg: Config, accelerator: Accelerator):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.accelerator = acc = accelerator
        if cfg.data.train is None:
            raise UserError("data.train: not set; point it at a prep output directory")
        self.sources = TrainSources(cfg.data.train)
        self.lanes = check_layout(self.sources.name, self.sources.num_shards, cfg.data.batch_size,
                                  acc.num_processes, cfg.data.workers, cfg.data.lanes)
        self.global_batch = cfg.data.batch_size * acc.num_processes
        # Checked now (no image is decoded) so that a bad eval set fails before training, not after it.
        self.evaluation = PeriodicEvaluation(cfg.eval.retrieval, cfg.eval.zeroshot, cfg.eval.batch_size,
                                             cfg.eval.workers, cfg.eval.on_bad_image)
        self.resume_from = resolve_resume(cfg.train.resume, self.run_dir)
        if self.resume_from is not None:
            check_resumable(self.resume_from, cfg, self.sources, self.global_batch, self.lanes)
        # A run that has a checkpoint of its own (train.resume=latest, a requeued job) continues it instead.
        init_from = None if self.resume_from is not None else resolve_init_from(
            cfg.train.init_from, self.run_dir, self.sources, cfg.model.name, cfg.loss.name)

        set_seed(cfg.train.seed)
        self.bundle = build_model(**vars(cfg.model))
        model = self.bundle.model
        # Our losses bring their own temperatures; an unused parameter would stall DDP.
        for name in ("logit_scale", "logit_bias"):
            if isinstance(getattr(model, name, None), torch.nn.Parameter):
                getattr(model, name).requires_grad_(False)

        self.loader = TrainLoader(self.sources, self.bundle.preprocess_train, self.bundle.tokenizer,
                                  cfg.data.batch_size, seed=cfg.train.seed, rank=acc.process_index,
                                  world_size=acc.num_processes, workers=cfg.data.workers, lanes=self.lanes,
                                  shuffle_buffer=cfg.data.shuffle_buffer, background=cfg.data.background,
                                  on_bad_sample=cfg.data.on_bad_sample, weights=cfg.data.weights,
                                  samples_per_epoch=cfg.data.samples_per_epoch)
        if cfg.data.feature_cache is not None:
            model, self.loader = cached_training(cfg.data.feature_cache, cfg.model.name, model, self.loader,
                                                 self.bundle.preprocess_eval, acc.device, cfg.data.batch_size)
        self.loss_fn = build_loss(cfg.loss.name, self.sources.num_images, self.sources.num_texts,
                                  state_device=cfg.loss.state_device, **cfg.loss.hyperparameters()).to(acc.device)

        self.total_steps = cfg.train.max_steps or sum(self.loader.steps_in_epoch(e) for e in range(cfg.train.epochs))
        if self.total_steps < 1:
            raise UserError(f"data.train: {self.sources.name} yields no full global batch of {self.global_batch}")
        optimizer = build_optimizer(model, self.loss_fn.parameters(), cfg.train.lr, cfg.train.weight_decay)
        # The schedule is by global step; accelerate's scheduler wrapper would step it once per process.
        self.scheduler = warmup_cosine(optimizer, cfg.train.warmup_steps, self.total_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.towers = TowerForward(acc, self.model, cfg.train.accum_steps)
        note = describe_batchnorm(model, cfg.train.accum_steps)
        if note and acc.is_main_process:
            log.warning(note)
        self.global_step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.saved_step: Optional[int] = None  # the step of the checkpoint last written or resumed from
        if self.resume_from is not None:
            self._load(self.resume_from)
            self.saved_step = self.global_step
        elif init_from is not None:
            load_warm_start(init_from, model, self.loss_fn, self.optimizer if cfg.train.init_optimizer else None)
            acc.print(f"started from {init_from}" + (" with its optimizer state" if cfg.train.init_optimizer else ""))
        if acc.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")
            _forget_metrics_after(self.run_dir / "metrics.jsonl", self.global_step)
        self.tracker_runs = trackers.start(acc, self.resume_from, self.global_step, cfg.to_dict())

    # -- checkpoints -------------------------------------------------------------------------------------

    def _state(self) -> TrainerState:
        return TrainerState(self.global_step, self.epoch, self.step_in_epoch, self.sources.dataset_id,
                            self.sources.num_images, self.sources.num_texts, self.cfg.model.name,
                            self.cfg.loss.name, self.scheduler.state_dict(), self.global_batch, self.lanes,
                            self.sources.layout())

    def _open_clip_state_dict(self) -> dict:
        state = open_clip_model(self.accelerator.unwrap_model(self.model)).state_dict()
        for name in ("logit_scale", "logit_bias"):  # the loss's learned ones (CLIP, SigLIP), where the model has one
            if name in state and hasattr(self.loss_fn, name):
                state[name] = getattr(self.loss_fn, name).detach().reshape(state[name].shape).cpu()
        return state

    def save(self, name: str) -> Path:
        """Write checkpoint ``name`` (``checkpoints/step-N`` or ``final``), every process its part, and keep
        the newest ``train.keep_checkpoints``."""
        final_dir = save_checkpoint(self.accelerator, self.run_dir / name, self.loss_fn, self._open_clip_state_dict,
                                    self.cfg, self._state(), self.tracker_runs)
        if self.accelerator.is_main_process:
            prune(self.run_dir, self.cfg.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return final_dir

    def _load(self, directory: Path) -> None:
        state = load_checkpoint(self.accelerator, directory, self.bundle.model, self.loss_fn)
        self.scheduler.load_state_dict(state.scheduler)
        self.global_step, self.epoch, self.step_in_epoch = state.global_step, state.epoch, state.step_in_epoch
        self.accelerator.print(f"resumed from {directory} at step {self.global_step}")

    # -- one step ----------------------------------------------------------------------------------------

    def _skip_bad_samples(self, batch: TrainBatch, stop_requested: bool) -> tuple[bool, bool]:
        """Agree, before the forward pass, whether any process's batch holds bad samples; such a step is
        skipped everywhere and counted. Returns (skipped, stop)."""
        acc = self.accelerator
        bad, stops = sum_over_processes(self.accelerator.device, len(batch.bad), stop_requested)
        bad, stop = int(bad), stops > 0
        if bad:
            self._log({"step": self.global_step + 1, "skipped_samples": bad, "skipped_examples": list(batch.bad[:5])})
            acc.print(f"warning: step {self.global_step + 1} skipped: {bad} bad samples"
                      + (f" (first: {batch.bad[0]})" if batch.bad else ""))
        return bad > 0, stop

    def _nonfinite(self, what: str, batch: TrainBatch) -> bool:
        """Report a NaN/inf; returns True when the run should skip the batch, raises when it should stop."""
        indices = batch.image_index.tolist()
        message = f"non-finite {what} at step {self.global_step + 1} (image_index of this process's batch: {indices})"
        if self.cfg.train.on_nonfinite == "skip":
            self.accelerator.print(f"warning: {message}; batch skipped")
            return True
        raise NonFiniteLoss(message + "; stopped, the last checkpoint is intact")

    def step(self, batch: TrainBatch, stop_signal: list[bool]) -> tuple[Optional[float], bool]:
        """One optimizer step; returns (loss or None when skipped, whether every process agreed to stop)."""
        acc = self.accelerator
        if self.cfg.data.on_bad_sample == "skip":
            skipped, stop = self._skip_bad_samples(batch, stop_signal[0])
            if skipped:
                return None, stop
        images = batch.images.to(acc.device, non_blocking=True)
        tokens = batch.tokens.to(acc.device, non_blocking=True)
        image_features, text_features = self.towers.features(images, tokens)
        finite = bool(torch.isfinite(image_features).all() and torch.isfinite(text_features).all())
        # The stop flag is read here, after the forward pass: a signal that arrives during this step stops
        # the run after it, on every process at once.
        nonfinite, stops = sum_over_processes(self.accelerator.device, not finite, stop_signal[0])
        stop = stops > 0
        if nonfinite:
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
        self.towers.backward_towers(image_features, text_features)
        if self.cfg.train.grad_clip_norm is not None:
            acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn.after_optimizer_step()
        return loss.item(), stop

    # -- the loop ----------------------------------------------------------------------------------------

    def _log(self, metrics: dict) -> None:
        trackers.log(self.accelerator, metrics, metrics.get("step", self.global_step))

    def evaluate(self, stop_signal: list[bool]) -> bool:
        """Evaluate on every process; returns whether a stop signal cut it short (the same answer on every
        process). An evaluation error stops every process with its message."""
        if not self.evaluation:
            return False
        acc = self.accelerator
        results = self.evaluation.run(open_clip_model(acc.unwrap_model(self.model)), self.bundle.tokenizer,
                                      self.bundle.preprocess_eval, acc.device, should_stop=lambda: stop_signal[0])
        if results is None:
            return True
        for result in results:
            self._log({"step": self.global_step, "eval": result["task"], "dataset": result["dataset"],
                       **result["metrics"], "skipped_images": result["skipped_images"]})
            acc.print(describe(result, self.global_step))
        return False

    def _log_step(self, loss: float, window_samples: int, elapsed: float, bar: tqdm) -> None:
        metrics = {"step": self.global_step, "epoch": self.epoch, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                   "samples_per_s": window_samples / max(elapsed, 1e-9), **self.loss_fn.stats()}
        if torch.cuda.is_available():
            metrics["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self._log(metrics)
        bar.set_postfix(loss=f"{loss:.4f}", sps=f"{metrics['samples_per_s']:.0f}", lr=f"{metrics['lr']:.2e}",
                        tau=f"{metrics.get('tau_img_mean', float('nan')):.3f}/"
                            f"{metrics.get('tau_txt_mean', float('nan')):.3f}")

    def _train_steps(self, stop_signal: list[bool], bar: tqdm) -> bool:
        """Steps until the end of training or an agreed stop; returns whether it stopped early. Checkpoints
        and periodic evaluations happen on their schedule."""
        cfg = self.cfg
        window_start, window_samples = time.perf_counter(), 0
        while self.global_step < self.total_steps:
            steps = self.loader.steps_in_epoch(self.epoch)
            if self.step_in_epoch >= steps:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                continue
            for batch in self.loader.epoch(self.epoch, start_step=self.step_in_epoch):
                self.loss_fn.set_epoch(self.epoch + self.step_in_epoch / steps)
                loss, stopped = self.step(batch, stop_signal)
                self.global_step += 1
                self.step_in_epoch += 1
                window_samples += self.global_batch
                if loss is not None and self.global_step % cfg.train.log_every == 0:
                    self._log_step(loss, window_samples, time.perf_counter() - window_start, bar)
                    window_start, window_samples = time.perf_counter(), 0
                bar.update(1)
                if cfg.train.checkpoint_every and self.global_step % cfg.train.checkpoint_every == 0:
                    self.save(f"checkpoints/step-{self.global_step}")
                    self.saved_step = self.global_step
                if cfg.train.eval_every and self.global_step % cfg.train.eval_every == 0 and self.evaluate(stop_signal):
                    stopped = True
                if stopped:
                    return True
                if self.global_step >= self.total_steps or self.step_in_epoch >= steps:
                    break
        return False

    def run(self) -> Path:
        """Train to the end and evaluate; on SIGINT/SIGTERM write a checkpoint and raise KeyboardInterrupt."""
        acc = self.accelerator
        bar = tqdm(total=self.total_steps, initial=self.global_step, disable=not acc.is_local_main_process,
                   desc=f"train {self.cfg.loss.name}", dynamic_ncols=True)
        # The bar closes (ending its line) whatever happens, so an error message starts on a line of its own.
        with _stop_on_signal() as stop_signal:
            with bar:
                stopped = self._train_steps(stop_signal, bar)
            if stopped:
                path = self.run_dir / f"checkpoints/step-{self.global_step}"
                if self.saved_step != self.global_step:
                    self.save(f"checkpoints/step-{self.global_step}")
                acc.print(f"interrupted at step {self.global_step}; resume with train.resume=latest ({path})")
                acc.end_training()
                raise KeyboardInterrupt
            final = self.run_dir / "final"
            if self.saved_step != self.global_step or self.resume_from != final:
                self.save("final")
            interrupted = self.evaluate(stop_signal)
        acc.end_training()
        if interrupted:
            acc.print(f"evaluation interrupted; the run is complete in {final}: evaluate it with clip-dro eval")
            raise KeyboardInterrupt
        return final


@contextmanager
def _run_dir_locked(run_dir: Path, acc: Accelerator) -> Iterator[None]:
    """The main process holds the run directory's lock for the block; every process learns whether it got
    it, so that a refused second run stops on all its ranks at once."""
    handle, message = None, ""
    if acc.is_main_process:
        try:
            handle = lock_run_dir(run_dir)
        except RunDirBusy as exc:
            message = str(exc)
    message = from_main(message)
    if message:
        raise RunDirBusy(message)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def train(cfg: Config) -> Path:
    """Train as configured; returns the ``final`` checkpoint directory."""
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A peer that died or hung (past train.collective_timeout_s) ends the run with one line, not a C++ trace.
    with peer_failures_in_one_line():
        accelerator = _accelerator(cfg.train.precision, run_dir, cfg.train.collective_timeout_s, cfg.train.report_to)
        with _run_dir_locked(run_dir, accelerator):
            return Trainer(cfg, accelerator).run()
