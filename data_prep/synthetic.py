"""``clip-dro prep synthetic``: the built-in long-tailed dataset (SPEC 3.4), deterministic for a seed.

* ``train``: ``num_train`` images of 64 shape x colour concepts whose counts follow Zipf's law (exponent 1,
  ranks a fixed shuffle of the concepts): with 4000 images the head concept has ~840 samples, the tail ~13.
  Counts are apportioned exactly (largest remainder), so every concept is present when num_train >= 64.
  One caption per image, from 8 wording templates with synonyms, naming colour, shape, size and position.
* ``retrieval``: held-out images, 8 per concept (balanced, so that rare concepts weigh as much as frequent
  ones), 5 captions each from different templates. Within a concept the 8 images take 8 distinct
  (size, position) pairs of the 10 possible, so every image has a caption-level description no other
  retrieval image shares: R@1 is attainable and measures more than concept matching.
* ``zeroshot``: held-out images, 10 per concept, with a ``.cls`` label (concept in label order, see
  ``shapes.concept_names``), ``classnames.txt`` and ``templates.txt``.

Every sample's .json records ``concept``, ``concept_count`` (train samples of that concept) and
``concept_frequency`` (count / num_train), plus ``shape``, ``colour``, ``size`` and ``position``.
Manifest kinds: "train", "retrieval", "zeroshot".
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from data_prep import shapes
from data_prep.writer import Candidate, PrepError, write_dataset

GENERATOR = "shapes-v1"
ZIPF_EXPONENT = 1.0
RANK_SEED = 20230607  # fixed: the frequency rank of each concept does not depend on the user's seed
RETRIEVAL_PER_CONCEPT = 8
RETRIEVAL_CAPTIONS = 5
ZEROSHOT_PER_CONCEPT = 10
EVAL_SHARD_SIZE = 256
ZEROSHOT_TEMPLATES = ("a photo of a {c}.", "a drawing of a {c}.", "a picture of a {c}.", "an image of a {c}.",
                      "a rendering of a {c}.", "a {c} on a grey background.")
SPLIT_TAGS = {"train": 0, "retrieval": 1, "zeroshot": 2}


def zipf_counts(total: int, num_concepts: int, exponent: float = ZIPF_EXPONENT) -> list[int]:
    """Counts per rank (most frequent first) proportional to 1 / rank^exponent, summing to ``total``.

    Largest-remainder apportionment: exact sum, deterministic, each count within 1 of its share.
    """
    weights = np.array([1.0 / (r + 1) ** exponent for r in range(num_concepts)])
    shares = total * weights / weights.sum()
    counts = np.floor(shares).astype(int)
    leftover = total - counts.sum()
    order = np.argsort(-(shares - counts), kind="stable")
    counts[order[:leftover]] += 1
    return counts.tolist()


def concept_counts(num_train: int) -> dict[str, int]:
    """Train samples per concept name (label order)."""
    names = shapes.concept_names()
    ranked = [names[i] for i in np.random.default_rng(RANK_SEED).permutation(len(names))]
    by_rank = zipf_counts(num_train, len(names))
    counts = dict(zip(ranked, by_rank))
    return {name: counts[name] for name in names}


def _split_concepts(name: str, counts: dict[str, int], rng: np.random.Generator) -> list[str]:
    if name == "train":
        concepts = [c for c, n in counts.items() for _ in range(n)]
        return [concepts[i] for i in rng.permutation(len(concepts))]
    per = RETRIEVAL_PER_CONCEPT if name == "retrieval" else ZEROSHOT_PER_CONCEPT
    return [c for c in counts for _ in range(per)]


def _scene(rng: np.random.Generator, concept: str, size: Optional[str] = None,
           position: Optional[str] = None) -> shapes.Scene:
    colour, shape = concept.split(" ")
    return shapes.random_scene(rng, shape, colour, size, position)


def _scenes(name: str, counts: dict[str, int], rng: np.random.Generator) -> Iterator[shapes.Scene]:
    concepts = _split_concepts(name, counts, rng)
    if name != "retrieval":
        yield from (_scene(rng, concept) for concept in concepts)
        return
    # The retrieval images of one concept (consecutive here) take distinct (size, position) pairs.
    attributes = [(s, p) for s in shapes.SIZES for p in shapes.POSITIONS]
    for start in range(0, len(concepts), RETRIEVAL_PER_CONCEPT):
        block = concepts[start:start + RETRIEVAL_PER_CONCEPT]
        for concept, pick in zip(block, rng.choice(len(attributes), size=len(block), replace=False)):
            yield _scene(rng, concept, *attributes[pick])


def split_items(name: str, num_train: int, seed: int) -> Iterator[Candidate]:
    """The candidates of one split, deterministic in (name, num_train, seed)."""
    counts = concept_counts(num_train)
    labels = {c: i for i, c in enumerate(counts)}
    rng = np.random.default_rng([seed, SPLIT_TAGS[name]])
    num_captions = RETRIEVAL_CAPTIONS if name == "retrieval" else 1
    for row, scene in enumerate(_scenes(name, counts, rng)):
        templates = rng.choice(len(shapes.CAPTION_TEMPLATES), size=num_captions, replace=False)
        captions = [shapes.caption(scene, rng, int(t)) for t in templates]
        fields: dict[str, Any] = {"concept": scene.concept, "concept_count": counts[scene.concept],
                                  "concept_frequency": counts[scene.concept] / num_train, "shape": scene.shape,
                                  "colour": scene.colour, "size": scene.size, "position": scene.position}
        files = {"cls": str(labels[scene.concept]).encode()} if name == "zeroshot" else {}
        yield Candidate(rows=[{"row": row, "concept": scene.concept}], captions=captions, load=shapes.render,
                        arg=scene, fields=fields, files=files)


def split_size(name: str, num_train: int) -> int:
    per = {"retrieval": RETRIEVAL_PER_CONCEPT, "zeroshot": ZEROSHOT_PER_CONCEPT}
    return num_train if name == "train" else per[name] * len(shapes.concept_names())


def prep_synthetic(output: Path, num_train: int = 4000, seed: int = 0, workers: Optional[int] = None
                   ) -> dict[str, Any]:
    """Write ``output/train``, ``output/retrieval`` and ``output/zeroshot``; returns their manifests by name."""
    output = Path(output)
    if num_train < 1:
        raise PrepError(f"--num-train must be >= 1, got {num_train}")
    if seed < 0:
        raise PrepError(f"--seed must be >= 0, got {seed}")
    counts = concept_counts(num_train)
    names = list(counts)
    extra = {"generator": GENERATOR, "zipf_exponent": ZIPF_EXPONENT, "concepts": names,
             "concept_counts": [counts[c] for c in names], "num_train": num_train}
    zeroshot_files = {"classnames.txt": "".join(c + "\n" for c in names),
                      "templates.txt": "".join(t + "\n" for t in ZEROSHOT_TEMPLATES)}
    # Enough train shards for several lanes (>= 16 once num_train >= 256) at any num_train.
    train_shard = max(16, math.ceil(num_train / 16))
    manifests = {}
    for name, kind, shard_size in (("train", "train", train_shard), ("retrieval", "retrieval", EVAL_SHARD_SIZE),
                                   ("zeroshot", "zeroshot", EVAL_SHARD_SIZE)):
        size = split_size(name, num_train)
        source = {"kind": "synthetic", "split": name, "generator": GENERATOR, "num_train": num_train,
                  "seed": seed, "shard_size": shard_size}
        manifests[name] = write_dataset(
            output / name, source, split_items(name, num_train, seed), shard_size=shard_size, image_size=None,
            workers=workers, kind=kind, total=size, extra=extra, rows_read=size,
            extra_files=zeroshot_files if name == "zeroshot" else None, desc=f"synthetic {name}")
    return manifests
