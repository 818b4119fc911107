"""A procedural image world that needs no files (``"synthetic"``).

36 classes (6 colours x 6 shapes, e.g. ``"red circle"``) in 3 domains:

* ``photo``  -- a filled, lightly shaded shape on a textured grey gradient;
* ``sketch`` -- the shape's outline only, on a plain light background;
* ``noisy``  -- a filled shape on painted blobs, crossed by strokes, with heavy noise.

Every image is rendered on demand from an RNG seeded by
``(seed, split, domain, class, index)`` through ``numpy.random.SeedSequence``
(never Python's ``hash()``, which is salted per process), so the same sample
gives identical pixels in every call, process and machine. It exists so the
whole pipeline -- partitioning, training, evaluation, reports -- can be run
and tested end to end without downloads, including the domain-shift schemes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pfedmoap_cli.data.sources.base import SPLITS, DatasetSource, Sample
from pfedmoap_cli.data.sources.registry import register_dataset
from pfedmoap_cli.errors import ConfigError

# Saturated colours, far apart in hue, so they survive noise and the grey backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 55, 190),
    "orange": (250, 135, 20),
}
# Shapes chosen to stay distinct at 32 px even as outlines and under +-20 degree rotation.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "ring")
DOMAINS: tuple[str, ...] = ("photo", "sketch", "noisy")

SUPERSAMPLE = 2  # masks are drawn at 2x and box-downsampled: cheap anti-aliasing
MAX_ROTATION_DEG = 20.0
_SALT = 0x5EED_C1A5  # separates this generator's streams from any other use of the same seed
# The micro-CLIP's pretraining images come from their own salted stream, so they are never
# the dataset's train or test images (scripts/pretrain_microclip.py, tests/test_microclip.py).
_PRETRAIN_SALT = 0x9E7_C11B


@dataclass(frozen=True)
class SyntheticSettings:
    """Options of the synthetic source.

    Attributes
    ----------
    seed:
        Non-negative seed of the whole image world.
    image_size:
        Side of the square RGB images, in pixels (>= 16).
    train_per_class, test_per_class:
        Images per (domain, class) in each split (>= 1).
    """

    seed: int = 0
    image_size: int = 32
    train_per_class: int = 24
    test_per_class: int = 12

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"synthetic option {f.name} must be an integer, got {value!r}")
        if self.seed < 0:
            raise ConfigError(f"synthetic seed must be >= 0, got {self.seed}; pass a non-negative seed")
        if self.image_size < 16:
            raise ConfigError(f"synthetic image_size must be >= 16, got {self.image_size}")
        if self.train_per_class < 1 or self.test_per_class < 1:
            raise ConfigError("synthetic train_per_class and test_per_class must be >= 1")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SyntheticSettings:
        """Build settings from constructor keyword options, refusing unknown ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown synthetic option(s) {', '.join(unknown)}; choose from: {', '.join(sorted(known))}"
            )
        return cls(**options)


def class_names() -> list[str]:
    """The 36 class names in label order: colour-major, e.g. ``"red circle"``, ``"red square"``, ..."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def _polygon(shape: str, cx: float, cy: float, r: float, theta: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of circumradius ``r`` rotated by ``theta`` radians."""
    if shape == "square":
        angles, radii = [math.pi / 4 + k * math.pi / 2 for k in range(4)], [r] * 4
    elif shape == "triangle":
        angles, radii = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)], [r] * 3
    elif shape == "star":
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else 0.42 * r for k in range(10)]
    elif shape == "cross":
        w = 0.34 * r  # half-width of the arms
        pts = [(w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r),
               (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r)]
        angles = [math.atan2(y, x) for x, y in pts]
        radii = [math.hypot(x, y) for x, y in pts]
    else:
        raise ValueError(f"{shape!r} is not a polygon")
    return [
        (cx + rad * math.cos(a + theta), cy + rad * math.sin(a + theta)) for a, rad in zip(angles, radii)
    ]


