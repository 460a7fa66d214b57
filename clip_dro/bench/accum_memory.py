"""Peak activation memory of one training step, the global batch whole against gradient caching
(``train.accum_steps``), each measured in a fresh process so that one's peak cannot hide the other's.

On the CPU (Linux) the figure is the process's peak resident memory during one step at the full batch above
its resident memory before it: after a step at a tiny batch has allocated the gradients and AdamW's moments,
free heap memory is handed back (``malloc_trim``) and the kernel's peak counter reset (``/proc/self/clear_refs``),
so earlier peaks and cached memory do not hide the step's; on a GPU it is ``torch.cuda.max_memory_allocated``
above what was allocated before the step. Either way it is what the step
adds beyond model, gradients and optimizer state: activations (one micro-batch's with caching), the loss's
B x B blocks and the cached features.
"""
from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from clip_dro.bench.train_step import step_setup
from clip_dro.grad_cache import TowerForward


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``: the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_rss_peak() -> int:
    """Return free heap memory to the system and restart the peak counter; the resident bytes now."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def measure_step(model_name: str, batch_size: int, accum_steps: int, device: str, num_samples: int = 10_000) -> dict:
    """In this process: one warm-up step at 2 samples per micro-batch, then one step at ``batch_size`` taken as
    the trainer takes it (``TowerForward``, the loss once, ``accelerator.backward``); returns its peak bytes and
    seconds."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=device == "cpu")
    setup = step_setup("isogclr", num_samples, device, loss_keys=dict(tau_init=0.05, tau_min=0.01, rho=3.0),
                       name=model_name)
    towers = TowerForward(accelerator, setup.model, accum_steps)
    dev = torch.device(device)

    def step(size: int) -> None:
        images = torch.randn(size, 3, setup.image_size, setup.image_size, device=dev)
        tokens = torch.randint(1, 1000, (size, setup.context), device=dev)
        index = torch.randperm(num_samples)[:size]
        image, text = towers.features(images, tokens)
        accelerator.backward(setup.loss_fn(image, text, index, index))
        towers.backward_towers(image, text)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=False)  # kept allocated: the measured step adds activations only

    step(2 * accum_steps)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = _reset_rss_peak()
    start = time.perf_counter()
    step(batch_size)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        peak = _status_bytes("VmHWM") - before
    return {"peak_bytes": peak, "seconds": time.perf_counter() - start}


def bench_accum_memory(model_name: str = "tiny-vit", batch_size: int = 128, accum_steps: int = 4,
                       device: str = "cpu") -> dict:
    """Peak step memory at ``accum_steps`` against 1 for the same global batch (ratio; the towers' part falls
    as 1/k, the loss's B x B blocks and the features do not shrink)."""
    measured = {}
    for k in (1, accum_steps):
        proc = subprocess.run([sys.executable, "-m", __name__, model_name, str(batch_size), str(k), device],
                              capture_output=True, text=True, check=True)
        measured[k] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, base = measured[accum_steps], measured[1]
    how = "CUDA max_memory_allocated" if device == "cuda" else "peak RSS (VmHWM, reset) over RSS before"
    return {"case": "accum_memory", "model": model_name, "B": batch_size, "accum_steps": accum_steps,
            "device": device, "ours_step_s": ours["seconds"], "baseline_step_s": base["seconds"],
            "ratio": ours["peak_bytes"] / base["peak_bytes"], "target": 1.0 / accum_steps,
            "bytes_per_process": ours["peak_bytes"], "baseline_bytes": base["peak_bytes"],
            "note": f"ours: train.accum_steps={accum_steps}, baseline: 1, same global batch; ratio of the step's "
                    f"peak memory beyond model and optimizer ({how}, a fresh process each)"}


if __name__ == "__main__":
    name, batch, k, where = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    print(json.dumps(measure_step(name, batch, k, where)))
