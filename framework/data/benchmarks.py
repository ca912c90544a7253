"""Adapters for benchmark schemas that a ``field_map`` alone cannot express.

Each adapter is a task (``data.task=<name>``) that loads exactly like ``task: hub``
(:func:`framework.data.loading.load_hub`: ``hub_id`` - a hub id or a local folder laid out
like the hub repo -, ``config_name``, ``splits``, ``field_map``, ``metadata_columns``) and
rewrites each raw split first (images stay undecoded):

* ``mmmu`` (MMMU/MMMU, lmms-lab/MMMU): ``options`` is a Python-list string -> ``choices``
  and "(A) ..." lines appended to the question; ``image_1`` .. ``image_7`` -> ``images`` in
  the order their ``<image k>`` placeholders appear (in the question, then the options), each
  placeholder -> ``<image>``; images no placeholder names go first.
* ``mathverse`` (AI4Math/MathVerse): options written in the question ("Choices:\\nA:4\\nB:6")
  -> ``choices``; an empty question (the "Vision Only" version shows it in the image) gets an
  instruction to read it from the image.
* ``mmstar`` (Lin-Chen/MMStar): "Options: A: ..., B: ..." in the question -> ``choices``.
* ``r1v`` (R1-V style hub data: leonardPKU/GEOQA_R1V_Train_8K, leonardPKU/clevr_cogen_a_train):
  the answer column holds ``<answer> 3 </answer>``; the tags are stripped.

MathVista (choices + the answer as the choice's text -> letter), MMK12 and Geometry3K need
only a field map (``task: hub``); R1-V's test files (SuperCLEVR counting, GeoQA) are local
jsonl files read by ``task: local``. See configs/data/<benchmark>.yaml.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

from datasets import Dataset

from framework.registry import TASKS

from .loading import load_hub
from .schema import IMAGE_PLACEHOLDER, cfg_get, choice_letters, to_plain

LETTERS = "ABCDEFGHIJ"


# ----------------------------------------------------------------------------- helpers
def parse_inline_choices(question: str, header: str = r"(?:Options|Choices)") -> list[str]:
    """Options written in a question after ``Options:`` / ``Choices:`` as ``A: x``, ``A. x``,
    ``(A) x`` or ``A) x``, separated by new lines, commas or semicolons, letters in order
    A, B, C, ... Returns ``[]`` when there is no such block (or fewer than two options)."""
    if not isinstance(question, str):
        return []
    m = re.search(header + r"\s*:\s*", question, re.I)
    if not m:
        return []
    block = question[m.end() :]
    first = re.match(r"\s*\(?A\s*[:.)]\s*", block)
    if not first:
        return []
    starts = [(0, first.end())]  # (marker start, text start)
    pos = first.end()
    for L in LETTERS[1:]:
        nxt = re.compile(r"(?:\n|,\s*|;\s*)\s*\(?" + L + r"\s*[:.)]\s*").search(block, pos)
        if not nxt:
            break
        starts.append((nxt.start(), nxt.end()))
        pos = nxt.end()
    if len(starts) < 2:
        return []
    out = []
    for i, (_, text_start) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(block)
        text = block[text_start:end]
        if i + 1 == len(starts):  # the last option ends at the first blank line
            text = re.split(r"\n\s*\n", text)[0]
        out.append(text.strip().rstrip(",;").strip())
    return out


def _rows(batch: dict) -> list[dict]:
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _columns(rows: list[dict], names: list[str]) -> dict:
    return {k: [r[k] for r in rows] for k in names}


def _map(ds: Dataset, fn: Callable[[dict], dict], drop: tuple[str, ...] = ()) -> Dataset:
    """Row-wise ``fn`` (a dict of changed / new columns) over ``ds``; drops ``drop`` columns."""

    def batched(batch):
        rows = _rows(batch)
        changed = [fn(r) for r in rows]
        keys = list(changed[0]) if changed else []
        out = {k: v for k, v in batch.items() if k not in drop}
        out.update({k: [c[k] for c in changed] for k in keys})
        return out

    return ds.map(batched, batched=True, remove_columns=[c for c in ds.column_names if c in drop], desc="adapting rows")


def _column(cfg: Any, field: str, default: str) -> str:
    fm = to_plain(cfg_get(cfg, "field_map")) or {}
    return str(fm.get(field) or default)


# ----------------------------------------------------------------------------- MMMU
_IMG_REF = re.compile(r"<image (\d+)>")


def mmmu_row(row: dict) -> dict:
    """One MMMU row -> question (with options and ``<image>`` placeholders), choices, images."""
    raw = row.get("options")
    try:
        options = ast.literal_eval(raw) if isinstance(raw, str) and raw.strip() else list(raw or [])
    except (ValueError, SyntaxError):
        options = []
    options = [str(o) for o in options]
    text = str(row.get("question") or "")
    if options:
        text += "\n" + "\n".join(f"({L}) {o}" for L, o in zip(choice_letters(len(options)), options))
    refs = [int(k) for k in _IMG_REF.findall(text)]
    images = [row.get(f"image_{k}") for k in refs]
    images = [im for im in images if im is not None]  # a missing one leaves a placeholder: reported
    present = [k for k in range(1, 8) if row.get(f"image_{k}") is not None]
    unnamed = [k for k in present if k not in refs]
    text = _IMG_REF.sub(IMAGE_PLACEHOLDER, text)
    if unnamed:
        text = IMAGE_PLACEHOLDER * len(unnamed) + "\n" + text
        images = [row[f"image_{k}"] for k in unnamed] + images
    choices = [_IMG_REF.sub(lambda m: f"[image {m.group(1)}]", o) for o in options]
    return {"question": text, "choices": choices, "images": images}


def _mmmu(ds: Dataset) -> Dataset:
    drop = tuple(c for c in ds.column_names if re.fullmatch(r"image_\d+", c) or c in ("options", "choices", "images"))
    return _map(ds, mmmu_row, drop=drop)


@TASKS.register("mmmu")
def load_mmmu(cfg: Any):
    return load_hub(cfg, preprocess=_mmmu)


# ----------------------------------------------------------------------------- MathVerse
VISION_ONLY_MC = "According to the question shown in the image, answer the question and give the correct option letter."
VISION_ONLY_FREE = "According to the question shown in the image, answer the question."


def mathverse_row(row: dict) -> dict:
    q = str(row.get("question") or "").strip()
    mc = str(row.get("question_type") or "").lower().startswith("multi")
    if not q:
        q = VISION_ONLY_MC if mc else VISION_ONLY_FREE
    choices = parse_inline_choices(q) if mc else []
    ans = str(row.get("answer") or "").strip()
    if choices and ans not in choice_letters(len(choices)):
        choices = []  # the options could not be read reliably: matched as free text
    return {"question": q, "choices": choices}


def _mathverse(ds: Dataset) -> Dataset:
    return _map(ds, mathverse_row, drop=tuple(c for c in ("choices",) if c in ds.column_names))


@TASKS.register("mathverse")
def load_mathverse(cfg: Any):
    return load_hub(cfg, preprocess=_mathverse)


# ----------------------------------------------------------------------------- MMStar
def mmstar_row(row: dict) -> dict:
    q = str(row.get("question") or "")
    choices = parse_inline_choices(q, header=r"Options")
    ans = str(row.get("answer") or "").strip()
    if choices and ans not in choice_letters(len(choices)):
        choices = []
    return {"choices": choices}


def _mmstar(ds: Dataset) -> Dataset:
    return _map(ds, mmstar_row, drop=tuple(c for c in ("choices",) if c in ds.column_names))


@TASKS.register("mmstar")
def load_mmstar(cfg: Any):
    return load_hub(cfg, preprocess=_mmstar)


# ----------------------------------------------------------------------------- R1-V
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def strip_answer_tags(value: Any) -> str:
    """``"<answer> 3 </answer>"`` -> ``"3"`` (the last answer block); other text unchanged."""
    s = "" if value is None else str(value)
    found = _ANSWER_TAG.findall(s)
    return found[-1].strip() if found else s.strip()


@TASKS.register("r1v")
def load_r1v(cfg: Any):
    col = _column(cfg, "answer", "solution")

    def pre(ds: Dataset) -> Dataset:
        return _map(ds, lambda r: {col: strip_answer_tags(r.get(col))})

    return load_hub(cfg, preprocess=pre)


BENCHMARK_TASKS = ("mmmu", "mathverse", "mmstar", "r1v")

__all__ = [
    "BENCHMARK_TASKS",
    "load_mathverse",
    "load_mmmu",
    "load_mmstar",
    "load_r1v",
    "mathverse_row",
    "mmmu_row",
    "mmstar_row",
    "parse_inline_choices",
    "strip_answer_tags",
]
