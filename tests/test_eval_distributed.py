"""design.md §5.4: evaluation on every process gives the numbers of one process: ``clip-dro eval`` under torchrun, and
the trainer's evaluations at two processes; an error in one process's slice stops all of them."""
import json
from pathlib import Path

import pytest

from clip_dro.bench import launch
from clip_dro.cli import main
from clip_dro.evaluation.run import evaluate_from_cli
from evalgen import eval_set_args, make_checkpoint
from test_eval_run import BATCH
from test_trainer import TINY, overrides

pytestmark = pytest.mark.slow  # torchrun


def _assert_same_results(got: list[dict], want: list[dict]) -> None:
    """Equal, not close: the processes' slices are cut at batch boundaries, so they encode exactly the
    batches one process encodes."""
    assert [(r["task"], r["dataset"], r["skipped_images"], r["skipped_examples"]) for r in got] == \
           [(r["task"], r["dataset"], r["skipped_images"], r["skipped_examples"]) for r in want]
    for a, b in zip(got, want):
        assert a["metrics"] == b["metrics"], a["dataset"]


def test_eval_on_two_processes_equals_one(tmp_path, bad_sets):
    """Sets with undecodable images (11 + 12 + 9 of them) in batches of 4 at 2 and 3 processes: slices of
    unequal length, skipped images in some slices only; results and the skipped list as one process's."""
    bad, _ = bad_sets
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=3)
    assert main(["eval", "--checkpoint", str(ckpt), *eval_set_args(bad), "--batch-size", str(BATCH), "--workers", "1",
                 "--output", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    for nproc in (2, 3):
        output = tmp_path / f"{nproc}.json"
        done = launch.run(["eval", "--checkpoint", str(ckpt), *eval_set_args(bad), "--batch-size", str(BATCH),
                           "--workers", "1", "--output", str(output)], nproc=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("results: ") == 1, "only the main process writes and prints"
        _assert_same_results(json.loads(output.read_text())["results"], one["results"])


def test_bad_image_error_in_one_slice_stops_every_process(tmp_path, bad_sets):
    """The bad image lies in the second process's slice: both stop with its message, none waits forever."""
    ckpt = make_checkpoint(tmp_path / "ckpt")
    done = launch.run(["eval", "--checkpoint", str(ckpt), "--retrieval", str(bad_sets[0] / "coco_test"),
                       "--batch-size", str(BATCH), "--workers", "1", "--on-bad-image", "error"], nproc=2)
    assert done.returncode != 0
    # Split on the prefix, not on lines: the two processes write to one pipe, and a line is not the unit of that.
    errors = ["clip-dro eval: error: " + part.splitlines()[0]
              for part in done.stderr.split("clip-dro eval: error: ")[1:]]
    assert len(errors) == 2 and errors[0] == errors[1], done.stderr[-3000:]
    assert "shard-00001.tar: sample 000000005: cannot decode the image" in errors[0]
    # (torchrun itself then reports the failed children with a traceback of its own)
    assert not (ckpt / "eval.json").exists()


def test_training_evaluates_on_every_process(tmp_path, data):
    """The final evaluation of a two-process run logs what one process computes on the final checkpoint."""
    sets = {"eval.retrieval": f"[{data / 'retrieval'}]", "eval.zeroshot": f"[{data / 'zeroshot'}]",
            "eval.batch_size": 32, "eval.workers": 1, "data.batch_size": 8, "train.max_steps": 2}
    done = launch.run(["train", "--config", str(TINY), *overrides(data, tmp_path / "run", **sets)], nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    logged = [{"task": m["eval"], "dataset": m["dataset"], "skipped_images": m["skipped_images"],
               "skipped_examples": [], "metrics": {k: v for k, v in m.items()
                                                   if k not in ("step", "eval", "dataset", "skipped_images")}}
              for m in logged if "eval" in m]
    alone = evaluate_from_cli(tmp_path / "run", [], [], tmp_path / "alone.json", batch_size=32, export=None)
    _assert_same_results(logged, alone["results"])
    assert [r["dataset"] for r in logged] == ["retrieval", "zeroshot"]
    assert Path(tmp_path / "run/final/temperatures.csv").is_file()
