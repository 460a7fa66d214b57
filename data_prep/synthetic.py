"""``clip-dro prep synthetic``: the built-in long-tailed dataset (design.md §3.4), deterministic for a seed.

* ``train``: ``num_train`` images of the 360 shape x colouring concepts of ``shapes``, with web-like
  frequencies: a Zipf-Mandelbrot law, count proportional to 1 / (rank + 8) for rank 1, 2, ... (ranks a
  fixed shuffle of the concepts, the same for every seed). Exponent 1 is Zipf's law of word frequencies; the
  offset 8 flattens the head, which plain Zipf(1) would give 15 % of the images, so that no concept crowds a
  batch with its own kind. With 4000 images: head concept 118 (3.0 %, about 4 of a 128-sample batch), top 10
  concepts 21 %, every concept present, 175 of them with 5 images or fewer, the rarest 3. Counts are
  apportioned exactly (largest remainder); with few images the rarest concepts get none.
  One caption per image, from 8 wording templates with synonyms, naming colours, shape, size and position.
* ``retrieval`` and ``zeroshot`` cover 64 evaluation concepts, not all 360, so that they stay as small as
  the quickstart's time budget needs: the concepts at 64 evenly spaced frequency ranks from the head to the
  rarest, fixed for every seed. That is a uniform sample of the concept types, so head, body and tail each
  weigh by how many concepts they hold (at 4000 images, 31 of the 64 have 5 training images or fewer).
* ``retrieval``: held-out images, 8 per evaluation concept (balanced, so that rare concepts weigh as much as
  frequent ones), 5 captions each from different templates: 512 images. Within a concept the 8 images take
  8 distinct (size, position) pairs of the 10 possible, so every image has a caption-level description no
  other retrieval image shares: R@1 is attainable and measures more than concept matching.
* ``zeroshot``: held-out images, 10 per evaluation concept (640), with a ``.cls`` label indexing
  ``classnames.txt`` (exactly the evaluation concepts, in label order, see ``shapes.concepts``) and
  ``templates.txt``.

Every sample's .json records ``concept``, ``concept_count`` (train samples of that concept) and
``concept_frequency`` (count / num_train), plus ``shape``, ``colours``, ``size`` and ``position``.
Manifest kinds: "train", "retrieval", "zeroshot"; their ``extra`` records the law, every concept's count
and the evaluation concepts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from data_prep import shapes
from data_prep.writer import Candidate, PrepError, write_dataset

GENERATOR = "shapes-v2"
FREQUENCY_LAW = "zipf-mandelbrot"
ZIPF_EXPONENT = 1.0
ZIPF_OFFSET = 8.0
RANK_SEED = 20230607  # fixed: the frequency rank of each concept does not depend on the user's seed
EVAL_CONCEPTS = 64
RETRIEVAL_PER_CONCEPT = 8
RETRIEVAL_CAPTIONS = 5
ZEROSHOT_PER_CONCEPT = 10
EVAL_SHARD_SIZE = 256
ZEROSHOT_TEMPLATES = ("a photo of a {c}.", "a drawing of a {c}.", "a picture of a {c}.", "an image of a {c}.",
                      "a rendering of a {c}.", "a {c} on a grey background.")
SPLIT_TAGS = {"train": 0, "retrieval": 1, "zeroshot": 2}


def zipf_mandelbrot_counts(total: int, num_concepts: int, exponent: float = ZIPF_EXPONENT,
                           offset: float = ZIPF_OFFSET) -> list[int]:
    """Counts per rank (most frequent first) proportional to 1 / (rank + offset)^exponent, rank = 1, 2, ...,
    summing to ``total``.

    Largest-remainder apportionment: exact sum, deterministic, each count within 1 of its share.
    """
    ranks = np.arange(1, num_concepts + 1)
    weights = 1.0 / (ranks + offset) ** exponent
    shares = total * weights / weights.sum()
    counts = np.floor(shares).astype(int)
    leftover = total - counts.sum()
    order = np.argsort(-(shares - counts), kind="stable")
    counts[order[:leftover]] += 1
    return counts.tolist()


def ranked_concepts() -> list[shapes.Concept]:
    """All concepts, most frequent first: a fixed shuffle of the label order."""
    concepts = shapes.concepts()
    return [concepts[i] for i in np.random.default_rng(RANK_SEED).permutation(len(concepts))]


def concept_counts(num_train: int) -> dict[str, int]:
    """Train samples per concept name, in label order (0 for concepts too rare for ``num_train``)."""
    ranked = ranked_concepts()
    counts = dict(zip((c.name for c in ranked), zipf_mandelbrot_counts(num_train, len(ranked))))
    return {name: counts[name] for name in shapes.concept_names()}


def eval_concepts() -> list[shapes.Concept]:
    """The concepts of the retrieval and zero-shot sets, in label order: those at EVAL_CONCEPTS evenly spaced
    frequency ranks, from the head to the rarest."""
    ranked = ranked_concepts()
    picked = {ranked[int(rank)] for rank in np.linspace(0, len(ranked) - 1, EVAL_CONCEPTS).round()}
    return [concept for concept in shapes.concepts() if concept in picked]


def _split_concepts(name: str, counts: dict[str, int], rng: np.random.Generator) -> list[shapes.Concept]:
    if name == "train":
        concepts = [c for c in shapes.concepts() for _ in range(counts[c.name])]
        return [concepts[i] for i in rng.permutation(len(concepts))]
    per = RETRIEVAL_PER_CONCEPT if name == "retrieval" else ZEROSHOT_PER_CONCEPT
    return [c for c in eval_concepts() for _ in range(per)]


def _scenes(name: str, counts: dict[str, int], rng: np.random.Generator) -> Iterator[shapes.Scene]:
    concepts = _split_concepts(name, counts, rng)
    if name != "retrieval":
        yield from (shapes.random_scene(rng, concept) for concept in concepts)
        return
    # The retrieval images of one concept (consecutive here) take distinct (size, position) pairs.
    attributes = [(s, p) for s in shapes.SIZES for p in shapes.POSITIONS]
    for start in range(0, len(concepts), RETRIEVAL_PER_CONCEPT):
        block = concepts[start:start + RETRIEVAL_PER_CONCEPT]
        for concept, pick in zip(block, rng.choice(len(attributes), size=len(block), replace=False)):
            yield shapes.random_scene(rng, concept, *attributes[pick])


def split_items(name: str, num_train: int, seed: int) -> Iterator[Candidate]:
    """The candidates of one split, deterministic in (name, num_train, seed)."""
    counts = concept_counts(num_train)
    labels = {concept.name: i for i, concept in enumerate(eval_concepts())}
    rng = np.random.default_rng([seed, SPLIT_TAGS[name]])
    num_captions = RETRIEVAL_CAPTIONS if name == "retrieval" else 1
    for row, scene in enumerate(_scenes(name, counts, rng)):
        templates = rng.choice(len(shapes.CAPTION_TEMPLATES), size=num_captions, replace=False)
        captions = [shapes.caption(scene, rng, int(t)) for t in templates]
        concept = scene.concept.name
        fields: dict[str, Any] = {"concept": concept, "concept_count": counts[concept],
                                  "concept_frequency": counts[concept] / num_train, "shape": scene.concept.shape,
                                  "colours": list(scene.concept.colours), "size": scene.size,
                                  "position": scene.position}
        files = {"cls": str(labels[concept]).encode()} if name == "zeroshot" else {}
        yield Candidate(rows=[{"row": row, "concept": concept}], captions=captions, load=shapes.render,
                        arg=scene, fields=fields, files=files)


def split_size(name: str, num_train: int) -> int:
    per = {"retrieval": RETRIEVAL_PER_CONCEPT, "zeroshot": ZEROSHOT_PER_CONCEPT}
    return num_train if name == "train" else per[name] * EVAL_CONCEPTS


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
    evaluated = [concept.name for concept in eval_concepts()]
    extra = {"generator": GENERATOR, "frequency_law": FREQUENCY_LAW, "zipf_exponent": ZIPF_EXPONENT,
             "zipf_offset": ZIPF_OFFSET, "concepts": names, "concept_counts": [counts[c] for c in names],
             "eval_concepts": evaluated, "num_train": num_train}
    zeroshot_files = {"classnames.txt": "".join(c + "\n" for c in evaluated),
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
