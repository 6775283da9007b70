"""Tests for the synthetic dataset: determinism, real layouts, captions true of the pixels, learnability.

The content checks read the decoded JPEGs (colour blobs and their centroids), not scenes.json, so a
bookkeeping bug in the generator cannot hide a caption that is false of the image.
"""

from __future__ import annotations

import collections
import itertools
import json
import random
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from captioning.data.scenes import (
    BACKGROUNDS,
    PALETTE,
    Scene,
    Shape,
    describe_scene,
    load_scenes,
    render_scene,
    sample_scene,
    tokenize,
)
from captioning.data.synthetic import STYLES, SyntheticDataset, generate_synthetic

SMALL: dict[str, Any] = {"num_train": 6, "num_val": 2, "num_test": 2, "image_size": 48}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _images(data: SyntheticDataset) -> list[dict]:
    return json.loads(data.json_path.read_text())["images"]


def _image_path(data: SyntheticDataset, entry: dict) -> Path:
    return data.root / entry.get("filepath", data.image_dirs[0].name) / entry["filename"]


# ------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("style", STYLES)
def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path, style: str) -> None:
    restval = 2 if style == "coco" else 0
    first = generate_synthetic(tmp_path / "a", seed=3, style=style, num_restval=restval, **SMALL)
    second = generate_synthetic(tmp_path / "b", seed=3, style=style, num_restval=restval, **SMALL)
    other = generate_synthetic(tmp_path / "c", seed=4, style=style, num_restval=restval, **SMALL)
    a, b, c = _files(first.root), _files(second.root), _files(other.root)
    assert a == b
    assert len(a) == 10 + restval + 2 + len(first.archives)  # images + json + scenes + archives
    assert a[first.json_path.name] != c[other.json_path.name]
    jpegs = lambda files: sorted(v for k, v in files.items() if k.endswith(".jpg"))  # noqa: E731
    assert set(jpegs(a)).isdisjoint(jpegs(c))


def test_image_content_does_not_depend_on_dataset_size(tmp_path: Path) -> None:
    small = generate_synthetic(tmp_path / "s", num_train=3, num_val=1, num_test=1, style="flickr8k")
    large = generate_synthetic(tmp_path / "l", num_train=9, num_val=3, num_test=3, style="flickr8k")
    for entry_s, entry_l in zip(_images(small), _images(large)[:5], strict=True):
        assert entry_s["imgid"] == entry_l["imgid"]
        assert _image_path(small, entry_s).read_bytes() == _image_path(large, entry_l).read_bytes()
        assert entry_s["sentences"] == entry_l["sentences"]


# ----------------------------------------------------------------------------------------- layout


def _check_karpathy(images: list[dict], style: str, counts: dict[str, int]) -> None:
    sentids = [s["sentid"] for im in images for s in im["sentences"]]
    assert sentids == list(range(len(sentids)))  # unique and consecutive across the file
    assert [im["imgid"] for im in images] == list(range(len(images)))
    assert collections.Counter(im["split"] for im in images) == +collections.Counter(counts)
    for im in images:
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert len(im["sentences"]) == 5
        for sentence in im["sentences"]:
            assert sentence["imgid"] == im["imgid"]
            assert sentence["tokens"] == tokenize(sentence["raw"])
            assert all(re.fullmatch(r"[a-z0-9]+", t) for t in sentence["tokens"])
            assert sentence["raw"][0].isupper()
        if style == "coco":
            assert list(im) == ["filepath", "sentids", "filename", "imgid", "split", "sentences", "cocoid"]
            folder = "train2014" if im["split"] in ("train", "restval") else "val2014"
            assert im["filepath"] == folder
            assert im["filename"] == f"COCO_{folder}_{im['cocoid']:012d}.jpg"
        else:
            assert "filepath" not in im and "cocoid" not in im
            pattern = r"\d{10}_[0-9a-f]{10}\.jpg" if style == "flickr8k" else r"\d{10}\.jpg"
            assert re.fullmatch(pattern, im["filename"])
    ids = [im.get("cocoid", im["filename"]) for im in images]
    assert len(set(ids)) == len(ids)


