"""The feature cache (``data.feature_cache``): with both towers locked entirely, each sample's tower features
(under the heads, :mod:`clip_dro.tower_lock`) are computed once and training reads them instead of images.

Layout of one cache directory, ``ROOT/MODEL-KEYHASH/``:

* ``image.npy`` float32 [num_images, D_image] and ``text.npy`` float32 [num_texts, D_text], memory-mapped,
  rows by the manifest's global image / text index;
* ``samples.npz``: per sample index its image index and its captions' text indices (CSR), which is all the
  batch source (:class:`CachedBatches`) needs to reproduce the loader's batches without opening a shard;
* ``meta.json``: the key (model name, a hash of the frozen towers' weights, the eval transform, the tokenizer,
  the dataset id) and ``complete``, written last.

The key's hash names the directory, so other weights or another transform get a cache of their own and a cache
is reused across runs and losses whenever they match. A directory whose meta.json disagrees with its name, or
whose arrays have the wrong shape (a foreign or damaged cache), is refused in one line; one whose build did not
complete (killed) is built again. Features come from the eval transform: training from the cache drops the
train-time augmentation.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_dro.data import lanes as plan
from clip_dro.data.shard_reader import DECODE_ERRORS, ShardDataError, decode_rgb, raw_sample, shard_samples
from clip_dro.data.train_loader import TrainBatch, TrainLoader
from clip_dro.distributed import from_main, process_group
from clip_dro.errors import UserError
from clip_dro.manifest import Manifest, is_url, join_location
from clip_dro.tower_lock import Head, heads_removed, image_head, text_head

CACHE_IN_DATASET = "dataset"
_META, _SAMPLES = "meta.json", "samples.npz"


class FeatureCacheError(UserError):
    """A feature cache that cannot be used (foreign, damaged, or a model without separable heads)."""


def model_heads(model: nn.Module) -> tuple[Head, Head]:
    heads = image_head(model), text_head(model)
    if None in heads:
        raise FeatureCacheError("data.feature_cache: this model's towers have no separable final projection "
                                "(open_clip ViT, timm or Hugging Face towers have one); set data.feature_cache=null")
    return heads


def cache_root(feature_cache: str, data_dir) -> Path:
    """``dataset``: beside the training data; anything else is the directory itself."""
    if feature_cache != CACHE_IN_DATASET:
        return Path(feature_cache)
    if is_url(data_dir):
        raise FeatureCacheError(f"data.feature_cache: data.train {data_dir} is remote; set data.feature_cache "
                                "to a local directory")
    return Path(data_dir) / "feature_cache"


def _weights_digest(model: nn.Module, heads: tuple[Head, Head]) -> str:
    """sha256 of the frozen towers' state (every tensor but the heads' and the logit scale/bias)."""
    head_params = {id(p) for head in heads for p in head.parameters()}
    skip = {name for name, p in model.named_parameters() if id(p) in head_params} | {"logit_scale", "logit_bias"}
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(model_name: str, model: nn.Module, preprocess: Callable, tokenizer: Callable,
              manifest: Manifest) -> dict[str, Any]:
    heads = model_heads(model)
    # A function in the transform prints with its address, which differs from run to run.
    transform = re.sub(r" at 0x[0-9a-f]+", "", repr(preprocess))
    return {"model": model_name, "weights_sha256": _weights_digest(model, heads), "transform": transform,
            "tokenizer": f"{type(tokenizer).__name__}(context_length={getattr(tokenizer, 'context_length', None)})",
            "dataset_id": manifest.dataset_id, "num_images": manifest.num_images, "num_texts": manifest.num_texts,
            "num_samples": manifest.num_samples}


def cache_dir(root: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return root / f"{key['model']}-{digest}"


@torch.no_grad()
def tower_features(model: nn.Module, images: Optional[torch.Tensor], tokens: Optional[torch.Tensor]
                   ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The locked towers' outputs under their heads (eval mode), as the cache stores them."""
    was_training = model.training
    model.eval()
    try:
        with heads_removed(model, list(model_heads(model))):
            return (None if images is None else model.encode_image(images).float(),
                    None if tokens is None else model.encode_text(tokens).float())
    finally:
        model.train(was_training)


