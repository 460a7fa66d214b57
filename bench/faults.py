"""The fault-injection figures: each fault struck ``--trials`` times at random points on the tiny setup
(1 and 2 processes, one loader worker), then the promise checked: the last complete checkpoint intact, and
resuming gives exactly the uninterrupted run (weights, optimizer state, every τ and s).

usage: python bench/faults.py [--trials N] [--seed S] [--output faults.json]
Writes the trials and a summary table (JSON and Markdown, for the README). About 30 s per trial on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from clip_dro.bench import faults


def scenarios(rng: random.Random):
    """(fault name, how it is struck, function of (data, reference, run_dir) -> None) for one trial."""
    steps, every = faults.STEPS, faults.CHECKPOINT_EVERY
    at = rng.randint(1, steps - 1)
    yield ("kill -9 of the training process", f"after step {at}",
           lambda d, r, out: faults.kill9_during_training(d, r, out, 1, at))
    at2 = rng.randint(1, steps - 1)
    yield ("kill -9 of one of 2 processes", f"after step {at2}",
           lambda d, r, out: faults.kill9_during_training(d, r, out, 2, at2))
    ck = rng.choice(range(every, steps, every))
    yield ("kill -9 inside a checkpoint write", f"step-{ck}",
           lambda d, r, out: faults.kill9_inside_checkpoint_write(d, r, out, ck))
    damage = rng.choice(sorted(faults.DAMAGES))
    yield ("damaged shard met in training (stop)", damage, lambda d, r, out: faults.damaged_shard(d, out, damage))
    skip_damage, skip_at = rng.choice(sorted(faults.DAMAGES)), rng.randint(1, steps - 1)
    yield ("damaged shard met in training (skip), kill -9", f"{skip_damage}, after step {skip_at}",
           lambda d, r, out: faults.damaged_shard_skipped(d, out, skip_damage, skip_at))
    frm, limit = rng.choice(range(every, steps - every + 1, every)), rng.choice([1 << 16, 1 << 20, 1 << 23])
    yield ("disk full while checkpointing", f"from step-{frm}, files <= {limit >> 10} KiB",
           lambda d, r, out: faults.disk_full_while_checkpointing(d, r, out, frm, limit))
    ev = rng.choice(range(every, steps, every))
    yield ("SIGTERM during evaluation", f"evaluation after step {ev}",
           lambda d, r, out: faults.sigterm_during_evaluation(d, r, out, ev))
    first = rng.choice(range(every, steps, every))
    yield ("SIGTERM in the first step after resume", f"resumed from step-{first}",
           lambda d, r, out: faults.sigterm_in_first_step_after_resume(d, r, out, first))
    lock_at = rng.randint(1, steps - 1)
    yield ("two runs on one output_dir", f"first run held at step {lock_at}",
           lambda d, r, out: faults.two_runs_on_one_directory(d, r, out, lock_at))
    peer_at = rng.randint(1, 10)
    yield ("one process of two dies", f"after step {peer_at}",
           lambda d, r, out: faults.peer_dies(d, out, peer_at))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("faults.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = faults.prep_data(root / "data")
        reference = faults.reference_runs(data, root / "reference")
        for trial in range(args.trials):
            for number, (fault, point, strike) in enumerate(scenarios(rng)):
                start = time.perf_counter()
                try:
                    strike(data, reference, root / f"t{trial}-{number}")
                    outcome = {"survived": True, "lost": ""}
                except AssertionError as exc:
                    outcome = {"survived": False, "lost": str(exc).splitlines()[0][:300]}
                trials.append({"fault": fault, "point": point, **outcome, "seconds": time.perf_counter() - start})
                print(f"{fault:40s} {point:36s} {'survived' if outcome['survived'] else 'LOST: ' + outcome['lost']}",
                      flush=True)
                write_report(trials, args.output)  # so far: a long run can be read while it goes
    print(write_report(trials, args.output))


def write_report(trials: list[dict], output: Path) -> str:
    """The summary table (Markdown, returned) and every trial (JSON) for what has run so far."""
    summary: dict[str, dict] = {}
    for t in trials:
        row = summary.setdefault(t["fault"], {"trials": 0, "survived": 0, "lost": []})
        row["trials"] += 1
        row["survived"] += t["survived"]
        if not t["survived"]:
            row["lost"].append(t["lost"])
    lines = ["| fault | trials | survived with exact resume | data or state lost |", "|---|---:|---:|---|"]
    lines += [f"| {fault} | {row['trials']} | {row['survived']} | {'; '.join(row['lost']) or 'nothing'} |"
              for fault, row in summary.items()]
    output.write_text(json.dumps({"trials": trials, "summary": summary}, indent=2) + "\n")
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
