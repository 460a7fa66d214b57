"""Benchmarks of the scale-out layout (design.md §5, §7.2, §8): per-sample state bytes per process and the
collectives a step adds, checkpoint writes by every process against one process writing everything, and
evaluation at 1 and 2 processes. Processes are spawned on this machine with gloo.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clip_dro.checkpoint import shard_name, write_temperature_shard
from clip_dro.distributed import Processes
from clip_dro.losses import ISogCLRLoss
from clip_dro.losses.state import StateShard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, target: Callable, *args: Any) -> list[Any]:
    """``target(rank, world, *args)`` in ``world`` gloo processes; their return values by rank."""
    with tempfile.TemporaryDirectory() as results:
        mp.spawn(_entry, args=(world, _free_port(), results, target, args), nprocs=world, join=True)
        return [torch.load(Path(results) / f"{rank}.pt", weights_only=False) for rank in range(world)]


def _entry(rank: int, world: int, port: int, results: str, target: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(target(rank, world, *args), Path(results) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


class _CountedCollectives:
    """Counts the collectives (and their bytes) that pass through torch.distributed while installed."""

    NAMES = ("all_gather", "all_reduce")

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._originals = {name: getattr(dist, name) for name in self.NAMES}

    def __enter__(self) -> "_CountedCollectives":
        for name, original in self._originals.items():
            def counted(*args, _name=name, _original=original, **kwargs):
                tensor = args[1] if _name == "all_gather" else args[0]
                self.calls.append((_name, tensor.numel() * tensor.element_size()))
                return _original(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _state_and_step(rank: int, world: int, num_ids: int, batch: int, dim: int) -> dict[str, Any]:
    loss = ISogCLRLoss(num_ids, num_ids)
    allocated = sum(b.nbytes for name, b in loss.named_buffers() if name.startswith(("img.", "txt.")))
    gen = torch.Generator().manual_seed(rank)
    local = batch // world
    features = [torch.nn.functional.normalize(torch.randn(local, dim, generator=gen), dim=1) for _ in range(2)]
    ids = torch.randint(num_ids, (local,), generator=gen)
    loss(*features, ids, ids)  # warm-up: the first step checks ρ
    with _CountedCollectives() as counted:
        loss(*features, ids, ids)
    return {"allocated": allocated, "collectives": counted.calls}


def bench_state_bytes(num_ids: int = 1_000_000, worlds: tuple[int, ...] = (1, 2, 4), batch: int = 512,
                      dim: int = 512, simulated_ids: int = 400_000_000) -> list[dict]:
    """Per-sample state bytes per process at each W (allocated buffers, against 13 B x 2 sides x ceil(N/W)),
    the collectives of one iSogCLR step per process (count and bytes), and the arithmetic for a dataset of
    ``simulated_ids`` image-text pairs."""
    # what the layout promises: each side's bytes per sample (13 for iSogCLR) for the ids a process owns
    per_pair = sum(ISogCLRLoss(1, 1).bytes_per_sample().values())
    rows = []
    for world in worlds:
        per_rank = _spawn(world, _state_and_step, num_ids, batch, dim)
        expected = per_pair * StateShard(0, world).size(num_ids)
        calls = per_rank[0]["collectives"]
        rows.append({"case": "state_bytes", "W": world, "ids": num_ids, "B": batch,
                     "bytes_per_process": max(r["allocated"] for r in per_rank), "arithmetic_bytes": expected,
                     "collectives_per_step": len(calls), "collective_bytes_per_step": sum(b for _, b in calls),
                     "collectives": [f"{name} {size} B" for name, size in calls]})
    for world in (1, 8, 64, 512):
        rows.append({"case": "state_bytes_simulated", "W": world, "ids": simulated_ids,
                     "bytes_per_process": per_pair * StateShard(0, world).size(simulated_ids)})
    return rows


def _write_shard(rank: int, world: int, num_ids: int, directory: str) -> dict[str, Any]:
    loss = ISogCLRLoss(num_ids, num_ids)
    dist.barrier()
    start = time.perf_counter()
    shard = Path(directory) / shard_name(rank, world, "pt")
    torch.save(loss.state_dict(), shard)
    temperatures = Path(directory) / shard_name(rank, world, "npz")
    write_temperature_shard(temperatures, loss.owned_temperatures())
    dist.barrier()  # the checkpoint is written when the last process is done
    return {"seconds": time.perf_counter() - start, "bytes": shard.stat().st_size + temperatures.stat().st_size}


def bench_checkpoint_write(num_ids: int = 50_000_000, world: int = 2) -> dict:
    """Seconds and bytes per process to write the iSogCLR state of ``num_ids`` images and as many texts:
    every process writing its shard (``.pt`` + temperatures ``.npz``) in parallel, against one process writing
    the whole state and a CSV row per image and caption (the layout before sharding)."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        state = ISogCLRLoss(num_ids, num_ids).state_dict()
        start = time.perf_counter()
        torch.save(state, Path(tmp) / "loss_state.pt")
        frames = [pd.DataFrame({"side": side, "index": range(num_ids), "tau": state[f"{prefix}.tau"].numpy()})
                  for side, prefix in (("image", "img"), ("text", "txt"))]
        pd.concat(frames, ignore_index=True).to_csv(Path(tmp) / "temperatures.csv", index=False)
        rank0_s = time.perf_counter() - start
        rank0_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir())
        del state, frames
        for path in Path(tmp).iterdir():
            path.unlink()
        per_rank = _spawn(world, _write_shard, num_ids, tmp)
    sharded_s = max(r["seconds"] for r in per_rank)
    return {"case": "checkpoint_write", "ids": num_ids, "W": world, "ours_s": sharded_s, "baseline_s": rank0_s,
            "ratio": sharded_s / rank0_s, "bytes_per_process": max(r["bytes"] for r in per_rank),
            "baseline_bytes_rank0": rank0_bytes,
            "note": "ours: every process writes its shard in parallel; baseline: rank 0 writes the whole state "
                    "and temperatures.csv"}


def _evaluate(rank: int, world: int, data: str, batch_size: int) -> dict[str, Any]:
    from clip_dro.evaluation.run import evaluate_sets, prepare_eval_sets
    from clip_dro.models import build_model

    torch.manual_seed(0)  # the same random model in every process
    bundle = build_model("tiny-vit")
    retrieval, zeroshot = prepare_eval_sets([Path(data) / "retrieval"], [Path(data) / "zeroshot"])
    dist.barrier()
    start = time.perf_counter()
    results = evaluate_sets(bundle.model, bundle.tokenizer, bundle.preprocess_eval, retrieval, zeroshot, batch_size,
                            "cpu", workers=0, processes=Processes.current())
    return {"seconds": time.perf_counter() - start, "results": results}


def bench_eval(data: Path, batch_size: int = 128) -> dict:
    """Seconds to evaluate the synthetic retrieval and zero-shot sets with the tiny ViT at 1 and 2 processes
    (one thread each), and the largest difference between their metrics (percentage points)."""
    one = _spawn(1, _evaluate, str(data), batch_size)[0]
    two = _spawn(2, _evaluate, str(data), batch_size)
    difference = max(abs(a["metrics"][k] - b["metrics"][k])
                     for a, b in zip(one["results"], two[0]["results"]) for k in a["metrics"])
    two_s = max(r["seconds"] for r in two)
    return {"case": "eval_processes", "W": 2, "ours_s": two_s, "baseline_s": one["seconds"],
            "ratio": two_s / one["seconds"], "max_metric_difference": difference,
            "note": "ours: 2 processes, baseline: 1 process (one thread each)"}
