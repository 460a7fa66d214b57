"""Faults a cluster inflicts, each struck once at a fixed point (bench/faults.py strikes many times at random
points for the README's figures): the last complete checkpoint stays intact and resuming from it gives
exactly the run that was never interrupted. The scenarios live in clip_dro.bench.faults."""
import pytest

from clip_dro.bench import faults

pytestmark = pytest.mark.slow  # every scenario runs clip-dro in processes


@pytest.fixture(scope="module")
def reference(data, module_tmp):
    return faults.reference_runs(data, module_tmp("reference"))


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill9_during_training(data, reference, tmp_path, nproc):
    faults.kill9_during_training(data, reference, tmp_path / "run", nproc, at_step=5)


def test_kill9_inside_a_checkpoint_write(data, reference, tmp_path):
    faults.kill9_inside_checkpoint_write(data, reference, tmp_path / "run", step=4)


@pytest.mark.parametrize("damage", sorted(faults.DAMAGES))
def test_damaged_shard_is_one_line_naming_shard_and_key(data, tmp_path, damage):
    line = faults.damaged_shard(data, tmp_path / "run", damage)
    if damage == "index outside the state":
        assert "image_index 1000000 is outside" in line


@pytest.mark.parametrize("damage", sorted(faults.DAMAGES))
def test_damaged_shard_skipped_deterministically(data, tmp_path, damage):
    faults.damaged_shard_skipped(data, tmp_path / "run", damage, at_step=5)


def test_disk_full_while_checkpointing(data, reference, tmp_path):
    faults.disk_full_while_checkpointing(data, reference, tmp_path / "run", from_step=2, file_limit=1 << 20)


def test_sigterm_during_evaluation(data, reference, tmp_path):
    faults.sigterm_during_evaluation(data, reference, tmp_path / "run", eval_every=4)


def test_sigterm_in_the_first_step_after_resume(data, reference, tmp_path):
    faults.sigterm_in_first_step_after_resume(data, reference, tmp_path / "run", from_step=4)


def test_second_run_on_one_output_dir(data, reference, tmp_path):
    faults.two_runs_on_one_directory(data, reference, tmp_path / "run", at_step=3)


def test_survivor_of_a_dead_peer_exits_with_one_line(data, tmp_path):
    faults.peer_dies(data, tmp_path / "run", at_step=3)