def test_coco_layout(tmp_path: Path) -> None:
    data = generate_synthetic(tmp_path, num_train=5, num_val=2, num_test=2, num_restval=3, image_size=40)
    doc = json.loads((tmp_path / "dataset_coco.json").read_text())
    assert list(doc) == ["images", "dataset"] and doc["dataset"] == "coco"
    _check_karpathy(doc["images"], "coco", {"train": 5, "val": 2, "test": 2, "restval": 3})
    assert data.image_dirs == (tmp_path / "train2014", tmp_path / "val2014")
    assert [p.name for p in data.archives] == ["train2014.zip", "val2014.zip", "caption_datasets.zip"]
    for folder, expected in (("train2014", 8), ("val2014", 4)):
        with zipfile.ZipFile(tmp_path / "archives" / f"{folder}.zip") as archive:
            names = archive.namelist()
            assert names[0] == f"{folder}/" and len(names) == expected + 1
            for name in names[1:]:
                assert re.fullmatch(rf"{folder}/COCO_{folder}_\d{{12}}\.jpg", name)
                assert archive.read(name) == (tmp_path / name).read_bytes()
                assert archive.getinfo(name).date_time == (1980, 1, 1, 0, 0, 0)
    with zipfile.ZipFile(tmp_path / "archives" / "caption_datasets.zip") as archive:
        assert archive.namelist() == ["dataset_coco.json"]
        assert archive.read("dataset_coco.json") == data.json_path.read_bytes()
    for entry in doc["images"]:
        with Image.open(_image_path(data, entry)) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (40, 40)
    assert (data.num_images, data.num_captions) == (12, 60)


def test_flickr8k_layout(tmp_path: Path) -> None:
    data = generate_synthetic(tmp_path, style="flickr8k", num_train=4, num_val=2, num_test=1)
    doc = json.loads((tmp_path / "dataset_flickr8k.json").read_text())
    assert doc["dataset"] == "flickr8k"
    _check_karpathy(doc["images"], "flickr8k", {"train": 4, "val": 2, "test": 1})
    assert data.image_dirs == (tmp_path / "Flicker8k_Dataset",)  # the real zip's typo
    assert [p.name for p in data.archives] == ["Flickr8k_Dataset.zip", "caption_datasets.zip"]
    with zipfile.ZipFile(data.archives[0]) as archive:
        names = archive.namelist()
    assert names[0] == "Flicker8k_Dataset/"
    assert sorted(names[1:]) == sorted(f"Flicker8k_Dataset/{im['filename']}" for im in doc["images"])
    with zipfile.ZipFile(data.archives[1]) as archive:
        assert archive.namelist() == ["dataset_flickr8k.json"]


def test_flickr30k_layout(tmp_path: Path) -> None:
    data = generate_synthetic(tmp_path, style="flickr30k", num_train=4, num_val=1, num_test=2)
    doc = json.loads((tmp_path / "dataset_flickr30k.json").read_text())
    assert doc["dataset"] == "flickr30k"
    _check_karpathy(doc["images"], "flickr30k", {"train": 4, "val": 1, "test": 2})
    assert [p.name for p in data.archives] == ["flickr30k-images.tar.gz", "caption_datasets.zip"]
    with tarfile.open(data.archives[0], "r:gz") as tar:
        members = tar.getmembers()
        assert members[0].name == "flickr30k-images" and members[0].isdir()
        assert all(m.mtime == 0 for m in members)
        for member in members[1:]:
            handle = tar.extractfile(member)
            assert handle is not None
            assert handle.read() == (tmp_path / member.name).read_bytes()
    assert sorted(m.name for m in members[1:]) == sorted(
        f"flickr30k-images/{im['filename']}" for im in doc["images"]
    )