class CachedHeads(nn.Module):
    """The CLIP model seen from cached features: forward(image features, text features) applies the heads and
    returns what the model's own forward returns (normalized embeddings, logit scale). ``clip`` is the whole
    open_clip model, whose state dict the checkpoints hold."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self._heads = model_heads(clip)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor):
        image_head_, text_head_ = self._heads
        return (F.normalize(image_head_(image_features), dim=-1), F.normalize(text_head_(text_features), dim=-1),
                self.clip.logit_scale.exp())


def open_clip_model(module: nn.Module) -> nn.Module:
    """The open_clip model inside an (unwrapped) training module."""
    return module.clip if isinstance(module, CachedHeads) else module


@dataclass
class FeatureCache:
    directory: Path
    image: np.ndarray  # memmap [num_images, D_image]
    text: np.ndarray  # memmap [num_texts, D_text]
    sample_image: np.ndarray  # [num_samples]
    caption_offsets: np.ndarray  # [num_samples + 1]
    caption_text: np.ndarray  # text index of every caption, sample after sample

    @classmethod
    def open(cls, directory: Path, key: dict[str, Any]) -> "FeatureCache":
        """Open a complete cache read-only, checking that it is the one ``key`` names."""
        def refuse(why: str) -> FeatureCacheError:
            return FeatureCacheError(f"data.feature_cache: {directory} {why}; delete the directory to build it "
                                     "again, or point data.feature_cache elsewhere")
        try:
            meta = json.loads((directory / _META).read_text())
            stored = meta["key"]
            differing = sorted(k for k in set(key) | set(stored) if key.get(k) != stored.get(k))
            if differing:
                raise refuse(f"holds features of another {', '.join(differing)} than this run's (a foreign cache)")
            image = np.load(directory / "image.npy", mmap_mode="r")
            text = np.load(directory / "text.npy", mmap_mode="r")
            with np.load(directory / _SAMPLES) as table:
                sample_image, offsets, captions = table["image_index"], table["offsets"], table["text_index"]
        except FeatureCacheError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise refuse(f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                         ) from None
        for name, array, rows in (("image.npy", image, key["num_images"]), ("text.npy", text, key["num_texts"]),
                                  (_SAMPLES, sample_image, key["num_samples"])):
            if array.shape[0] != rows or array.dtype.kind not in "fi":
                raise refuse(f"has {array.shape[0]} rows in {name}, the dataset {rows} (a damaged cache)")
        return cls(directory, image, text, sample_image, offsets, captions)


def _state(directory: Path, key: dict[str, Any]) -> str:
    """``build`` (absent or incomplete) or ``open``."""
    try:
        meta = json.loads((directory / _META).read_text())
    except (OSError, ValueError):
        return "build"
    return "open" if meta.get("complete") else "build"


def _write_meta(directory: Path, key: dict[str, Any], complete: bool) -> None:
    tmp = directory / (_META + ".tmp")
    tmp.write_text(json.dumps({"key": key, "complete": complete}, indent=1))
    tmp.replace(directory / _META)


def _barrier() -> None:
    if process_group()[1] > 1:
        torch.distributed.barrier()


def open_or_build(root: Path, key: dict[str, Any], build: Callable[[Path, int, int], None]) -> FeatureCache:
    """The cache ``key`` names under ``root``, built first if absent or incomplete; every process calls it (a
    collective). ``build(directory, rank, world)`` writes this process's share of the rows."""
    directory = cache_dir(root, key)
    rank, world = process_group()
    decision = from_main(_state(directory, key) if rank == 0 else "")
    if decision == "build":
        if rank == 0:
            print(f"feature cache: computing tower features into {directory}", flush=True)
            directory.mkdir(parents=True, exist_ok=True)
            _write_meta(directory, key, complete=False)
        _barrier()
        build(directory, rank, world)
        _barrier()
        if rank == 0:
            _merge_tables(directory, world, key["num_samples"])
            _write_meta(directory, key, complete=True)
        _barrier()
    return FeatureCache.open(directory, key)


