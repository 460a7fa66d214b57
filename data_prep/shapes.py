"""Scenes of the synthetic dataset: one coloured shape of some size at some position on a noisy background,
drawn at 64 px (the tiny models' input size), and captions that describe it in varied wording.

Concepts are shape x colour (8 x 8 = 64), chosen to be visually distinct at 64 px: no rotations (a rotated
square would be a diamond), hues far apart, shapes with different outlines.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from data_prep.images import JPEG_QUALITY, EncodedImage

IMAGE_PX = 64
SUPERSAMPLE = 4  # draw at 4x and shrink: smooth edges at small sizes
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "bar")
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


def concept_names() -> list[str]:
    """All concepts ("red circle", ...) in label order: colours, then shapes within a colour."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    dx: int
    dy: int
    scale: float
    tint: tuple[int, int, int]
    background: tuple[int, int, int]
    noise_seed: int

    @property
    def concept(self) -> str:
        return f"{self.colour} {self.shape}"


def random_scene(rng: np.random.Generator, shape: str, colour: str, size: Optional[str] = None,
                 position: Optional[str] = None) -> Scene:
    """A scene of the given concept with random (or given) size and position and small random jitter."""
    grey = int(rng.integers(45, 100))
    return Scene(
        shape=shape, colour=colour,
        size=size if size is not None else str(rng.choice(list(SIZES))),
        position=position if position is not None else str(rng.choice(list(POSITIONS))),
        dx=int(rng.integers(-3, 4)), dy=int(rng.integers(-3, 4)), scale=float(rng.uniform(0.9, 1.1)),
        tint=tuple(int(t) for t in rng.integers(-12, 13, size=3)),
        background=tuple(int(grey + t) for t in rng.integers(-8, 9, size=3)),
        noise_seed=int(rng.integers(2**31)),
    )


def caption(scene: Scene, rng: np.random.Generator, template: int) -> str:
    words = dict(s=str(rng.choice(SIZE_WORDS[scene.size])), c=scene.colour, h=scene.shape,
                 p=str(rng.choice(POSITION_WORDS[scene.position])))
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
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw(scene: Scene) -> Image.Image:
    """The scene as a 64 x 64 RGB image (pure: the same scene gives the same pixels)."""
    big = IMAGE_PX * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    fill = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(COLOURS[scene.colour], scene.tint))
    x, y = POSITIONS[scene.position]
    radius = SIZES[scene.size] * scene.scale / 2 * SUPERSAMPLE
    _draw_shape(ImageDraw.Draw(image), scene.shape, (x + scene.dx) * SUPERSAMPLE, (y + scene.dy) * SUPERSAMPLE,
                radius, fill, scene.background)
    pixels = np.asarray(image.resize((IMAGE_PX, IMAGE_PX), Image.Resampling.BOX), dtype=np.float32)
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, 5.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def render(scene: Scene, options: Any = None) -> EncodedImage:
    """Writer loader (see data_prep.images): the scene as a JPEG; always 64 px and opaque, so ``options``
    (an ImageOptions) change nothing."""
    out = io.BytesIO()
    draw(scene).save(out, format="JPEG", quality=JPEG_QUALITY)
    return EncodedImage(out.getvalue(), "jpg", IMAGE_PX, IMAGE_PX)
