"""Every command the README shows, run as written against miniature stand-ins of the data it names.

The commands are read from README.md itself, so an edit that breaks one breaks a test here. Each is scaled to
a 2-core CPU by the rules of ``scaled`` (two processes for eight GPUs, two training steps, the tiny model,
small shards); the README's table "Documented commands under test" lists them with these tests.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pandas as pd
import pytest
import torch
import yaml

from datagen import caption, image_bytes, write_images, write_wds_input
from benchmark_standins import write_readme_standins
from evalgen import make_imagefolder
from standins import write_resnet50_state_dict, write_tiny_distilbert
from test_shipped_configs import tiny_model_overrides

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
QUICKSTART_RUNS = ("clip", "sogclr", "isogclr")  # the default --losses


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in joined.splitlines()]
    return [re.sub(r"\s+", " ", line) for line in lines if line and not line.startswith("#")]


COMMANDS = [c for block in fenced_blocks(README, "bash") for c in shell_commands(block)]


def _config_of(command: str) -> Path:
    match = re.search(r"configs/(\S+)\.yaml", command) or re.search(r"--config (\w+)(?:\s|$)", command)
    assert match, f"no config in {command!r}"
    return ROOT / "configs" / f"{match.group(1)}.yaml"


def _config_paths(config: Path, workspace: Path) -> list[str]:
    """Overrides pointing the config's /data paths at the stand-ins."""
    out = []
    for section, values in yaml.safe_load(config.read_text()).items():
        for key, value in values.items():
            if isinstance(value, str) and value.startswith("/data/"):
                out.append(f"{section}.{key}={workspace}{value}")
            elif isinstance(value, list) and any(str(v).startswith("/data/") for v in value):
                out.append(f"{section}.{key}=[{','.join(f'{workspace}{v}' for v in value)}]")
    return out


def train_overrides(config: Path, workspace: Path) -> list[str]:
    """The config's /data paths pointed at the stand-ins, its model swapped for the tiny one (each config's
    own model is built in test_shipped_configs), two steps."""
    data = yaml.safe_load(config.read_text())
    return _config_paths(config, workspace) + tiny_model_overrides(data.get("model", {})) + ["train.max_steps=2"]


def scaled(command: str, workspace: Path) -> Optional[str]:
    """The README command as it runs here; None for those that need what CI has not (a GPU, the network)."""
    if " && " in command:
        parts = [scaled(part, workspace) for part in command.split(" && ")]
        return " && ".join(p for p in parts if p is not None) or None
    if command.startswith("pip install") or command == "pytest":
        return None  # .ci/run runs the install and test commands themselves (test_ci_runs_the_readme_install...)
    if command.startswith("bash bench/gpu_check.sh") and not torch.cuda.is_available():
        return None  # GPU only; its CPU dry run (python bench/gpu_check.py ...) is run instead
    command = command.replace(" /data/", f" {workspace}/data/").replace("'/data/", f"'{workspace}/data/")
    if "tuxpaint" in command and not TUXPAINT_STAMPS.is_dir():
        return None  # needs Debian's tuxpaint-stamps-default; test_prep_tuxpaint.py runs a stand-in of it
    if command.startswith("clip-dro prep tuxpaint"):
        return command
    if command.startswith("clip-dro compare"):
        return re.sub(r"--seeds \d+", "--seeds 2", command) + " train.max_steps=2 data.batch_size=32"
    if command.startswith("clip-dro prep synthetic"):
        return command + " --num-train 480"
    if command.startswith("clip-dro prep"):
        return command + " --shard-size 8"
    if command.startswith("clip-dro quickstart"):
        return command + " --steps 2 --num-train 480 --seeds 2"
    if command.startswith("clip-dro bench"):
        return command + " --quick"
    if command.startswith("python bench/gpu_check.py"):
        return command.replace("--num-train 1000", "--num-train 300").replace("--steps 20", "--steps 4")
    if command.startswith("clip-dro eval --model"):  # the tiny model in ViT-B-32's (RN50's) place, a state dict of it
        command = re.sub(r"--model (ViT-B-32|RN50) ", "--model tiny-vit ", command)
        return command.replace(" /weights/", f" {workspace}/weights/")
    if "/weights/" in command:  # the paper's own model, on stand-in weight files of the same formats
        command = command.replace("/weights/", f"{workspace}/weights/")
        return " ".join([command, *_config_paths(_config_of(command), workspace), "train.max_steps=1",
                         "data.batch_size=4", "data.lanes=2", "data.workers=1", "eval.batch_size=8"])
    if "-m clip_dro.cli eval " in command:
        return command.replace("--nproc_per_node 8", "--nproc_per_node 2")
    if re.search(r"\btrain --config |launch/multinode.sh |sbatch ", command):
        command = command.replace("--nproc_per_node 8", "--nproc_per_node 2")
        command = command.replace("--config_file launch/accelerate_8gpu.yaml",
                                  "--config_file launch/accelerate_8gpu.yaml --num_processes 2")
        command = command.replace("MASTER_ADDR=node0", "MASTER_ADDR=127.0.0.1 GPUS_PER_NODE=2")
        command = command.replace("NNODES=4", "NNODES=1")
        return command + " " + " ".join(train_overrides(_config_of(command), workspace))
    return command


