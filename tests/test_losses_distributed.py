"""design.md §5.1: two processes with batch b each are the same computation as one process with batch 2b."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import losses_dist_worker as worker
from clip_dro.bench import launch
from clip_dro.losses import LossStateSizeError, build_loss
from clip_dro.losses.state import StateShard, reshard

pytestmark = pytest.mark.slow  # every test reads the records of a torchrun of two processes


@pytest.fixture(scope="module")
def two_process_records(module_tmp) -> list[dict]:
    out = module_tmp("dist")
    done = launch.run([str(out)], nproc=2, entry=[str(Path(worker.__file__))], timeout=180,
                      env=launch.environment(PYTHONWARNINGS="ignore"))
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def _whole_state(name: str, shards: list[dict]) -> dict:
    """The state of every id, assembled from the processes' states by a one-process loss."""
    loss = build_loss(name, worker.NUM_IMAGES, worker.NUM_TEXTS, **worker.KWARGS)
    loss.load_state_shards(shards)
    return loss.state_dict()


@pytest.mark.parametrize("name", worker.NAMES)
def test_two_processes_match_one_process_with_the_whole_batch(two_process_records, name):
    """50 SGD steps (float64 towers, so that nothing drifts) with repeated ids, sharded state: loss, gradients
    and per-sample state as with one process."""
    single = worker.run_steps(name, rank=0, world_size=1)
    records = [r[(name, "sharded")] for r in two_process_records]
    assert len(single) == len(records[0]) == worker.STEPS
    for step, want in enumerate(single):
        for rank, got in enumerate(r[step] for r in records):
            where = f"{name} rank {rank} step {step}"
            assert_close(got["value"], want["value"], rtol=1e-10, atol=1e-12, msg=where)
            assert got["grads"].keys() == want["grads"].keys()
            for key in want["grads"]:  # after DDP's mean over the two processes
                assert_close(got["grads"][key], want["grads"][key], rtol=1e-9, atol=1e-12, msg=f"{where} {key}")
        whole = _whole_state(name, [r[step]["state"] for r in records])
        for key in want["state"]:  # float32 as stored: an ulp apart at most
            assert_close(whole[key], want["state"][key], rtol=1e-6, atol=1e-6, msg=f"{name} step {step} {key}")
    moved = single[-1]["state"]
    if "img.tau" in moved:  # the temperatures really moved after the warm-up step
        assert not torch.all(moved["img.tau"] == worker.KWARGS["tau_init"])


@pytest.mark.parametrize("name", worker.NAMES)
def test_sharded_and_replicated_state_compute_the_same(two_process_records, name):
    """The sharded layout holds N/W ids per process and computes exactly what the replicated one does."""
    for rank, record in enumerate(two_process_records):
        for step, (sharded, replicated) in enumerate(zip(record[(name, "sharded")], record[(name, "replicated")])):
            where = f"{name} rank {rank} step {step}"
            assert torch.equal(sharded["value"], replicated["value"]), where
            for key in replicated["grads"]:
                assert torch.equal(sharded["grads"][key], replicated["grads"][key]), f"{where} {key}"
            assert int(sharded["state"]["shard_layout"][1]) == 2 and int(replicated["state"]["shard_layout"][1]) == 1
            for key, value in replicated["state"].items():
                if key.startswith(("img.", "txt.")):  # rank r keeps ids r, r + 2, ...: exactly its share
                    assert torch.equal(sharded["state"][key], value[rank::2]), f"{where} {key}"
    # the replicated layout holds the same state on every process
    last = [r[(name, "replicated")][-1]["state"] for r in two_process_records]
    for key in last[0]:
        assert torch.equal(last[0][key], last[1][key]), key


def test_state_resharded_at_any_number_of_processes(two_process_records):
    """Shards saved by 2 processes load into a layout of 1, 3 or 4 processes id by id."""
    saved = [r[("isogclr", "sharded")][-1]["state"] for r in two_process_records]
    whole = _whole_state("isogclr", saved)
    for world in (1, 3, 4):
        for rank in range(world):  # what process `rank` of `world` loads
            state = reshard(saved, {"img.": worker.NUM_IMAGES, "txt.": worker.NUM_TEXTS}, StateShard(rank, world))
            for key in ("img.tau", "img.m", "img.log_s", "img.visited", "txt.tau", "txt.log_s"):
                assert torch.equal(state[key], whole[key][rank::world]), (world, rank, key)
            assert int(state["step"]) == int(whole["step"]) == worker.STEPS


def test_state_shards_from_another_run_are_refused(two_process_records):
    saved = [r[("isogclr", "sharded")][-1]["state"] for r in two_process_records]
    loss = build_loss("isogclr", worker.NUM_IMAGES, worker.NUM_TEXTS, **worker.KWARGS)
    with pytest.raises(LossStateSizeError, match="shard 1 of 2 processes"):
        loss.load_state_dict(saved[1])
    with pytest.raises(LossStateSizeError, match="not one set"):
        loss.load_state_shards(saved[::-1])
    other = build_loss("isogclr", worker.NUM_IMAGES + 1, worker.NUM_TEXTS, **worker.KWARGS)
    with pytest.raises(LossStateSizeError, match="another dataset"):
        other.load_state_shards(saved)
