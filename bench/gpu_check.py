"""The GPU check behind bench/gpu_check.sh: writes OUTPUT/gpu_check.json and prints a table."""
import argparse
import json
import time
from pathlib import Path

import torch

from clip_dro.bench.train_step import bench_train_step
from clip_dro.config import load_config
from clip_dro.models import CONFIGS_DIR
from clip_dro.trainer import train
from data_prep.synthetic import prep_synthetic


def trainer_throughput(data: Path, out: Path, loss: str, steps: int) -> dict:
    cfg = load_config(CONFIGS_DIR / "vit_b32_isogclr.yaml", [
        f"data.train={data / 'train'}", "data.batch_size=512", "data.workers=8", "data.lanes=8", "loss.rho=5.5",
        f"train.max_steps={steps}", "train.checkpoint_every=0", "train.log_every=10", "train.warmup_steps=10",
        f"train.output_dir={out / loss}", "eval.retrieval=[]", "eval.zeroshot=[]", f"loss.name={loss}",
        "train.precision=bf16"])
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train(cfg)
    lines = [json.loads(x) for x in (out / loss / "metrics.jsonl").read_text().splitlines()]
    steady = [m["samples_per_s"] for m in lines if "samples_per_s" in m][1:]
    return {"loss": loss, "steps": steps, "wall_s": time.perf_counter() - start,
            "samples_per_s": sum(steady) / len(steady), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    assert torch.cuda.is_available(), "no GPU"
    report = {"device": torch.cuda.get_device_name(0)}
    report["step"] = bench_train_step("ViT-B-32", batch_size=512, repeats=10, device="cuda", precision="bf16")
    print(json.dumps(report["step"], indent=1))
    data = Path("/tmp/gpu_check_data")
    prep_synthetic(output=data, num_train=40_000, seed=0, workers=12)
    report["trainer"] = [trainer_throughput(data, Path("/tmp/gpu_check_runs"), loss, args.steps)
                         for loss in ("clip", "isogclr")]
    (args.output / "gpu_check.json").write_text(json.dumps(report, indent=2))
    for row in report["trainer"]:
        print(f"{row['loss']:8s} {row['samples_per_s']:8.0f} samples/s  peak {row['peak_gib']:.1f} GiB")
    s = report["step"]
    print(f"step only: iSogCLR/CLIP time ratio {s['ratio']:.3f}, peak {s['ours_peak_gib']:.1f} / "
          f"{s['baseline_peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