def _shape_mask(shape: str, size: int, rng: np.random.Generator, outline: bool) -> np.ndarray:
    """Anti-aliased coverage mask in [0, 1] of one randomly placed, scaled and rotated shape."""
    big = size * SUPERSAMPLE
    r = rng.uniform(0.24, 0.38) * big
    margin = r + SUPERSAMPLE
    cx, cy = rng.uniform(margin, big - margin, size=2)
    theta = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    width = max(1, int(round(rng.uniform(0.045, 0.075) * big)))  # outline stroke width
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    box = (cx - r, cy - r, cx + r, cy + r)
    inner = 0.55 * r
    inner_box = (cx - inner, cy - inner, cx + inner, cy + inner)
    if shape == "circle":
        draw.ellipse(box, fill=None if outline else 255, outline=255 if outline else None, width=width)
    elif shape == "ring":
        if outline:
            draw.ellipse(box, outline=255, width=width)
            draw.ellipse(inner_box, outline=255, width=width)
        else:
            draw.ellipse(box, fill=255)
            draw.ellipse(inner_box, fill=0)
    else:
        points = _polygon(shape, cx, cy, r, theta)
        if outline:
            draw.line(points + points[:1], fill=255, width=width, joint="curve")
        else:
            draw.polygon(points, fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)[..., None] / 255.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a ``cells x cells`` random grid upsampled bilinearly."""
    grid = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    image = Image.fromarray(grid if channels == 3 else grid[..., 0], mode)
    up = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return up if channels == 3 else up[..., None]


def _grey(rng: np.random.Generator, low: float, high: float, tint: float) -> np.ndarray:
    """A desaturated random colour (grey level plus a small tint), so class colours stand out."""
    return np.clip(rng.uniform(low, high) + rng.uniform(-tint, tint, size=3), 0.0, 1.0).astype(np.float32)


def _colour(name: str, rng: np.random.Generator, jitter: float) -> np.ndarray:
    base = np.asarray(COLOURS[name], dtype=np.float32) / 255.0
    return np.clip(base + rng.uniform(-jitter, jitter, size=3), 0.0, 1.0).astype(np.float32)


def _render_photo(colour: str, shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    ys = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :, None]
    direction = rng.uniform(0.0, 2 * math.pi)
    ramp = (math.cos(direction) * xs + math.sin(direction) * ys + 1.0) / 2.0
    a, b = _grey(rng, 0.2, 0.8, 0.08), _grey(rng, 0.2, 0.8, 0.08)
    background = a * (1 - ramp) + b * ramp
    background = background + 0.18 * (_smooth_noise(rng, size, 6, 1) - 0.5)
    mask = _shape_mask(shape, size, rng, outline=False)
    shading = 0.8 + 0.35 * _smooth_noise(rng, size, 3, 1)  # soft light across the object
    foreground = _colour(colour, rng, 0.06) * shading
    return background * (1 - mask) + foreground * mask


def _render_sketch(colour: str, shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    background = np.broadcast_to(_grey(rng, 0.88, 0.98, 0.02), (size, size, 3))
    mask = _shape_mask(shape, size, rng, outline=True)
    return background * (1 - mask) + _colour(colour, rng, 0.08) * mask


def _render_noisy(colour: str, shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("RGB", (size, size), tuple(int(v * 255) for v in _grey(rng, 0.3, 0.7, 0.15)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 8))):  # painted background blobs
        x, y = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(0.2, 0.6, size=2) * size
        draw.ellipse((x, y, x + w, y + h), fill=tuple(int(v * 255) for v in _grey(rng, 0.2, 0.8, 0.2)))
    background = np.asarray(canvas, dtype=np.float32) / 255.0
    mask = _shape_mask(shape, size, rng, outline=False)
    image = background * (1 - mask) + _colour(colour, rng, 0.12) * mask
    strokes = Image.new("L", (size, size), 0)
    stroke_draw = ImageDraw.Draw(strokes)
    for _ in range(int(rng.integers(1, 4))):  # brush strokes across the object
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        stroke_draw.line((x0, y0, x1, y1), fill=int(rng.integers(120, 200)), width=1)
    stroke = np.asarray(strokes, dtype=np.float32)[..., None] / 255.0
    image = image * (1 - stroke) + _grey(rng, 0.0, 1.0, 0.3) * stroke
    return image + rng.normal(0.0, 0.14, size=image.shape).astype(np.float32)


_RENDERERS = {"photo": _render_photo, "sketch": _render_sketch, "noisy": _render_noisy}


def render(label: int, domain: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Pixels (image_size, image_size, 3) uint8 of class ``label`` in ``domain``, drawn from ``rng``."""
    colour, shape = class_names()[label].split(" ")
    pixels = _RENDERERS[domain](colour, shape, image_size, rng)
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def pretraining_image(seed: int, domain: str, label: int, index: int, image_size: int = 32) -> np.ndarray:
    """Image ``index`` of (``domain``, ``label``) in the micro-CLIP's pretraining stream ``seed``.

    Rendered like the dataset's images but from a separately salted seed
    sequence, so no pretraining image is a train or test image of any
    :class:`SyntheticSource` (whatever its seed).

    Returns
    -------
    numpy.ndarray
        uint8 pixels of shape (image_size, image_size, 3).
    """
    entropy = [_PRETRAIN_SALT, int(seed), DOMAINS.index(domain), int(label), int(index)]
    return render(label, domain, image_size, np.random.default_rng(np.random.SeedSequence(entropy)))


