"""The GPU check behind bench/gpu_check.sh: writes OUTPUT/gpu_check.json and prints a table.

Defaults are the GPU case (ViT-B-32, batch 512, bf16). A CPU dry run of the same code path, to check the
script before spending GPU time: ``python bench/gpu_check.py --output /tmp/g --model tiny-vit --batch 32
--precision fp32 --num-train 1000 --steps 20 --workers 1 --lanes 2``.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from clip_dro.bench.train_step import bench_train_step
from clip_dro.config import load_config
from clip_dro.resources import CONFIGS_DIR
from clip_dro.trainer import train
from data_prep.synthetic import prep_synthetic


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def trainer_throughput(data: Path, out: Path, loss: str, args: argparse.Namespace) -> dict:
    cfg = load_config(CONFIGS_DIR / "vit_b32_isogclr.yaml", [
        f"model.name={args.model}", f"data.train={data / 'train'}", f"data.batch_size={args.batch}",
        f"data.workers={args.workers}", f"data.lanes={args.lanes}", "loss.rho=5.5",
        f"train.max_steps={args.steps}", "train.checkpoint_every=0", f"train.log_every={max(1, min(10, args.steps // 2))}",
        f"train.warmup_steps={min(10, args.steps // 2)}",
        f"train.output_dir={out / loss}", "train.resume=null", "eval.retrieval=[]", "eval.zeroshot=[]", f"loss.name={loss}",
        f"train.precision={args.precision}"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train(cfg)
    lines = [json.loads(x) for x in (out / loss / "metrics.jsonl").read_text().splitlines()]
    rates = [m["samples_per_s"] for m in lines if "samples_per_s" in m]
    steady = rates[1:] or rates  # the first window includes start-up
    return {"loss": loss, "steps": args.steps, "wall_s": time.perf_counter() - start,
            "samples_per_s": sum(steady) / len(steady), "peak_gib": peak_gib()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--num-train", type=int, default=40_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--lanes", type=int, default=8)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "args": vars(args) | {
        "output": str(args.output)}}
    report["step"] = bench_train_step(args.model, batch_size=args.batch, repeats=10, device=device,
                                      precision=args.precision)
    print(json.dumps(report["step"], indent=1))
    data = args.output / f"data-{args.num_train}"
    prep_synthetic(output=data, num_train=args.num_train, seed=0, workers=args.workers)
    report["trainer"] = [trainer_throughput(data, args.output / "runs", loss, args)
                         for loss in ("clip", "isogclr")]
    (args.output / "gpu_check.json").write_text(json.dumps(report, indent=2))
    for row in report["trainer"]:
        print(f"trainer {row['loss']:8s} {row['samples_per_s']:8.0f} samples/s  peak {row['peak_gib']:.1f} GiB")
    s = report["step"]
    print(f"step only: iSogCLR/CLIP time ratio {s['ratio']:.3f}; samples/s {s['ours_samples_per_s']:.0f} / "
          f"{s['baseline_samples_per_s']:.0f}; peak {s.get('ours_peak_gib', float('nan')):.1f} / "
          f"{s.get('baseline_peak_gib', float('nan')):.1f} GiB")


if __name__ == "__main__":
    main()
