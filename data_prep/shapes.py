"""Scenes of the synthetic dataset: one coloured shape of some size at some position on a noisy background,
drawn at 64 px (the tiny models' input size), and captions that describe it in varied wording.

A concept is a shape and its colouring: 10 shapes x 36 colourings = 360 concepts, so that frequencies can
have a long tail of rare concepts (design.md §3.4). A colouring is one of 8 colours, or two of them (28 unordered
pairs) on the left and right halves of the shape, either way round, named "red and blue" in palette order.
Chosen to be visually distinct at 64 px: no rotations (a rotated square would be a diamond), hues far apart,
shapes with different outlines, and a two-tone split that leaves each colour half of even the smallest shape
(a pattern or texture would vanish in a small ring's 3 px band).
"""
from __future__ import annotations

import io
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from data_prep.images import JPEG_QUALITY, EncodedImage

IMAGE_PX = 64
SUPERSAMPLE = 4  # draw at 4x and shrink: smooth edges at small sizes
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "bar", "heart", "arrow")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (235, 215, 50),
           "orange": (245, 140, 30), "purple": (150, 60, 200), "cyan": (40, 210, 220), "white": (240, 240, 240)}
POSITIONS = {"top left": (16, 16), "top right": (48, 16), "bottom left": (16, 48), "bottom right": (48, 48),
             "center": (32, 32)}
SIZES = {"small": 14, "large": 26}

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_WORDS = {"top left": ("top left", "upper left"), "top right": ("top right", "upper right"),
                  "bottom left": ("bottom left", "lower left"), "bottom right": ("bottom right", "lower right"),
                  "center": ("center", "middle")}
CAPTION_TEMPLATES = (
    "a {s} {c} {h} in the {p}.",
    "a photo of a {s} {c} {h} in the {p} of the frame.",
    "{p}: one {s} {c} {h}.",
    "there is a {s} {h} coloured {c} in the {p}.",
    "a {c} {h}, {s}, sitting in the {p}.",
    "an image showing a {s} {c} {h} near the {p}.",
    "a {s} {h} in {c}, located at the {p}.",
    "the {p} holds a {s} {c} {h}.",
)


def colourings() -> list[tuple[str, ...]]:
    """Every colouring in palette order: the single colours, then the two-tone pairs."""
    return [(colour,) for colour in COLOURS] + list(itertools.combinations(COLOURS, 2))


@dataclass(frozen=True)
class Concept:
    shape: str
    colours: tuple[str, ...]  # one colour, or two (a two-tone shape) in palette order

    @property
    def name(self) -> str:
        """"red circle", "red and blue circle": the words a caption and a zero-shot class name use."""
        return f"{' and '.join(self.colours)} {self.shape}"


def concepts() -> list[Concept]:
    """All concepts in label order: colourings (see ``colourings``), then shapes within a colouring."""
    return [Concept(shape, colours) for colours in colourings() for shape in SHAPES]


def concept_names() -> list[str]:
    """The names of ``concepts()``, in label order."""
    return [concept.name for concept in concepts()]


@dataclass(frozen=True)
class Scene:
    concept: Concept
    swapped: bool  # two-tone: the concept's second colour on the left half
    size: str
    position: str
    dx: int
    dy: int
    scale: float
    tint: tuple[int, int, int]
    background: tuple[int, int, int]
    noise_seed: int

    @property
    def colours_left_to_right(self) -> tuple[str, ...]:
        return self.concept.colours[::-1] if self.swapped else self.concept.colours


def random_scene(rng: np.random.Generator, concept: Concept, size: Optional[str] = None,
                 position: Optional[str] = None) -> Scene:
    """A scene of the given concept with random (or given) size and position, a random side for each colour
    of a two-tone shape, and small random jitter."""
    grey = int(rng.integers(45, 100))
    return Scene(
        concept=concept, swapped=len(concept.colours) == 2 and bool(rng.integers(2)),
        size=size if size is not None else str(rng.choice(list(SIZES))),
        position=position if position is not None else str(rng.choice(list(POSITIONS))),
        dx=int(rng.integers(-3, 4)), dy=int(rng.integers(-3, 4)), scale=float(rng.uniform(0.9, 1.1)),
        tint=tuple(int(t) for t in rng.integers(-12, 13, size=3)),
        background=tuple(int(grey + t) for t in rng.integers(-8, 9, size=3)),
        noise_seed=int(rng.integers(2**31)),
    )


def caption(scene: Scene, rng: np.random.Generator, template: int) -> str:
    """One caption naming the whole concept (every colour and the shape), the size and the position."""
    words = dict(s=str(rng.choice(SIZE_WORDS[scene.size])), c=" and ".join(scene.concept.colours),
                 h=scene.concept.shape, p=str(rng.choice(POSITION_WORDS[scene.position])))
    return re.sub(r"\ba (?=[aeiou])", "an ", CAPTION_TEMPLATES[template].format(**words))


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.42 * r
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, ...], background: tuple[int, ...]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=fill)
    elif shape == "cross":
        t = 0.33 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "ring":
        inner = 0.55 * r
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=background)
    elif shape == "bar":
        draw.rectangle([cx - r, cy - 0.4 * r, cx + r, cy + 0.4 * r], fill=fill)
    elif shape == "heart":
        lobe = 0.5 * r
        for lobe_x in (cx - 0.48 * r, cx + 0.48 * r):
            draw.ellipse([lobe_x - lobe, cy - 0.35 * r - lobe, lobe_x + lobe, cy - 0.35 * r + lobe], fill=fill)
        draw.polygon([(cx - 0.95 * r, cy - 0.2 * r), (cx + 0.95 * r, cy - 0.2 * r), (cx, cy + r)], fill=fill)
    elif shape == "arrow":  # pointing up, so that both halves of a two-tone arrow show head and shaft
        draw.polygon([(cx, cy - r), (cx - 0.9 * r, cy), (cx + 0.9 * r, cy)], fill=fill)
        draw.rectangle([cx - 0.32 * r, cy - 0.05 * r, cx + 0.32 * r, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _fill(colour: str, tint: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLOURS[colour], tint))


def draw(scene: Scene) -> Image.Image:
    """The scene as a 64 x 64 RGB image (pure: the same scene gives the same pixels)."""
    big = IMAGE_PX * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    x, y = POSITIONS[scene.position]
    cx, cy = (x + scene.dx) * SUPERSAMPLE, (y + scene.dy) * SUPERSAMPLE
    radius = SIZES[scene.size] * scene.scale / 2 * SUPERSAMPLE
    # The first colour covers the whole shape, a second one its right half (x >= the shape's centre).
    regions = [(0, 0, big, big), (cx, 0, big, big)]
    for colour, region in zip(scene.colours_left_to_right, regions):
        layer = image.copy()
        _draw_shape(ImageDraw.Draw(layer), scene.concept.shape, cx, cy, radius, _fill(colour, scene.tint),
                    scene.background)
        image.paste(layer.crop(region), region[:2])
    pixels = np.asarray(image.resize((IMAGE_PX, IMAGE_PX), Image.Resampling.BOX), dtype=np.float32)
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, 5.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def render(scene: Scene, options: Any = None) -> EncodedImage:
    """Writer loader (see data_prep.images): the scene as a JPEG; always 64 px and opaque, so ``options``
    (an ImageOptions) change nothing. Colour at full resolution (4:4:4): the default 4:2:0 chroma subsampling
    blends the two halves of a small two-tone shape until some keep no pixel of their named colour."""
    out = io.BytesIO()
    draw(scene).save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return EncodedImage(out.getvalue(), "jpg", IMAGE_PX, IMAGE_PX)