def _merge_tables(directory: Path, world: int, num_samples: int) -> None:
    image_index = np.full(num_samples, -1, dtype=np.int64)
    counts = np.zeros(num_samples, dtype=np.int64)
    captions: dict[int, np.ndarray] = {}
    for rank in range(world):
        part_path = directory / f"samples-{rank}-of-{world}.npz"
        with np.load(part_path) as part:
            index, offsets, texts = part["index"], part["offsets"], part["text_index"]
            image_index[index] = part["image_index"]
            for i, sample in enumerate(index.tolist()):
                captions[sample] = texts[offsets[i]:offsets[i + 1]]
                counts[sample] = offsets[i + 1] - offsets[i]
        part_path.unlink()
    if (image_index < 0).any():
        raise FeatureCacheError(f"data.feature_cache: sample {int(np.argmax(image_index < 0))} was never read "
                                "while building the cache (the manifest's sample indices have a gap)")
    offsets = np.concatenate([[0], np.cumsum(counts)])
    text_index = np.concatenate([captions[i] for i in range(num_samples)]).astype(np.int64)
    np.savez(directory / _SAMPLES, image_index=image_index, offsets=offsets, text_index=text_index)


def build_share(directory: Path, rank: int, world: int, *, model: nn.Module, loader: TrainLoader,
                preprocess: Callable, device: torch.device, batch_size: int) -> None:
    """Shards rank, rank + world, ... : images through ``preprocess`` (the eval transform) and every caption
    through the tokenizer, then the locked towers; rows written into the shared memory-mapped arrays."""
    key = json.loads((directory / _META).read_text())["key"]
    dims = [f.shape[1] for f in tower_features(model.to(device), *_probe(loader, preprocess, device))]
    if rank == 0:  # created once, at full size, before any process writes (the barrier after build_share)
        np.lib.format.open_memmap(directory / "image.npy", "w+", np.float32, (key["num_images"], dims[0])).flush()
        np.lib.format.open_memmap(directory / "text.npy", "w+", np.float32, (key["num_texts"], dims[1])).flush()
    _barrier()
    image_rows = np.load(directory / "image.npy", mmap_mode="r+")
    text_rows = np.load(directory / "text.npy", mmap_mode="r+")
    index, image_index, offsets, text_index = [], [], [0], []
    pending: list = []

    def flush() -> None:
        images = torch.stack([preprocess(img) for _, img, _ in pending]).to(device)
        tokens = loader.tokenizer([c for _, _, caps in pending for c in caps]).to(device)
        img_feats, txt_feats = tower_features(model, images, tokens)
        image_rows[[s.image_index for s, _, _ in pending]] = img_feats.cpu().numpy()
        text_rows[[t for s, _, _ in pending for t in s.text_index]] = txt_feats.cpu().numpy()
        pending.clear()

    for shard in range(rank, len(loader.manifest.shards), world):
        info = loader.manifest.shards[shard]
        location = join_location(loader.data_dir, info.name)
        for _, key_, members in shard_samples(location, info):
            sample = raw_sample(location, key_, members, loader.manifest.num_images, loader.manifest.num_texts)
            try:
                image = decode_rgb(sample.image, loader.background)
            except DECODE_ERRORS as exc:
                raise ShardDataError(f"shard {location}, sample key {key_}: undecodable image ({exc}); the "
                                     "feature cache needs every sample") from None
            index.append(sample.index)
            image_index.append(sample.image_index)
            text_index.extend(sample.text_index)
            offsets.append(len(text_index))
            pending.append((sample, image, sample.captions))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    image_rows.flush()
    text_rows.flush()
    del image_rows, text_rows
    np.savez(directory / f"samples-{rank}-of-{world}.npz", index=np.array(index, dtype=np.int64),
             image_index=np.array(image_index, dtype=np.int64), offsets=np.array(offsets, dtype=np.int64),
             text_index=np.array(text_index, dtype=np.int64))


