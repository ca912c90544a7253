"""Synthetic visual reasoning tasks, deterministic from a seed and sized for tiny models.

An image is a k x k grid of 28x28-pixel cells (k = 2, 3, 4 for difficulty 1, 2, 3) on a
white background; each cell is empty or holds one filled square or circle (18 px) in red,
green, blue or yellow. With Qwen2.5-VL's patch 14 and spatial merge 2, each cell is exactly
one visual token. Task kinds:

* ``count``         "How many shapes are in the image?" -> "3"
* ``count_color``   "How many red shapes are in the image?" -> "2"
* ``color_choice``  "What color is the shape in the top-left cell?" + 4 lettered options -> "B"
* ``compare``       "Are there more red shapes or blue shapes?" -> "red" (never a tie)

``modality: text`` renders the same grid as text (and no image) for a text-only twin model;
for the same seed it yields the same grids, ids and answers as ``modality: image``.

The test split is drawn first from its own seed stream; the train split comes from another
stream and redraws any sample whose (grid, question) also occurs in the test split, so no
(image, question) pair is shared between the splits.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict

from framework.errors import ConfigError
from framework.registry import TASKS

from .schema import FEATURES, IMAGE_PLACEHOLDER, cfg_get, choice_letters, decode_metadata, to_plain

CELL = 28  # pixels per cell = one visual token (patch 14 x spatial merge 2)
SHAPE = 18  # side of a square / diameter of a circle
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
}
COLOR_NAMES = list(COLORS)
COLOR_CODES = {"red": "R", "green": "G", "blue": "B", "yellow": "Y"}
SHAPES = ("square", "circle")
KINDS = ("count", "count_color", "color_choice", "compare")
GRID_SIZE = {1: 2, 2: 3, 3: 4}  # difficulty -> k
WHITE = 255

# A cell is None (empty) or (color_index, shape_index); a grid is a tuple of k*k cells, row-major.


def _masks() -> dict[int, np.ndarray]:
    yy, xx = np.mgrid[0:CELL, 0:CELL]
    lo = (CELL - SHAPE) // 2
    square = (yy >= lo) & (yy < lo + SHAPE) & (xx >= lo) & (xx < lo + SHAPE)
    r = SHAPE / 2
    circle = (yy + 0.5 - CELL / 2) ** 2 + (xx + 0.5 - CELL / 2) ** 2 <= r * r
    return {0: square, 1: circle}


_MASKS = _masks()
_RGB = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.uint8)


# ----------------------------------------------------------------------------- rendering
def render_image(grid: Sequence, k: int) -> np.ndarray:
    """[28k, 28k, 3] uint8 image of a grid."""
    img = np.full((k * CELL, k * CELL, 3), WHITE, dtype=np.uint8)
    for idx, cell in enumerate(grid):
        if cell is None:
            continue
        r, c = divmod(idx, k)
        view = img[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
        view[_MASKS[cell[1]]] = _RGB[cell[0]]
    return img


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def grid_rows(grid: Sequence, k: int) -> list[str]:
    """Rows of the text rendering: '.' empty, colour letter, upper case square, lower case circle."""
    out = []
    for r in range(k):
        toks = []
        for c in range(k):
            cell = grid[r * k + c]
            if cell is None:
                toks.append(".")
            else:
                code = COLOR_CODES[COLOR_NAMES[cell[0]]]
                toks.append(code if cell[1] == 0 else code.lower())
        out.append(" ".join(toks))
    return out


def render_text(grid: Sequence, k: int) -> str:
    rows = "\n".join(grid_rows(grid, k))
    return (
        f"The image is a {k}x{k} grid of cells, shown row by row from the top:\n{rows}\n"
        "Each cell is '.' (empty) or one shape: the letter gives its color "
        "(R red, G green, B blue, Y yellow), upper case for a square, lower case for a circle."
    )


# ----------------------------------------------------------------------------- sampling
def _place(rng: random.Random, k: int, colors: list[int]) -> tuple:
    cells: list = [None] * (k * k)
    for pos, col in zip(rng.sample(range(k * k), len(colors)), colors):
        cells[pos] = (col, rng.randrange(2))
    return tuple(cells)


def _cell_name(idx: int, k: int) -> str:
    r, c = divmod(idx, k)
    if k == 2:
        return f"the {('top', 'bottom')[r]}-{('left', 'right')[c]} cell"
    if k == 3:
        if (r, c) == (1, 1):
            return "the center cell"
        rn, cn = ("top", "middle", "bottom")[r], ("left", "center", "right")[c]
        return f"the {rn} {cn} cell" if r == 1 or c == 1 else f"the {rn}-{cn} cell"
    return f"the cell in row {r + 1}, column {c + 1} (counting from the top-left)"


def _plural(n: int, word: str = "shape") -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _sample_count(rng, k, stratum):
    n = stratum if stratum is not None else rng.randint(1, k * k)
    grid = _place(rng, k, [rng.randrange(4) for _ in range(n)])
    return grid, "How many shapes are in the image?", str(n), [], {"count": n}, n


def _sample_count_color(rng, k, stratum):
    t, m = stratum if stratum is not None else (rng.randrange(4), rng.randint(0, k * k))
    others = [c for c in range(4) if c != t]
    o = rng.randint(0, k * k - m)
    grid = _place(rng, k, [t] * m + [rng.choice(others) for _ in range(o)])
    color = COLOR_NAMES[t]
    q = f"How many {color} shapes are in the image?"
    return grid, q, str(m), [], {"color": color, "count": m}, (t, m)


def _sample_color_choice(rng, k, stratum):
    n = stratum if stratum is not None else rng.randint(1, k * k)
    grid = _place(rng, k, [rng.randrange(4) for _ in range(n)])
    filled = [i for i, cell in enumerate(grid) if cell is not None]
    target = rng.choice(filled)
    where = "the only shape in the image" if n == 1 else f"the shape in {_cell_name(target, k)}"
    order = list(range(4))
    rng.shuffle(order)
    choices = [COLOR_NAMES[c] for c in order]
    letters = choice_letters(4)
    color = COLOR_NAMES[grid[target][0]]
    answer = letters[choices.index(color)]
    opts = " ".join(f"({L}) {c}" for L, c in zip(letters, choices))
    q = f"What color is {where}?\n{opts}"
    meta = {"color": color, "cell": [target // k, target % k]}
    return grid, q, answer, choices, meta, n


def _sample_compare(rng, k, stratum):
    if stratum is None:
        a, b = rng.sample(range(4), 2)
        pairs = [(x, y) for x in range(k * k + 1) for y in range(k * k + 1 - x) if x != y]
        ca, cb = rng.choice(pairs)
    else:
        a, b, ca, cb = stratum
    rest = [c for c in range(4) if c not in (a, b)]
    o = rng.randint(0, k * k - ca - cb)
    grid = _place(rng, k, [a] * ca + [b] * cb + [rng.choice(rest) for _ in range(o)])
    na, nb = COLOR_NAMES[a], COLOR_NAMES[b]
    q = f"Are there more {na} shapes or {nb} shapes?"
    ans = na if ca > cb else nb
    return grid, q, ans, [], {"colors": [na, nb], "counts": [ca, cb]}, (a, b, ca, cb)


_SAMPLERS = {
    "count": _sample_count,
    "count_color": _sample_count_color,
    "color_choice": _sample_color_choice,
    "compare": _sample_compare,
}


def _count_then_level(rng, difficulty, lowest: int) -> tuple[int, int]:
    """A count drawn uniformly from ``lowest`` to the largest grid's cells, then a level whose
    grid can hold it: each count is equally frequent (drawn level first, the counts a 2x2 grid
    allows are three times as frequent as those only a 3x3 grid allows)."""
    n = rng.randint(lowest, max(GRID_SIZE[d] ** 2 for d in difficulty))
    return n, rng.choice([d for d in difficulty if GRID_SIZE[d] ** 2 >= n])


def _balanced_count(rng, difficulty):
    n, d = _count_then_level(rng, difficulty, 1)
    return d, n


def _balanced_count_color(rng, difficulty):
    m, d = _count_then_level(rng, difficulty, 0)
    return d, (rng.randrange(4), m)


# kinds whose answer distribution depends on the grid size; the others are balanced as drawn
_BALANCED = {"count": _balanced_count, "count_color": _balanced_count_color}

_ANSWER_TYPE = {"count": "number", "count_color": "number", "color_choice": "choice", "compare": "text"}


def _as_list(value: Any, name: str) -> list:
    value = to_plain(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def generate_split(
    split: str,
    size: int,
    *,
    seed: int = 0,
    difficulty: Iterable[int] = (1,),
    kinds: Iterable[str] = KINDS,
    modality: str = "image",
    exclude: set | None = None,
    balanced_answers: bool = False,
) -> tuple[Dataset, set]:
    """Draw ``size`` records for ``split``; returns the dataset and its set of
    (kind, k, grid, question) keys. Samples whose key is in ``exclude`` are redrawn.
    ``balanced_answers``: counting questions draw their answer first, uniformly over every
    count the levels allow (else the level first, then a count its grid allows)."""
    try:
        difficulty = [int(d) for d in difficulty]
    except (TypeError, ValueError):
        raise ConfigError(
            f"synthetic: data.difficulty={list(difficulty)} must be integers in {sorted(GRID_SIZE)}"
        ) from None
    kinds = list(kinds)
    for d in difficulty:
        if d not in GRID_SIZE:
            raise ConfigError(f"synthetic: data.difficulty {d} is not one of {sorted(GRID_SIZE)}")
    for kd in kinds:
        if kd not in _SAMPLERS:
            raise ConfigError(f"synthetic: unknown data.kinds entry '{kd}'; choose from {list(KINDS)}")
    if not difficulty or not kinds:
        raise ConfigError("synthetic: data.difficulty and data.kinds must not be empty")
    if modality not in ("image", "text"):
        raise ConfigError(f"synthetic: data.modality must be 'image' or 'text', not '{modality}'")

    rng = random.Random(f"apo-rl/synthetic/{seed}/{split}")
    exclude = exclude or set()
    cols: dict[str, list] = {name: [] for name in FEATURES}
    keys = set()
    for i in range(size):
        d = rng.choice(difficulty)
        kind = rng.choice(kinds)
        k = GRID_SIZE[d]
        sampler = _SAMPLERS[kind]
        stratum = None
        if balanced_answers and kind in _BALANCED:  # the answer first, then its level (d above is replaced)
            d, stratum = _BALANCED[kind](rng, difficulty)
            k = GRID_SIZE[d]
        for attempt in range(2000):
            # keep the answer-determining draw for 100 tries so that redraws do not skew
            # the answer distribution, then redraw everything
            grid, q, ans, choices, meta, drawn = sampler(rng, k, stratum if attempt < 100 else None)
            if stratum is None:
                stratum = drawn
            key = (kind, k, grid, q)
            if key not in exclude:
                break
        else:
            raise ConfigError(
                f"synthetic: could not draw a {split} sample (kind {kind}, difficulty {d}) that "
                "is absent from the other split; the space of distinct samples is too small "
                "for the requested sizes -- lower data.train_size/data.test_size or raise data.difficulty"
            )
        keys.add(key)
        meta = {
            "kind": kind,
            "k": k,
            "grid": grid_rows(grid, k),
            "answer_type": _ANSWER_TYPE[kind],
            "modality": modality,
            **meta,
        }
        if modality == "image":
            images = [{"bytes": png_bytes(render_image(grid, k)), "path": None}]
            question = q
        else:
            images = []
            question = f"{render_text(grid, k)}\n{q}"
        cols["id"].append(f"synthetic-{split}-s{seed}-{i:06d}")
        cols["images"].append(images)
        cols["question"].append(question)
        cols["answer"].append(ans)
        cols["choices"].append(choices)
        cols["task"].append(f"synthetic/{kind}")
        cols["difficulty"].append(d)
        cols["metadata"].append(json.dumps(meta))
    return Dataset.from_dict(cols, features=FEATURES), keys


TEST_SIZE = 200  # test records when data.test_size is null (DataConfig: "synthetic: null: 200")


@TASKS.register("synthetic")
def build(cfg: Any) -> DatasetDict:
    """Build the ``train`` and ``test`` splits from the ``data`` config (see configs/data/synthetic.yaml)."""
    # unset keys: their defaults in framework/config.py DataConfig (cfg_get); null kinds: all of
    # them, null test_size: TEST_SIZE
    seed = int(cfg_get(cfg, "seed"))
    kinds, test_size = cfg_get(cfg, "kinds"), cfg_get(cfg, "test_size")
    common = dict(
        seed=seed,
        difficulty=_as_list(cfg_get(cfg, "difficulty"), "difficulty"),
        kinds=_as_list(list(KINDS) if kinds is None else kinds, "kinds"),
        modality=str(cfg_get(cfg, "modality")),
        balanced_answers=bool(cfg_get(cfg, "balanced_answers")),
    )
    test, test_keys = generate_split("test", int(TEST_SIZE if test_size is None else test_size), **common)
    train, _ = generate_split("train", int(cfg_get(cfg, "train_size")), exclude=test_keys, **common)
    return DatasetDict({"train": train, "test": test})


def reference_completion(record: dict) -> str:
    """An ideal short completion ``<think>...</think><answer>X</answer>`` for a record
    (used for a supervised warm start)."""
    meta = decode_metadata(record.get("metadata"))
    ans = str(record.get("answer", ""))
    kind = meta.get("kind")
    if kind == "count":
        think = f"I see {_plural(int(ans))}."
    elif kind == "count_color":
        think = f"I see {_plural(int(ans), meta['color'] + ' shape')}."
    elif kind == "color_choice":
        think = f"The shape is {meta['color']}, option {ans}."
    elif kind == "compare":
        (na, nb), (ca, cb) = meta["colors"], meta["counts"]
        think = f"I see {ca} {na} and {cb} {nb} shapes."
    else:
        think = "The answer is " + ans + "."
    return f"<think>{think}</think><answer>{ans}</answer>"


__all__ = [
    "CELL",
    "SHAPE",
    "COLORS",
    "KINDS",
    "GRID_SIZE",
    "IMAGE_PLACEHOLDER",
    "build",
    "generate_split",
    "reference_completion",
    "render_image",
    "render_text",
]
