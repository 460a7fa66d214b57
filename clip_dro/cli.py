"""The ``clip-dro`` console script: parses the command line and hands typed values to the stage that owns them."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable, Optional

from clip_dro import console
from clip_dro.errors import UserError


QUICK_BENCH = dict(loss_batch_sizes=(256,), train_batch=32, prep_images=200, state_ids=10_000,
                   checkpoint_ids=100_000, eval_images=500, eval_classes=20)


def _call(module: str, function: str, **kwargs) -> object:
    """Import a stage lazily (so ``--help`` stays fast) and call it."""
    return getattr(importlib.import_module(module), function)(**kwargs)


def _add_prep_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, type=Path, help="output directory (shards, manifest.json, rejected.jsonl)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-size", type=int, default=None, help="resize so the shorter side is PX (default: keep)")
    p.add_argument("--workers", type=int, default=None, help="parallel image workers (default: CPU count)")
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="write the samples in a seeded random order, so that input sorted by source or class does "
                        "not give clustered batches (default: on)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0; recorded in the manifest)")
    p.add_argument("--background", default="white",
                   help="colour that transparent images are composited onto: a name, #rrggbb or r,g,b "
                        "(default white)")


def _prep_args(args: argparse.Namespace) -> dict:
    return dict(output=args.output, shard_size=args.shard_size, image_size=args.image_size, workers=args.workers,
                shuffle=args.shuffle, seed=args.seed, background=args.background)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-dro", description="CLIP training with iSogCLR: prep, train, eval.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = sub.add_parser("prep", help="turn image-text pairs into webdataset shards with global indices")
    prep_sub = prep.add_subparsers(dest="source", required=True, metavar="SOURCE")

    p = prep_sub.add_parser("synthetic", help="the built-in long-tailed synthetic dataset (train, retrieval, zeroshot)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--num-train", type=int, default=4000, help="number of training images (default 4000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(run=lambda a: _call("data_prep.synthetic", "prep_synthetic", output=a.output,
                                       num_train=a.num_train, seed=a.seed, workers=a.workers))

    p = prep_sub.add_parser("csv", help="any table pandas reads (csv, tsv, parquet, jsonl) of image path + caption")
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--image-col", required=True)
    p.add_argument("--caption-col", required=True)
    p.add_argument("--image-root", type=Path, default=None, help="directory the image paths are relative to")
    _add_prep_common(p)
    p.set_defaults(run=lambda a: _call("data_prep.tabular", "prep_table", input=a.input, image_col=a.image_col,
                                       caption_col=a.caption_col, image_root=a.image_root, **_prep_args(a)))

    p = prep_sub.add_parser("coco", help="Karpathy-style caption JSON (MSCOCO, Flickr30K)")
    p.add_argument("--annotations", required=True, type=Path)
    p.add_argument("--image-root", required=True, type=Path)
    _add_prep_common(p)
    p.set_defaults(run=lambda a: _call("data_prep.coco", "prep_coco", annotations=a.annotations,
                                       image_root=a.image_root, **_prep_args(a)))

    p = prep_sub.add_parser("wds", help="re-shard webdataset shards (e.g. an img2dataset CC3M download)")
    p.add_argument("--input", required=True,
                   help="shard files or URLs, brace patterns expanded: 'cc3m/{00000..00331}.tar', "
                        "'https://host/cc3m/{00000..00331}.tar', 'pipe:aws s3 cp s3://b/{00000..00331}.tar -'")
    _add_prep_common(p)
    p.set_defaults(run=lambda a: _call("data_prep.reshard", "prep_wds", input=a.input, **_prep_args(a)))

    p = prep_sub.add_parser("tuxpaint", help="the Tux Paint stamps (Debian tuxpaint-stamps-default): drawings with "
                                             "English descriptions; train, retrieval and zeroshot splits")
    p.add_argument("--stamps", type=Path, default=Path("/usr/share/tuxpaint/stamps"),
                   help="the stamps directory (default /usr/share/tuxpaint/stamps)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--held-out-fraction", type=float, default=0.2,
                   help="share of each category held out for the retrieval and zeroshot sets (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the shuffle (default 0)")
    p.add_argument("--image-size", type=int, default=None, help="resize so the shorter side is PX (default: keep)")
    p.add_argument("--workers", type=int, default=None, help="parallel image workers (default: CPU count)")
    p.add_argument("--svg-renderer", choices=["auto", "cairosvg", "rsvg-convert", "none"], default="auto",
                   help="renders the SVG stamps (default auto: the first at hand; none, or none at hand: SVG "
                        "stamps are left out and counted)")
    p.add_argument("--train-captions", choices=["description", "category"], default="description",
                   help="training captions: each stamp's description (default), or its category in a few "
                        "templates, the duplicate-heavy variant (the held-out sets keep the descriptions)")
    p.set_defaults(run=lambda a: _call("data_prep.tuxpaint", "prep_tuxpaint", stamps=a.stamps, output=a.output,
                                       held_out_fraction=a.held_out_fraction, seed=a.seed,
                                       image_size=a.image_size, workers=a.workers, svg_renderer=a.svg_renderer,
                                       train_captions=a.train_captions))

    p = sub.add_parser("train", help="train CLIP, SogCLR or iSogCLR from a YAML config")
    p.add_argument("--config", required=True, type=Path,
                   help="a YAML file, or the name of a shipped config (tiny_cpu, pretrained_cpu, cc3m_isogclr, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, values parsed as YAML")
    p.set_defaults(run=lambda a: _call("clip_dro.trainer", "train_from_cli", config_path=a.config,
                                       overrides=a.overrides))

    p = sub.add_parser("eval", help="retrieval and zero-shot classification of checkpoints or any open_clip models; "
                                    "several at once are compared in one table")
    p.add_argument("--checkpoint", nargs="+", action="extend", type=Path, default=None, metavar="DIR",
                   help="run directories or checkpoint directories (several: compared)")
    p.add_argument("--model", action="append", default=None, metavar="NAME",
                   help="an open_clip architecture (ViT-B-32, RN50, ...) or one of configs/models, evaluated with the "
                        "weights of --pretrained; repeat --model NAME --pretrained FILE to compare several")
    p.add_argument("--pretrained", action="append", type=Path, default=None, metavar="FILE",
                   help="with --model, one per --model in order: a local weights file open_clip reads "
                        "(.pt/.pth/.bin/.safetensors state dict, an OpenAI JIT archive); nothing is downloaded")
    p.add_argument("--text-tower", action="append", default=None,
                   help="with --model, one per --model in order: the local Hugging Face directory (or "
                        "package:NAME) of a model whose text tower is a transformers model")
    p.add_argument("--retrieval", nargs="*", default=[],
                   help="retrieval sets: prep directories (or URLs), Karpathy caption JSON files, CLIP_benchmark "
                        "webdataset directories")
    p.add_argument("--zeroshot", nargs="*", default=[],
                   help="zero-shot sets: prep directories (or URLs), ImageFolder / ImageNet-val folders, CIFAR-10/100 "
                        "python archives, CLIP_benchmark webdataset directories")
    p.add_argument("--image-root", nargs="*", type=Path, default=[],
                   help="images of the Karpathy JSON sets: one directory for all, or one per JSON set in order "
                        "(default: each JSON's directory)")
    p.add_argument("--split", choices=["test", "val", "train"], default="test",
                   help="split of Karpathy's dataset_*.json files, CLIP_benchmark webdataset sets and CIFAR "
                        "(default test)")
    p.add_argument("--output", type=Path, default=None,
                   help="results JSON (default: beside the checkpoint; eval.json here with --model); with several "
                        "models a directory for their JSONs and the comparison table and plot (default comparison)")
    p.add_argument("--benchmark-dir", type=Path, default=None,
                   help="where one CLIP_benchmark-shaped JSON per result goes, with benchmark.csv collecting every "
                        "such JSON there (default: clip_benchmark/ beside the results JSON)")
    p.add_argument("--train-data", default=None,
                   help="a prep training set (directory or URL): adds the tail analysis, accuracy by how often "
                        "classes and caption words occur in its captions")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--export", type=Path, default=None, help="also write the checkpoint's open_clip state dict here")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (default 2; 0: none)")
    p.add_argument("--on-bad-image", choices=["skip", "error"], default="skip",
                   help="an image that cannot be decoded is skipped and counted in the results (default), or "
                        "ends the evaluation with an error naming it")
    p.set_defaults(run=lambda a: _call("clip_dro.evaluation.run", "evaluate_from_cli", checkpoint=a.checkpoint,
                                       retrieval=a.retrieval, zeroshot=a.zeroshot, output=a.output,
                                       batch_size=a.batch_size, export=a.export, workers=a.workers,
                                       on_bad_image=a.on_bad_image, model=a.model, pretrained=a.pretrained,
                                       text_tower=a.text_tower, image_root=a.image_root, split=a.split,
                                       benchmark_dir=a.benchmark_dir, train_data=a.train_data))

    p = sub.add_parser("compare", help="train every (loss, seed) of a config, evaluate, and tabulate the paired "
                                       "differences between the losses")
    p.add_argument("--config", required=True, type=Path, help="a YAML file or the name of a shipped config")
    p.add_argument("--losses", default="clip,sogclr,isogclr",
                   help="comma-separated losses; the first is the baseline of the differences (default "
                        "clip,sogclr,isogclr)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (train.seed) for every loss (default 3)")
    p.add_argument("--epochs", type=int, default=None,
                   help="train.epochs for every run, clearing train.max_steps (default: the config's length)")
    p.add_argument("--output", type=Path, default=Path("compare"),
                   help="directory of the runs (runs/LOSS-seedS) and the table (default compare)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as train takes them")
    p.set_defaults(run=lambda a: _call("clip_dro.compare", "run_compare", config=a.config, losses=a.losses,
                                       seeds=a.seeds, epochs=a.epochs, output=a.output, overrides=a.overrides))

    p = sub.add_parser("quickstart", help="prep synthetic data, compare CLIP/SogCLR/iSogCLR over seeds on the CPU")
    p.add_argument("--output", type=Path, default=Path("quickstart"))
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the setup config's)")
    p.add_argument("--num-train", type=int, default=None, help="synthetic training images (default 4000)")
    # The names of quickstart.SETUPS, not imported here: parsing the command line needs no torch.
    p.add_argument("--setup", choices=["locked", "pretrained", "scratch"], default="locked",
                   help="locked: heads on frozen pretrained towers from cached features (locked_cpu.yaml, default, "
                        "5 seeds); pretrained: EfficientNet-Lite0 + MiniLM fine-tuned, as the paper fine-tunes "
                        "its towers (pretrained_cpu.yaml, 1 seed); scratch: a tiny ViT from random weights "
                        "(tiny_cpu.yaml, 1 seed)")
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds per loss (0..N-1: the same data, another initialization and batch order; "
                        "default: the setup's)")
    p.add_argument("--losses", default="clip,sogclr,isogclr",
                   help="comma-separated loss.name values to train and compare (default clip,sogclr,isogclr; "
                        "also rgclg, siglip)")
    p.set_defaults(run=lambda a: _call("clip_dro.quickstart", "run_quickstart", output=a.output, steps=a.steps,
                                       num_train=a.num_train, setup=a.setup, seeds=a.seeds, losses=a.losses))

    p = sub.add_parser("bench", help="benchmark suite: loss step, train step, loader, prep (ratios)")
    p.add_argument("--output", type=Path, default=Path("bench.json"))
    p.add_argument("--quick", action="store_true",
                   help="small sizes only (B = 256, 32-sample train steps, 200 images): checks the suite runs")
    p.set_defaults(run=lambda a: _call("clip_dro.bench", "run_bench", output=a.output,
                                       **(QUICK_BENCH if a.quick else {})))
    return parser


def _log_file(args: argparse.Namespace) -> Optional[Path]:
    """Where a command's third-party log records go (clip_dro.console): the quickstart's output directory."""
    return args.output / "quickstart.log" if args.command == "quickstart" else None


def _write_line(line: str) -> None:
    """One write with its newline: processes of one torchrun share stderr, and print's two writes (text, then
    newline) let two processes' messages run together on one line."""
    sys.stderr.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable = args.run
    console.install()
    try:
        with console.log_to(_log_file(args)):
            run(args)
    except UserError as exc:
        # One line, whatever raised it: a message that quotes a multi-line cause is folded.
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        _write_line(f"clip-dro {args.command}: error: {message}")
        return 2
    except KeyboardInterrupt:
        _write_line(f"clip-dro {args.command}: interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