# Stand-ins for SLURM's commands: sbatch runs the script here with one node of two "GPUs"; srun runs its
# command once; scontrol names this host.
SLURM_STANDINS = {
    "sbatch": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
              'SLURM_JOB_NODELIST=localhost SLURM_NNODES=1 SLURM_NODEID=0 SLURM_GPUS_PER_NODE=2 exec bash "$@"\n',
    "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
    "scontrol": '#!/bin/bash\necho 127.0.0.1\n',
}


@pytest.fixture(scope="module")
def workspace(module_tmp) -> Path:
    """What the README's commands name, in miniature: an img2dataset download of CC3M (332 tars, some
    downloads failed), Karpathy JSONs with their images, a parquet table, Flickr30K and ImageNet-val
    stand-ins; a working directory with the repository's configs/, launch/ and bench/."""
    root = module_tmp("readme")
    data = root / "data"
    (data / "cc3m").mkdir(parents=True)
    for shard in range(332):
        samples = []
        for j in range(2):
            i = (2 * shard + j) % 200
            failed = (2 * shard + j) % 97 == 0
            samples.append({"__key__": f"{shard:05d}{j:04d}", "jpg": None if failed else image_bytes(i),
                            "txt": caption(i, 0).encode(), "json": json.dumps({"key": f"{shard}-{j}"}).encode()})
        write_wds_input(data / "cc3m" / f"{shard:05d}.tar", samples)
    home = root / "home"
    home.mkdir()
    names = write_images(data / "coco", range(40))
    train_records = [{"image": names[i], "caption": caption(i, j)} for i in range(40) for j in range(2)]
    test_records = [{"image": names[i], "caption": [caption(i, j) for j in range(3)]} for i in range(12)]
    (home / "coco_karpathy_train.json").write_text(json.dumps(train_records))
    (home / "coco_karpathy_test.json").write_text(json.dumps(test_records))
    names = write_images(data / "imgs", range(30))
    pd.DataFrame({"filepath": [names[i % 30] for i in range(45)],
                  "title": [caption(i % 30, i // 30) for i in range(45)]}).to_parquet(home / "pairs.parquet")
    make_imagefolder(data / "imagenet_val", ["n01440764", "n01443537", "n01484850"], per_class=4,
                     classnames=["tench", "goldfish", "great white shark"])
    for name in ("configs", "launch", "bench"):
        (home / name).symlink_to(ROOT / name)
    write_resnet50_state_dict(root / "weights/resnet50-0676ba61.pth")
    write_tiny_distilbert(root / "weights/distilbert-base-uncased")
    write_readme_standins(data, root / "weights")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, text in SLURM_STANDINS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return root


def run_command(command: str, workspace: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{workspace / 'bin'}:{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", f"set -euo pipefail; {command}"], cwd=workspace / "home", env=env,
                          capture_output=True, text=True, timeout=900)


def _check_outputs(command: str, workspace: Path) -> None:
    """What each kind of command must leave behind."""
    home = workspace / "home"
    if command.startswith("clip-dro prep"):
        output = Path(re.search(r"--output (\S+)", command).group(1))
        output = output if output.is_absolute() else home / output
        for manifest in [output / "manifest.json"] if (output / "manifest.json").is_file() else \
                [output / s / "manifest.json" for s in ("train", "retrieval", "zeroshot")]:
            m = json.loads(manifest.read_text())
            assert m["accepted"] + m["rejected"] == m["source"]["rows"] and m["num_samples"] > 0, manifest
    elif re.search(r"\btrain --config |launch/multinode.sh |sbatch ", command):
        config = yaml.safe_load(_config_of(command).read_text())
        run_dir = home / config["train"]["output_dir"]
        assert (run_dir / "final/model.pt").is_file()
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evaluated = {line["dataset"] for line in lines if "eval" in line}
        assert evaluated == {Path(p).name for p in config["eval"]["retrieval"] + config["eval"]["zeroshot"]}
    elif command.startswith("clip-dro eval --model") and command.count("--model ") > 1:
        _check_model_comparison(command, workspace)
    elif command.startswith("clip-dro eval --model"):
        output = home / re.search(r"--output (\S+)", command).group(1)
        document = json.loads(output.read_text())
        assert document["model"] == "tiny-vit" and document["pretrained"].endswith("/weights/ViT-B-32.pt")
        datasets = [r["dataset"] for r in document["results"]]
        words = command.split()
        named = [w for flag in ("--retrieval", "--zeroshot") if flag in words
                 for w in itertools.takewhile(lambda w: not w.startswith("--"), words[words.index(flag) + 1:])]
        assert len(datasets) == len(named), (datasets, named)
        written = {json.loads(p.read_text())["dataset"] for p in (output.parent / "clip_benchmark").glob("*.json")}
        assert set(datasets) <= written
    elif command.startswith("clip-dro eval --checkpoint quickstart"):
        _check_quickstart_tail(home / re.search(r"--output (\S+)", command).group(1), home / "quickstart")
    elif command.startswith("clip-dro eval"):
        results = json.loads((home / "results.json").read_text())["results"]
        assert [r["dataset"] for r in results] == ["coco_karpathy_test", "flickr30k_karpathy_test", "imagenet_val"]
        assert (home / "model_open_clip.pt").is_file()
    elif "-m clip_dro.cli eval " in command:
        results = json.loads((home / "imagenet.json").read_text())["results"]
        assert [r["dataset"] for r in results] == ["imagenet_val"]
        single = json.loads((home / "results.json").read_text())["results"][-1]
        assert results[0]["metrics"] == pytest.approx(single["metrics"], abs=1e-9), "the numbers of one process"
    elif command.startswith("clip-dro compare"):
        output = home / re.search(r"--output (\S+)", command).group(1)
        losses = re.search(r"--losses (\S+)", command)
        losses = losses.group(1).split(",") if losses else ["clip", "sogclr", "isogclr"]
        runs = json.loads((output / "comparison.json").read_text())["runs"]
        assert sorted((r["loss"], r["seed"]) for r in runs) == sorted(itertools.product(losses, range(2)))
        table = pd.read_csv(output / "comparison.csv")
        assert set(table["loss"]) == set(losses) and (output / "comparison.png").is_file()
    elif command.startswith("clip-dro quickstart"):
        runs = json.loads((home / "quickstart/comparison.json").read_text())["runs"]
        assert sorted((r["loss"], r["seed"]) for r in runs) == sorted(itertools.product(QUICKSTART_RUNS, range(2)))
        assert set(pd.read_csv(home / "quickstart/comparison.csv")["loss"]) == set(QUICKSTART_RUNS)
        # the README's iSogCLR − SogCLR figures are read from pairwise.csv
        pairs = pd.read_csv(home / "quickstart/pairwise.csv")
        assert {"acc1", "r_mean"} <= {m.split("/")[-1] for m in pairs[(pairs["loss"] == "isogclr")
                                                                      & (pairs["versus"] == "sogclr")]["metric"]}
        assert "| zeroshot/acc1 | isogclr − sogclr |" in (home / "quickstart/comparison.md").read_text()
    elif command.startswith("clip-dro bench"):
        results = json.loads((home / "bench.json").read_text())["results"]
        assert {"loss_step", "train_step", "loader", "prep", "state_bytes", "checkpoint_write",
                "eval_processes"} <= {r["case"] for r in results}
        for r in results:  # the scale-out cases check what they measure
            if r["case"] == "state_bytes":
                assert r["bytes_per_process"] == r["arithmetic_bytes"], r
                assert r["collectives_per_step"] == (0 if r["W"] == 1 else 3), r
            if r["case"] == "eval_processes":
                assert r["max_metric_difference"] == 0.0, r


def _table_equals_single_results(table: pd.DataFrame, label: str, results: list[dict]) -> None:
    """The comparison table's row of ``label`` holds every metric of that model's single-model ``results``."""
    for result in results:
        for metric, value in result["metrics"].items():
            assert table.loc[label, f"{result['dataset']}/{metric}"] == pytest.approx(value, abs=1e-9), (label, metric)


def _check_model_comparison(command: str, workspace: Path) -> None:
    """One row per model, each equal to that model's results alone: ViT-B-32's from the single-model README
    command on the same sets (run before), RN50's evaluated here."""
    from clip_dro.evaluation.run import evaluate_from_cli

    home = workspace / "home"
    output = home / re.search(r"--output (\S+)", command).group(1)
    table = pd.read_csv(output / "comparison.csv", index_col="model")
    assert table.index.tolist() == ["tiny-vit ViT-B-32.pt", "tiny-vit RN50.pt"]
    sets = [f"{workspace}/data/wds_mscoco_captions", f"{workspace}/data/wds_cifar10"]
    alone = json.loads((home / "vit_b32_wds.json").read_text())
    assert [r["dataset"] for r in alone["results"]] == [Path(s).name for s in sets]
    _table_equals_single_results(table, "tiny-vit ViT-B-32.pt", alone["results"])
    rn50 = evaluate_from_cli(model="tiny-vit", pretrained=workspace / "weights/RN50.pt", retrieval=sets[:1],
                             zeroshot=sets[1:], output=workspace / "rn50_alone/eval.json")
    _table_equals_single_results(table, "tiny-vit RN50.pt", rn50["results"])
    assert not table.loc["tiny-vit RN50.pt"].equals(table.loc["tiny-vit ViT-B-32.pt"])  # two models, not one twice
    assert (output / "comparison.md").read_text().count("\n| tiny-vit ") == 2 and (output / "comparison.png").is_file()


def _check_quickstart_tail(output: Path, quickstart: Path) -> None:
    """A row per run (the quickstart's seed 0 of each loss), equal to the quickstart's own evaluation of it, with
    the terciles' accuracy; each run's document with its tail analysis over every held-out image."""
    names = [f"{loss}-seed0" for loss in QUICKSTART_RUNS]
    table = pd.read_csv(output / "comparison.csv", index_col="model")
    assert table.index.tolist() == names
    own = {f"{r['loss']}-seed{r['seed']}": r["metrics"]
           for r in json.loads((quickstart / "comparison.json").read_text())["runs"]}
    held_out = json.loads((quickstart / "data/zeroshot/manifest.json").read_text())["num_samples"]
    for name in names:
        document = json.loads((output / f"{name}.json").read_text())
        assert [r["dataset"] for r in document["results"]] == ["retrieval", "zeroshot"]
        for result in document["results"]:
            for metric, value in result["metrics"].items():
                assert value == pytest.approx(own[name][f"{result['dataset']}/{metric}"], abs=1e-9), (name, metric)
        _table_equals_single_results(table, name, document["results"])
        zeroshot = document["results"][1]["tail"]
        assert sum(zeroshot["per_class"]["images"]) == held_out  # every image, by class
        assert table.loc[name, "zeroshot/tail:tail"] == pytest.approx(zeroshot["terciles"]["tail"]["accuracy"])
        assert (output / "tail" / name / "zeroshot_tail.png").is_file()
    assert (output / "comparison.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i:02d}-{c[:40]}" for i, c in enumerate(COMMANDS)])
def test_readme_command(command, workspace):
    runnable = scaled(command, workspace)
    if runnable is None:
        pytest.skip(f"not runnable here, covered elsewhere: {command}")
    if "/data/flickr30k_karpathy_test" in runnable and not (workspace / "data/flickr30k_karpathy_test").exists():
        # The README preps COCO's test split only; Flickr30K's is prepared the same way.
        shutil.copytree(workspace / "data/coco_karpathy_test", workspace / "data/flickr30k_karpathy_test")
    if re.search(r"\btrain --config |launch/multinode.sh |sbatch ", runnable):
        # Each command starts its own run; other runs stay for the commands that evaluate them.
        output_dir = yaml.safe_load(_config_of(runnable).read_text())["train"]["output_dir"]
        shutil.rmtree(workspace / "home" / output_dir, ignore_errors=True)
    proc = run_command(runnable, workspace)
    assert proc.returncode == 0, f"{runnable}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    _check_outputs(runnable, workspace)


def test_readme_has_the_documented_commands():
    """The tour keeps every kind of command (a README edit that drops one is caught here)."""
    starts = ["clip-dro quickstart", "clip-dro prep wds", "clip-dro prep coco", "clip-dro prep csv",
              "clip-dro prep synthetic", "clip-dro prep tuxpaint", "clip-dro compare", "clip-dro train --config", "accelerate launch --config_file launch/accelerate_1gpu",
              "accelerate launch --config_file launch/accelerate_8gpu", "torchrun", "bash launch/multinode.sh",
              "sbatch", "clip-dro eval", "-m clip_dro.cli eval", "clip-dro eval --model", "--train-data", "clip-dro bench", "python bench/gpu_check.py"]
    for start in starts:
        assert any(start in c for c in COMMANDS), start


def test_ci_runs_the_readme_install_and_test_command():
    ci = (ROOT / ".ci/run").read_text()
    test_command = next(c for c in COMMANDS if c.endswith("pytest"))
    assert test_command in ci


def test_library_snippet_runs_as_written():
    (snippet,) = [b for b in fenced_blocks(README, "python") if "ISogCLRLoss" in b]
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    loss_fn, image_index = scope["loss_fn"], scope["image_index"]
    assert scope["image_features"].grad is not None and torch.isfinite(scope["loss"])
    visited = torch.zeros(scope["num_images"], dtype=torch.bool)
    visited[image_index] = True
    assert loss_fn.tau_img.shape == (scope["num_images"],)
    assert torch.all(loss_fn.tau_img[~visited] == 0.01), "only the batch's temperatures may move"
    assert not torch.all(loss_fn.tau_img[visited] == 0.01), "the batch's temperatures must move"


def test_readme_table_lists_every_command():
    table = README.split("### Documented commands under test", 1)[1].split("\n### ", 1)[0]
    listed = re.findall(r"^\| `([^`]+)`", table, flags=re.M)
    for command in COMMANDS:
        assert any(command.startswith(row) for row in listed), f"README table lacks a row for: {command}"