def _probe(loader: TrainLoader, preprocess: Callable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-sample input of the right shapes, to learn the feature widths before the arrays are created."""
    from PIL import Image

    return preprocess(Image.new("RGB", (32, 32))).unsqueeze(0).to(device), loader.tokenizer(["a"]).to(device)


class CachedBatches:
    """The loader's batches from the cache: the same samples and captions, step for step, as
    :class:`~clip_dro.data.train_loader.TrainLoader` would give (its lane plan and per-sample draws), but no
    shard is opened and no image decoded: a batch is a gather of rows. ``images`` and ``tokens`` of a batch
    hold the image and text features, the inputs of :class:`CachedHeads`."""

    def __init__(self, loader: TrainLoader, cache: FeatureCache):
        self.loader, self.cache = loader, cache
        self.first_index = np.array([s.first_index for s in loader.manifest.shards], dtype=np.int64)

    def steps_in_epoch(self, epoch: int) -> int:
        return self.loader.steps_in_epoch(epoch)

    def _lane_samples(self, lane: int, epoch: int, start_step: int, steps: int) -> np.ndarray:
        """[steps - start_step, per_lane] sample indices of lane ``lane``."""
        loader, c = self.loader, self.loader.per_lane
        epoch_plan = loader.plan(epoch)
        stream = np.concatenate([self.first_index[shard] + np.arange(lo, hi)
                                 for shard, lo, hi in epoch_plan.lane_segments(lane)])
        blocks = plan.lane_blocks(epoch_plan.lane_length(lane), loader.shuffle_buffer, loader.seed, epoch, lane,
                                  start_step * c, steps * c)
        return stream[np.concatenate([wanted for _, _, wanted in blocks])].reshape(-1, c)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]:
        loader, cache = self.loader, self.cache
        steps = self.steps_in_epoch(epoch)
        if start_step >= steps:
            return
        per_rank = loader.lanes // loader.world_size
        lanes = range(loader.rank * per_rank, (loader.rank + 1) * per_rank)
        samples = np.concatenate([self._lane_samples(lane, epoch, start_step, steps) for lane in lanes], axis=1)
        for row in samples:
            text_index = []
            for sample in row.tolist():
                lo, hi = cache.caption_offsets[sample], cache.caption_offsets[sample + 1]
                choice, _ = plan.sample_draws(loader.seed, epoch, sample, int(hi - lo))
                text_index.append(int(cache.caption_text[lo + choice]))
            image_index = cache.sample_image[row]
            yield TrainBatch(images=torch.from_numpy(np.ascontiguousarray(cache.image[image_index])),
                             tokens=torch.from_numpy(np.ascontiguousarray(cache.text[text_index])),
                             image_index=torch.from_numpy(image_index.astype(np.int64)),
                             text_index=torch.tensor(text_index, dtype=torch.int64))


def cached_training(feature_cache: str, model_name: str, model: nn.Module, loader: TrainLoader,
                    preprocess_eval: Callable, device: torch.device, batch_size: int
                    ) -> tuple[CachedHeads, CachedBatches]:
    """What the trainer swaps in when ``data.feature_cache`` is set: the heads-only module and the batches
    from the (built if needed) cache."""
    key = cache_key(model_name, model, preprocess_eval, loader.tokenizer, loader.manifest)
    root = cache_root(feature_cache, loader.data_dir)

    def build(directory: Path, rank: int, world: int) -> None:
        build_share(directory, rank, world, model=model, loader=loader, preprocess=preprocess_eval, device=device,
                    batch_size=batch_size)

    cache = open_or_build(root, key, build)
    return CachedHeads(model), CachedBatches(loader, cache)