def test_no_archives_still_writes_extracted_layout(tmp_path: Path) -> None:
    data = generate_synthetic(tmp_path, make_archives=False, **SMALL)
    assert data.archives == () and not (tmp_path / "archives").exists()
    assert data.json_path.is_file() and data.scenes_path.is_file()
    assert sum(len(list(d.iterdir())) for d in data.image_dirs) == 10
    scenes = load_scenes(data.scenes_path)
    assert sorted(scenes) == list(range(10))
    assert all(1 <= len(scene.shapes) <= 3 for scene in scenes.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_train": -1}, "num_train"),
        ({"num_train": 0, "num_val": 0, "num_test": 0}, "empty"),
        ({"style": "imagenet"}, "style"),
        ({"style": "flickr8k", "num_restval": 2}, "restval"),
        ({"image_size": 8}, "image_size"),
        ({"captions_per_image": 0}, "captions_per_image"),
    ],
)
def test_invalid_arguments_raise(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_synthetic(tmp_path, **kwargs)


def test_tokenize_matches_karpathy() -> None:
    assert tokenize("Two shapes: a Red circle, and a blue square.") == [
        *["two", "shapes", "a", "red", "circle", "and", "a", "blue", "square"]
    ]
    assert tokenize("A big orange cross (one on the left)") == [
        "a",
        "big",
        "orange",
        "cross",
        "one",
        "on",
        "the",
        "left",
    ]


# ----------------------------------------------------------------------- captions vs the pixels

_COUNTS = {"a": 1, "an": 1, "single": 1, "two": 2, "three": 3}
_SIZE_WORDS = {"small", "little", "large", "big"}
_RELATIONS = {
    ("to", "the", "left", "of"): (0, -1),
    ("to", "the", "right", "of"): (0, 1),
    ("above",): (1, -1),
    ("below",): (1, 1),
}
_COLUMNS = {"left": 0, "right": 2}
_ROWS = {"top": 0, "bottom": 2}


def test_palette_colours_are_named_right() -> None:
    # The palette is the one fact the pixel checks borrow from the generator: check its names
    # against textbook RGB values so that "red" really is the reddest entry, and so on.
    textbook = {
        "red": (255, 0, 0),
        "green": (0, 160, 0),
        "blue": (0, 0, 255),
        "yellow": (255, 255, 0),
        "purple": (128, 0, 128),
        "orange": (255, 165, 0),
        "white": (255, 255, 255),
        "black": (0, 0, 0),
    }
    assert set(PALETTE) == set(textbook)
    for name, rgb in PALETTE.items():
        nearest = min(
            textbook, key=lambda t: sum((a - b) ** 2 for a, b in zip(rgb, textbook[t], strict=True))
        )
        assert nearest == name


def _blobs(path: Path) -> dict[str, list[tuple[float, float, int]]]:
    """Colour name -> [(cx, cy, area)] of its 4-connected blobs, coordinates normalised to the side."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)  # (H, W, 3)
    names = [*PALETTE, *(f"background:{b}" for b in BACKGROUNDS)]
    refs = np.array([*PALETTE.values(), *BACKGROUNDS.values()], dtype=np.float32)  # (C, 3)
    dist = np.linalg.norm(pixels[:, :, None, :] - refs[None, None], axis=-1)  # (H, W, C)
    # Only confidently coloured pixels: anti-aliased edges (a blend of shape and background) drop out.
    labels = np.where(dist.min(-1) < 60, dist.argmin(-1), -1)
    height, width = labels.shape
    seen = np.zeros_like(labels, dtype=bool)
    blobs: dict[str, list[tuple[float, float, int]]] = collections.defaultdict(list)
    for y0, x0 in zip(*np.nonzero(labels >= 0), strict=True):
        label = labels[y0, x0]
        if seen[y0, x0] or names[label].startswith("background"):
            continue
        stack, points = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            points.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and not seen[ny, nx] and labels[ny, nx] == label:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(points) >= 10:  # a few stray pixels are noise, the smallest shape covers ~40
            ys, xs = zip(*points, strict=True)
            blobs[names[label]].append(
                ((np.mean(xs) + 0.5) / width, (np.mean(ys) + 0.5) / height, len(points))
            )
    return dict(blobs)


def _noun_phrases(tokens: list[str]) -> list[tuple[str, int, int, int]]:
    """[(colour, count, start, end)] for every "<count> [size] <colour> <kind>" at tokens[start:end]."""
    phrases = []
    for i, token in enumerate(tokens):
        if token not in PALETTE:
            continue
        j = i - 1
        if j >= 0 and tokens[j] in _SIZE_WORDS:
            j -= 1
        assert j >= 0 and tokens[j] in _COUNTS, f"colour without a count in {' '.join(tokens)!r}"
        phrases.append((token, _COUNTS[tokens[j]], j, i + 2))
    return phrases


def _cell(blob: tuple[float, float, int]) -> tuple[int, int]:
    column = 0 if blob[0] < 0.35 else 2 if blob[0] > 0.65 else 1
    row = 0 if blob[1] < 0.35 else 2 if blob[1] > 0.65 else 1
    return column, row


def _check_caption(
    tokens: list[str], blobs: dict[str, list[tuple[float, float, int]]]
) -> collections.Counter:
    """Assert the caption is true of the blobs; return how many checks of each kind ran."""
    checks: collections.Counter = collections.Counter()
    phrases = _noun_phrases(tokens)
    counted: collections.Counter = collections.Counter()
    for colour, count, _, _ in phrases:
        counted[colour] += count
    assert counted == {c: len(b) for c, b in blobs.items()}, " ".join(tokens)
    checks["colours+counts"] += 1
    unique = {c: b[0] for c, b in blobs.items() if len(b) == 1}
    for (colour, count, _, end), (other, _, start, _) in itertools.pairwise(phrases):
        relation = _RELATIONS.get(tuple(tokens[end:start]))
        if relation is None or count != 1 or colour not in unique or other not in unique:
            continue
        axis, sign = relation
        assert sign * (unique[colour][axis] - unique[other][axis]) >= 0.15, " ".join(tokens)
        checks["relation"] += 1
    for colour, count, _, end in phrases:
        after = tokens[end : end + 5]
        if count != 1 or colour not in unique or not after or after[0] not in ("in", "at", "on", "near"):
            continue
        words = after[2:4] if after[1] == "the" else []
        if not words or after[:4] == ["on", "a", "dark", "background"]:
            continue
        column, row = _cell(unique[colour])
        for word in words:
            if word in _COLUMNS:
                assert column == _COLUMNS[word], " ".join(tokens)
            if word in _ROWS:
                assert row == _ROWS[word], " ".join(tokens)
        if words[0] in ("centre", "middle"):
            assert (column, row) == (1, 1), " ".join(tokens)
        checks["position"] += 1
    if tokens[:4] in (["from", "left", "to", "right"], ["from", "top", "to", "bottom"]):
        axis = 0 if tokens[1] == "left" else 1
        colours = [p[0] for p in phrases]
        if all(c in unique for c in colours):
            positions = [unique[c][axis] for c in colours]
            assert positions == sorted(positions), " ".join(tokens)
            checks["order"] += 1
    return checks


def test_captions_are_true_of_the_pixels(tmp_path: Path) -> None:
    data = generate_synthetic(tmp_path, num_train=120, num_val=0, num_test=0, make_archives=False)
    checks: collections.Counter = collections.Counter()
    areas: dict[tuple[str, str], list[int]] = collections.defaultdict(list)  # (kind, size) -> areas
    for entry in _images(data):
        blobs = _blobs(_image_path(data, entry))
        assert 1 <= sum(len(b) for b in blobs.values()) <= 3
        for sentence in entry["sentences"]:
            tokens = sentence["tokens"]
            checks += _check_caption(tokens, blobs)
            for colour, count, start, end in _noun_phrases(tokens):
                size = tokens[start + 1]
                if count == 1 and size in _SIZE_WORDS and len(blobs[colour]) == 1:
                    size = "large" if size in ("large", "big") else "small"
                    areas[(tokens[end - 1], size)].append(blobs[colour][0][2])
    assert checks["colours+counts"] == 600
    assert checks["relation"] >= 20 and checks["position"] >= 50 and checks["order"] >= 5, checks
    # Size words agree with the pixels: within a kind, every "small" blob is smaller than every "large".
    for kind in ("circle", "square", "triangle", "diamond", "cross"):
        small, large = areas[(kind, "small")], areas[(kind, "large")]
        assert small and large and max(small) < min(large), (kind, small, large)


def test_describe_scene_on_a_known_scene(tmp_path: Path) -> None:
    scene = Scene(
        shapes=(
            Shape("circle", "red", "large", cx=0.2, cy=0.5, radius=0.15),
            Shape("square", "blue", "small", cx=0.8, cy=0.5, radius=0.09),
        ),
        background="light",
    )
    captions = describe_scene(scene, random.Random(0), n=5)
    assert len(set(captions)) == 5
    render_scene(scene, 64, random.Random(0)).save(tmp_path / "scene.png")
    blobs = _blobs(tmp_path / "scene.png")
    assert set(blobs) == {"red", "blue"}
    for caption in captions:
        tokens = tokenize(caption)
        assert "above" not in tokens and "below" not in tokens
        assert _check_caption(tokens, blobs)["colours+counts"] == 1


def test_sample_scene_is_valid() -> None:
    rng = random.Random(0)
    seen_kinds: set[str] = set()
    seen_colours: set[str] = set()
    counts: collections.Counter[int] = collections.Counter()
    for _ in range(300):
        scene = sample_scene(rng)
        counts[len(scene.shapes)] += 1
        for shape in scene.shapes:
            assert (
                shape.radius <= shape.cx <= 1 - shape.radius and shape.radius <= shape.cy <= 1 - shape.radius
            )
            seen_kinds.add(shape.kind)
            seen_colours.add(shape.colour)
    assert len(seen_kinds) == 5 and len(seen_colours) == 8 and set(counts) == {1, 2, 3}


# ----------------------------------------------------------------------------------- learnability


def _scene_caption(scene: Scene) -> str:
    """An image-aware "model": one plain template of this test's own, filled from the scene."""
    groups: dict[tuple[str, str], list[Shape]] = {}
    for shape in sorted(scene.shapes, key=lambda s: s.cx):
        groups.setdefault((shape.colour, shape.kind), []).append(shape)
    phrases = []
    for (colour, kind), shapes in groups.items():
        if len(shapes) == 1:
            article = "an" if colour[0] in "aeiou" else "a"
            phrases.append(f"{article} {colour} {kind}")
        else:
            plural = kind + ("es" if kind.endswith("s") else "s")
            phrases.append(f"{['', '', 'two', 'three'][len(shapes)]} {colour} {plural}")
    return " and ".join(phrases)


def test_image_aware_captions_score_far_above_a_blind_model(tmp_path: Path) -> None:
    from pycocoevalcap.cider.cider import Cider

    data = generate_synthetic(tmp_path, num_train=300, num_val=0, num_test=100, make_archives=False)
    images = _images(data)
    scenes = load_scenes(data.scenes_path)
    refs = {im["imgid"]: [" ".join(s["tokens"]) for s in im["sentences"]] for im in images}
    train = [im["imgid"] for im in images if im["split"] == "train"]
    test = [im["imgid"] for im in images if im["split"] == "test"]

    def cider(ids: list[int], captions: dict[int, str]) -> float:
        score, _ = Cider().compute_score({i: refs[i] for i in ids}, {i: [captions[i]] for i in ids})
        return float(score)

    # Blind: the best of the frequent train captions, chosen by its CIDEr on the train split.
    frequent = collections.Counter(c for i in train for c in refs[i]).most_common(10)
    blind = max((c for c, _ in frequent), key=lambda c: cider(train, {i: c for i in train}))
    blind_score = cider(test, {i: blind for i in test})
    aware_score = cider(test, {i: " ".join(tokenize(_scene_caption(scenes[i]))) for i in test})
    print(f"\nCIDEr-D on test: blind {blind_score:.3f} ({blind!r}), image-aware {aware_score:.3f}")
    assert aware_score >= 3 * blind_score
    assert aware_score > 0.5
