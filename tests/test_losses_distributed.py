"""SPEC 4.4: two processes with batch b each are the same computation as one process with batch 2b."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import losses_dist_worker as worker


@pytest.fixture(scope="module")
def two_process_records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(worker.__file__)), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("name", worker.NAMES)
def test_two_processes_match_one_process_with_the_whole_batch(two_process_records, name):
    single = worker.run_steps(name, rank=0, world_size=1)
    for rank, records in enumerate(two_process_records):
        for step, (got, want) in enumerate(zip(records[name], single)):
            where = f"{name} rank {rank} step {step}"
            assert_close(got["value"], want["value"], rtol=1e-5, atol=1e-6, msg=where)
            assert got["grads"].keys() == want["grads"].keys()
            for key in want["grads"]:  # after DDP's mean over the two processes
                assert_close(got["grads"][key], want["grads"][key], rtol=1e-4, atol=1e-6, msg=f"{where} {key}")
            for key in want["state"]:
                assert_close(got["state"][key], want["state"][key], rtol=1e-5, atol=3e-5, msg=f"{where} {key}")
    # every process holds the same state
    for key, tensor in two_process_records[0][name][-1]["state"].items():
        assert torch.equal(tensor, two_process_records[1][name][-1]["state"][key]), key
    moved = single[-1]["state"]
    if "img.tau" in moved:  # the temperatures really moved after the warm-up step
        assert not torch.all(moved["img.tau"] == worker.KWARGS["tau_init"])
