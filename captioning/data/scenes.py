"""Random scenes of coloured shapes, drawn as images and described by captions that are all true.

Each image is an RGB image with one to three coloured shapes on a textured background; each caption
is built from the scene geometry, so every word is true of the pixels: colours, shapes, counts
("two blue squares"), sizes, positions ("in the top left corner") and relations ("a red circle to
the left of a green triangle"). A model that ignores the image can only learn the frequent words.

    scene = sample_scene(random.Random(0))             # 1-3 shapes in distinct cells of a 3x3 grid
    image = render_scene(scene, 64, random.Random(1))  # RGB Pillow image, 64x64
    captions = describe_scene(scene, random.Random(2), n=5)

Coordinates are normalised to the image side: ``cx, cy`` in [0, 1] from the top left corner and
``radius`` is the radius of the circle that encloses the shape (so shapes never overlap when their
enclosing circles do not). The same random streams give the same scene, pixels and captions. Pure
Python + Pillow + numpy; ``captioning.data.synthetic`` writes scenes as a dataset in the real layouts.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
# Chosen pairwise far apart in RGB (>= ~90) and from both backgrounds, so a pixel's colour word is
# never in doubt after JPEG + noise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 225, 40),
    "purple": (135, 50, 180),
    "orange": (250, 140, 0),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"dark": (70, 70, 78), "light": (185, 185, 178)}
# A white shape is invisible on a light background and a black one on a dark background.
_EXCLUDED_COLOUR = {"dark": "black", "light": "white"}
SIZES: dict[str, tuple[float, float]] = {"small": (0.085, 0.105), "large": (0.145, 0.165)}

# Shapes sit in the cells of a 3x3 grid (centres at these coordinates, jittered by less than
# _JITTER), so every position word and relation holds with a margin of at least 0.1 of the side.
_GRID = (0.2, 0.5, 0.8)
_JITTER = 0.035
_LOW, _HIGH = 0.35, 0.65  # column / row boundaries: left | middle | right, top | middle | bottom
_RELATION_MARGIN = 0.2  # centres at least this far apart along an axis before a relation is stated
_GAP = 0.04  # minimum empty space between enclosing circles, so same-coloured blobs never touch

_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POSITION_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left corner", "at the top left"),
    (1, 0): ("at the top", "near the top"),
    (2, 0): ("in the top right corner", "at the top right"),
    (0, 1): ("on the left", "on the left side"),
    (1, 1): ("in the centre", "in the middle"),
    (2, 1): ("on the right", "on the right side"),
    (0, 2): ("in the bottom left corner", "at the bottom left"),
    (1, 2): ("at the bottom", "near the bottom"),
    (2, 2): ("in the bottom right corner", "at the bottom right"),
}


@dataclass(frozen=True)
class Shape:
    """One filled shape: kind (see KINDS), colour (see PALETTE), size word, and normalised geometry."""

    kind: str
    colour: str
    size: str  # "small" or "large"
    cx: float  # centre, fraction of the image width from the left edge
    cy: float  # centre, fraction of the image height from the top edge
    radius: float  # radius of the enclosing circle, fraction of the image side


@dataclass(frozen=True)
class Scene:
    """The shapes of one image (in drawing order) and its background tone ("dark" or "light")."""

    shapes: tuple[Shape, ...]
    background: str


# ----------------------------------------------------------------------------------------- scenes


def sample_scene(rng: random.Random, *, min_shapes: int = 1, max_shapes: int = 3) -> Scene:
    """Draw a random scene: 1-3 non-overlapping shapes in distinct grid cells, some sharing kind+colour."""
    if not 1 <= min_shapes <= max_shapes <= 3:
        raise ValueError(f"need 1 <= min_shapes <= max_shapes <= 3, got {min_shapes}, {max_shapes}")
    background = rng.choice(sorted(BACKGROUNDS))
    colours = [c for c in PALETTE if c != _EXCLUDED_COLOUR[background]]
    num_shapes = rng.randint(min_shapes, max_shapes)
    looks: list[tuple[str, str]] = []
    for _ in range(num_shapes):
        # Repeat an earlier kind+colour now and then so that counts ("two red circles") occur.
        if looks and rng.random() < 0.3:
            looks.append(rng.choice(looks))
        else:
            looks.append((rng.choice(KINDS), rng.choice(colours)))
    sizes = [rng.choice(("small", "large")) for _ in range(num_shapes)]
    cells = [(c, r) for c in range(3) for r in range(3)]
    for attempt in range(200):
        if attempt == 100:  # three large shapes rarely fit without touching; shrink and retry
            sizes = ["small"] * num_shapes
        shapes: list[Shape] = []
        for (kind, colour), size, (col, row) in zip(looks, sizes, rng.sample(cells, num_shapes), strict=True):
            low, high = SIZES[size]
            shapes.append(
                Shape(
                    kind=kind,
                    colour=colour,
                    size=size,
                    cx=round(_GRID[col] + rng.uniform(-_JITTER, _JITTER), 4),
                    cy=round(_GRID[row] + rng.uniform(-_JITTER, _JITTER), 4),
                    radius=round(rng.uniform(low, high), 4),
                )
            )
        if all(_apart(a, b) for i, a in enumerate(shapes) for b in shapes[i + 1 :]):
            return Scene(shapes=tuple(shapes), background=background)
    raise RuntimeError("could not place shapes; the grid constants are inconsistent")  # pragma: no cover


def _apart(a: Shape, b: Shape) -> bool:
    return math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + _GAP


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    """Return a JSON-ready dict of a scene (the format of scenes.json entries)."""
    return {"background": scene.background, "shapes": [asdict(s) for s in scene.shapes]}


def scene_from_dict(data: dict[str, Any]) -> Scene:
    """Inverse of scene_to_dict."""
    return Scene(shapes=tuple(Shape(**s) for s in data["shapes"]), background=data["background"])


def load_scenes(path: str | Path) -> dict[int, Scene]:
    """Read scenes.json into imgid -> Scene."""
    data = json.loads(Path(path).read_text())
    return {int(entry["imgid"]): scene_from_dict(entry) for entry in data["images"]}


# -------------------------------------------------------------------------------------- rendering


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw a scene as an RGB image: gradient + noise background, anti-aliased flat-coloured shapes."""
    nprng = np.random.default_rng(rng.getrandbits(64))
    # Supersample then box-filter down: anti-aliased edges without Pillow's per-shape antialias flags.
    factor = max(1, min(4, 512 // image_size))
    side = image_size * factor
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    coords = np.linspace(-1.0, 1.0, side, dtype=np.float32)
    ramp = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]  # (side, side)
    tint = np.array([rng.uniform(0.8, 1.2) for _ in range(3)], dtype=np.float32)
    background = base + 12.0 * ramp[..., None] * tint  # (side, side, 3)
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        _draw_shape(draw, shape, side)
    small = canvas.reduce(factor) if factor > 1 else canvas
    pixels = np.asarray(small, dtype=np.float32)
    noise = nprng.normal(0.0, 4.0, size=pixels.shape)  # mild sensor-like noise on everything
    return Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8), "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, side: int) -> None:
    cx, cy, r = shape.cx * side, shape.cy * side, shape.radius * side
    fill = PALETTE[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape.kind == "square":
        h = r / math.sqrt(2.0)  # corners on the enclosing circle
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape.kind == "triangle":  # equilateral, pointing up, vertices on the enclosing circle
        angles = (-90.0, 30.0, 150.0)
        points = [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
        draw.polygon(points, fill=fill)
    elif shape.kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape.kind == "cross":
        arm = r / math.sqrt(1.09)  # arm tips' corners on the enclosing circle
        width = 0.3 * arm
        draw.rectangle((cx - arm, cy - width, cx + arm, cy + width), fill=fill)
        draw.rectangle((cx - width, cy - arm, cx + width, cy + arm), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; valid kinds: {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class _Group:
    """Shapes sharing kind and colour: described together as one noun phrase ("two red circles")."""

    kind: str
    colour: str
    shapes: tuple[Shape, ...]

    @property
    def single(self) -> Shape | None:
        return self.shapes[0] if len(self.shapes) == 1 else None

    @property
    def cx(self) -> float:
        return sum(s.cx for s in self.shapes) / len(self.shapes)

    @property
    def cy(self) -> float:
        return sum(s.cy for s in self.shapes) / len(self.shapes)


def _groups(scene: Scene) -> list[_Group]:
    order: dict[tuple[str, str], list[Shape]] = {}
    for shape in scene.shapes:
        order.setdefault((shape.kind, shape.colour), []).append(shape)
    return [_Group(kind, colour, tuple(shapes)) for (kind, colour), shapes in order.items()]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(group: _Group, rng: random.Random, *, with_size: bool, article: bool = True) -> str:
    """Return e.g. "a small red circle" or "two blue squares"; a size only if the whole group shares it."""
    count = len(group.shapes)
    sizes = {s.size for s in group.shapes}
    words = []
    if with_size and len(sizes) == 1:
        words.append(rng.choice(_SIZE_WORDS[sizes.pop()]))
    words.append(group.colour)
    words.append(group.kind if count == 1 else PLURALS[group.kind])
    if count == 1:
        return f"{_article(words[0])} {' '.join(words)}" if article else " ".join(words)
    return f"{_COUNT_WORDS[count]} {' '.join(words)}"


def _cell(shape: Shape) -> tuple[int, int]:
    column = 0 if shape.cx < _LOW else 2 if shape.cx > _HIGH else 1
    row = 0 if shape.cy < _LOW else 2 if shape.cy > _HIGH else 1
    return column, row


def _position(shape: Shape, rng: random.Random) -> str:
    return rng.choice(_POSITION_PHRASES[_cell(shape)])


def _relation(a: Shape, b: Shape) -> list[str]:
    """Every relation word that holds with margin for "a <relation> b"."""
    relations = []
    if b.cx - a.cx >= _RELATION_MARGIN:
        relations.append("to the left of")
    if a.cx - b.cx >= _RELATION_MARGIN:
        relations.append("to the right of")
    if b.cy - a.cy >= _RELATION_MARGIN:
        relations.append("above")
    if a.cy - b.cy >= _RELATION_MARGIN:
        relations.append("below")
    return relations


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _shuffled(groups: list[_Group], rng: random.Random) -> list[_Group]:
    out = list(groups)
    rng.shuffle(out)
    return out


def _with_size(rng: random.Random) -> bool:
    return rng.random() < 0.6


def _t_list(scene: Scene, rng: random.Random) -> str | None:
    phrases = [_noun_phrase(g, rng, with_size=_with_size(rng)) for g in _shuffled(_groups(scene), rng)]
    opener = rng.choice(("", "", "there is ", "a picture of ", "an image of ", "an image showing "))
    if opener == "there is " and len(scene.shapes) > 1:
        opener = "there are "
    return opener + _join(phrases)


def _members(group: _Group, rng: random.Random) -> str:
    """Return where each shape of a group is: "one on the left and one at the bottom"."""
    shapes = sorted(group.shapes, key=lambda s: (s.cx, s.cy))
    return _join([f"one {_position(s, rng)}" for s in shapes])


def _t_positions(scene: Scene, rng: random.Random) -> str | None:
    groups = _groups(scene)
    phrases = []
    for group in _shuffled(groups, rng):
        phrase = _noun_phrase(group, rng, with_size=_with_size(rng))
        if group.single is not None:
            phrase += " " + _position(group.single, rng)
        elif len(groups) == 1:
            phrase += ", " + _members(group, rng)
        else:
            phrase += f" ({_members(group, rng)})"
        phrases.append(phrase)
    return _join(phrases)


def _t_relation(scene: Scene, rng: random.Random) -> str | None:
    groups = _groups(scene)
    singles = [g for g in groups if g.single]
    pairs = [(a, b) for a in singles for b in singles if a is not b and _relation(a.shapes[0], b.shapes[0])]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    relation = rng.choice(_relation(a.shapes[0], b.shapes[0]))
    head = f"{_noun_phrase(a, rng, with_size=_with_size(rng))} {relation} {_noun_phrase(b, rng, with_size=_with_size(rng))}"
    rest = [_noun_phrase(g, rng, with_size=_with_size(rng)) for g in groups if g is not a and g is not b]
    if not rest:
        return head
    return rng.choice((f"{head} and {_join(rest)}", f"{_join(rest)} and {head}"))


def _t_background(scene: Scene, rng: random.Random) -> str | None:
    phrases = [_noun_phrase(g, rng, with_size=_with_size(rng)) for g in _shuffled(_groups(scene), rng)]
    if rng.random() < 0.5:
        return f"{_join(phrases)} on a {scene.background} background"
    return f"a {scene.background} background with {_join(phrases)}"


def _t_count(scene: Scene, rng: random.Random) -> str | None:
    groups = _groups(scene)
    if len(scene.shapes) == 1:
        phrase = _noun_phrase(groups[0], rng, with_size=True, article=False)
        return f"a single {phrase} {_position(scene.shapes[0], rng)}"
    if len(groups) == 1:
        return f"{_noun_phrase(groups[0], rng, with_size=_with_size(rng))}, {_members(groups[0], rng)}"
    phrases = [_noun_phrase(g, rng, with_size=_with_size(rng)) for g in _shuffled(groups, rng)]
    return f"{_COUNT_WORDS[len(scene.shapes)]} shapes: {_join(phrases)}"


def _t_order(scene: Scene, rng: random.Random) -> str | None:
    """List the shapes "from left to right" (or top to bottom) when they are all far apart on that axis."""
    groups = _groups(scene)
    if len(groups) < 2 or not all(g.single for g in groups):
        return None
    axes = []
    for axis, words in (("cx", "from left to right"), ("cy", "from top to bottom")):
        ordered = sorted(groups, key=lambda g: getattr(g, axis))
        gaps = [getattr(b, axis) - getattr(a, axis) for a, b in itertools.pairwise(ordered)]
        if min(gaps) >= _RELATION_MARGIN:
            axes.append((words, ordered))
    if not axes:
        return None
    words, ordered = rng.choice(axes)
    return f"{words}: {_join([_noun_phrase(g, rng, with_size=_with_size(rng)) for g in ordered])}"


def _t_single(scene: Scene, rng: random.Random) -> str | None:
    if len(scene.shapes) != 1:
        return None
    (group,) = _groups(scene)
    phrase = _noun_phrase(group, rng, with_size=_with_size(rng))
    return f"{phrase} {_position(scene.shapes[0], rng)} on a {scene.background} background"


_TEMPLATES: tuple[Callable[[Scene, random.Random], str | None], ...] = (
    _t_list,
    _t_positions,
    _t_relation,
    _t_background,
    _t_count,
    _t_order,
    _t_single,
)


def describe_scene(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """Return n raw captions of a scene, each from a different template where possible, all true."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    applicable = [t for t in _TEMPLATES if t(scene, random.Random(0)) is not None]
    rng.shuffle(applicable)
    captions: list[str] = []
    seen: set[str] = set()
    for i in range(n):
        template = applicable[i % len(applicable)]
        text = ""
        for _ in range(5):  # redraw a few times to avoid identical token sequences within an image
            text = template(scene, rng) or ""
            if " ".join(tokenize(text)) not in seen:
                break
        seen.add(" ".join(tokenize(text)))
        text = text[0].upper() + text[1:]
        captions.append(text + "." if rng.random() < 0.5 else text)
    return captions


def tokenize(raw: str) -> list[str]:
    """Karpathy's tokenisation: lower-case words, punctuation dropped ("A red box." -> a red box)."""
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", raw.lower())


def scene_pictures(count: int, *, size: int = 96, seed: int = 0) -> list[tuple[Image.Image, list[str]]]:
    """``count`` random scenes, each rendered at ``size`` px with its five tokenised captions (joined):
    pictures for benchmarks and examples that need no dataset on disk. Same seed, same pictures."""
    pictures = []
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        scene = sample_scene(rng)
        image = render_scene(scene, size, rng)
        pictures.append((image, [" ".join(tokenize(c)) for c in describe_scene(scene, rng)]))
    return pictures