@register_dataset
class SyntheticSource(DatasetSource):
    """Deterministic procedural shapes: 36 classes x 3 domains, rendered on demand.

    Parameters
    ----------
    root:
        Ignored (nothing is read from disk).
    **options:
        Fields of :class:`SyntheticSettings` (``seed``, ``image_size``,
        ``train_per_class``, ``test_per_class``).
    """

    name = "synthetic"

    def __init__(self, root: Path | None = None, **options: Any) -> None:
        self.settings = SyntheticSettings.from_options(options)
        self.class_names = class_names()
        self.domains = list(DOMAINS)
        self._slugs = [n.replace(" ", "_") for n in self.class_names]
        self._label_of_slug = {slug: i for i, slug in enumerate(self._slugs)}

    def _fingerprint_extras(self) -> dict[str, object]:
        # The pixels depend on the seed and image size, not only on the sample
        # list; a partition must not be reused across different synthetic worlds.
        return {"seed": self.settings.seed, "image_size": self.settings.image_size}

    def _list_samples(self, split: str) -> list[Sample]:
        per_class = self.settings.train_per_class if split == "train" else self.settings.test_per_class
        return [
            Sample(key=f"{split}/{domain}/{slug}/{index:04d}", label=label, domain=domain)
            for domain in self.domains
            for label, slug in enumerate(self._slugs)
            for index in range(per_class)
        ]

    def _rng(self, split: str, domain: str, label: int, index: int) -> np.random.Generator:
        entropy = [_SALT, self.settings.seed, SPLITS.index(split), DOMAINS.index(domain), label, index]
        return np.random.default_rng(np.random.SeedSequence(entropy))

    def load_image(self, sample: Sample) -> Image.Image:
        """Render ``sample`` (pure: identical pixels every call).

        Raises
        ------
        ConfigError
            If the sample's key does not name a synthetic image.
        """
        parts = sample.key.split("/")
        label = self._label_of_slug.get(parts[2]) if len(parts) == 4 else None
        if (
            label is None
            or parts[0] not in SPLITS
            or parts[1] not in DOMAINS
            or not parts[3].isdigit()
            or label != sample.label
        ):
            raise ConfigError(f"{sample.key!r} is not a synthetic sample key; use samples() of this source")
        domain, index = parts[1], int(parts[3])
        rng = self._rng(parts[0], domain, label, index)
        return Image.fromarray(render(label, domain, self.settings.image_size, rng), "RGB")
