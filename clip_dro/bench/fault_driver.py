"""``clip-dro`` with a fault window held open, for the fault scenarios of ``clip_dro.bench.faults``.

usage: python -m clip_dro.bench.fault_driver MARKER POINT CLIP_DRO_ARGS...

POINT is where the run pauses for 60 s after writing the file MARKER, so that a test can strike exactly
there (kill -9, SIGTERM):
* ``checkpoint:N``: inside the write of checkpoint step-N (its files written, before it is complete);
* ``eval``: inside an evaluation (ended early by a stop request, as between two batches);
* ``first-step``: inside the first optimizer step of this process (e.g. right after a resume);
* ``step:N``: at the start of step N (1-based).
Only the main process pauses (others wait for it, as they would for a slow disk or a slow step).
"""
import os
import sys
import time
from pathlib import Path

from clip_dro import checkpoint, trainer
from clip_dro.evaluation import periodic
from clip_dro.cli import main


def hold(marker: Path) -> None:
    if os.environ.get("RANK", "0") == "0":
        marker.write_text(str(os.getpid()))
        time.sleep(60)


def install(marker: Path, point: str) -> None:
    if point.startswith("checkpoint:"):
        step = int(point.split(":")[1])
        write = checkpoint.TrainerState.write

        def paused_write(self, directory):
            if self.global_step == step and directory.name.endswith(".tmp"):
                hold(marker)
            write(self, directory)

        checkpoint.TrainerState.write = paused_write
    elif point == "eval":
        run = periodic.PeriodicEvaluation.run

        def paused_run(self, model, tokenizer, preprocess, device, should_stop):
            # held like a long evaluation: it ends early on a stop request, as one between batches does
            if os.environ.get("RANK", "0") == "0":
                marker.write_text(str(os.getpid()))
                deadline = time.time() + 60
                while time.time() < deadline and not should_stop():
                    time.sleep(0.05)
            return run(self, model, tokenizer, preprocess, device, should_stop)

        periodic.PeriodicEvaluation.run = paused_run
    elif point == "first-step" or point.startswith("step:"):
        target = None if point == "first-step" else int(point.split(":")[1])
        step = trainer.Trainer.step

        def paused_step(self, batch, stop_signal):
            if (target is None and not getattr(self, "_held", False)) or self.global_step + 1 == target:
                self._held = True
                hold(marker)
            return step(self, batch, stop_signal)

        trainer.Trainer.step = paused_step
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    marker, point, *args = sys.argv[1:]
    install(Path(marker), point)
    sys.exit(main(args))
