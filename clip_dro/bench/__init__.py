"""``clip-dro bench``: design.md §11's measurements, each side by side with its baseline in one run, as ratios."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd


def run_bench(output: Path, loss_batch_sizes: tuple[int, ...] = (256, 1024, 4096), train_batch: int = 128,
              prep_images: int = 2000, state_ids: int = 1_000_000, checkpoint_ids: int = 50_000_000,
              eval_images: int = 5000, eval_classes: int = 1000) -> dict[str, Any]:
    """Run every case, print the table, write ``{"results": [...]}`` to ``output``."""
    from clip_dro.bench.accum_memory import bench_accum_memory
    from clip_dro.bench.eval_speed import bench_eval_speed
    from clip_dro.bench.feature_cache import bench_feature_cache
    from clip_dro.bench.lane_schedule import bench_lane_schedule
    from clip_dro.bench.loader import bench_loader
    from clip_dro.bench.loss_step import bench_loss_step
    from clip_dro.bench.prep import bench_prep
    from clip_dro.bench.scale_out import bench_checkpoint_write, bench_eval, bench_state_bytes
    from clip_dro.bench.train_step import bench_train_step
    from clip_dro.config import load_config
    from clip_dro.models import build_model
    from clip_dro.resources import CONFIGS_DIR
    from data_prep.synthetic import prep_synthetic

    results: list[dict[str, Any]] = list(bench_loss_step(batch_sizes=loss_batch_sizes, dim=512))
    step = bench_train_step("tiny-vit", batch_size=train_batch)
    results.append(step)
    results.append(bench_accum_memory("tiny-vit", batch_size=train_batch, accum_steps=4))

    cfg = load_config(CONFIGS_DIR / "tiny_cpu.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        prep_synthetic(output=Path(tmp), num_train=max(2000, 8 * train_batch), seed=0, workers=None)
        bundle = build_model("tiny-vit")
        loader = bench_loader(Path(tmp) / "train", bundle.preprocess_train, bundle.tokenizer, train_batch,
                              steps=10, workers=cfg.data.workers)
        evaluation = bench_eval(Path(tmp))
        feature_cache = bench_feature_cache(Path(tmp) / "train", batch_size=train_batch, workers=cfg.data.workers,
                                            loss_keys=cfg.loss.hyperparameters())
    consumed = step["ours_samples_per_s"]
    results.append({"case": "loader", "B": train_batch, "workers": cfg.data.workers,
                    "ours_s": 1.0 / loader["samples_per_s"], "baseline_s": 1.0 / consumed,
                    "ratio": consumed / loader["samples_per_s"], "target": 1.0,
                    "loader_samples_per_s": loader["samples_per_s"], "trainer_samples_per_s": consumed,
                    "note": "ratio = trainer consumption / loader supply per sample; below 1: loader not the bottleneck"})
    results.append(bench_prep(num_images=prep_images, workers=1))
    results.append(bench_lane_schedule(shards=400_000, lanes=512))
    results.extend(bench_state_bytes(num_ids=state_ids))
    results.append(bench_checkpoint_write(num_ids=checkpoint_ids))
    results.append(evaluation)
    results.append(feature_cache)
    results.extend(bench_eval_speed(images=eval_images, classes=eval_classes))

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"results": results}, indent=2) + "\n")
    columns = ["case", "B", "W", "ours_s", "baseline_s", "ratio", "target", "bytes_per_process"]
    frame = pd.DataFrame(results).reindex(columns=columns)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
    print(f"written: {output}")
    return {"results": results}
