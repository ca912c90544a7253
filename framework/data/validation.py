"""Check every record before training; invalid records are skipped *and counted* or raise.

Checks: every image present and decodable (datasets' Image() decodes lazily, so each image is
decoded here), ``<image>`` placeholder count (when > 0) equal to the number of images,
non-empty question and answer, a gold letter that names one of the choices, and (with a
``count_prompt_tokens`` callback from the trainer's processor) a prompt no longer than
``max_prompt_tokens``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from datasets import Dataset

from framework.errors import ConfigError, DataError

from .schema import IMAGE_PLACEHOLDER, choice_letters, decode_image, decode_metadata

log = logging.getLogger(__name__)

MAX_SHOWN = 10
FIX_HINT = "Fix the data, or set data.on_invalid=skip to skip and count them."


@dataclass
class ValidationReport:
    split: str
    total: int
    kept: int
    problems: list[tuple[int, str, str]] = field(default_factory=list)  # (index, id, reason)
    on_invalid: str = "skip"

    @property
    def invalid(self) -> int:
        return self.total - self.kept

    def summary(self, max_shown: int = MAX_SHOWN) -> str:
        if not self.problems:
            return f"split {self.split}: all {self.total} records valid"
        action = " (skipped)" if self.on_invalid == "skip" else ""
        shown = "; ".join(f"#{i} id={rid}: {why}" for i, rid, why in self.problems[:max_shown])
        more = len(self.problems) - max_shown
        tail = f"; ... and {more} more" if more > 0 else ""
        return f"split {self.split}: {len(self.problems)} of {self.total} records invalid{action}: {shown}{tail}"

    def __str__(self) -> str:
        return self.summary()


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = msg if len(msg) <= 120 else msg[:117] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def check_record(
    row: dict,
    *,
    count_prompt_tokens: Callable[[dict], int] | None = None,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Problems of one raw row (images as ``{"bytes", "path"}`` dicts or PIL images)."""
    problems: list[str] = []
    images = row.get("images") or []
    decoded = []
    for j, im in enumerate(images):
        path = im.get("path") if isinstance(im, dict) else None
        has_bytes = isinstance(im, dict) and im.get("bytes") is not None
        if im is None or (isinstance(im, dict) and not has_bytes and not path):
            problems.append(f"image {j} missing (no path or bytes)")
            continue
        try:
            decoded.append(decode_image(im))
        except FileNotFoundError:
            problems.append(f"image {j} missing (file not found: {path})")
        except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), ...
            problems.append(f"image {j} unreadable ({_short(e)})")
    question = row.get("question") or ""
    answer = row.get("answer") or ""
    if not question.strip():
        problems.append("empty question")
    if not answer.strip():
        problems.append("empty answer")
    n_ph = question.count(IMAGE_PLACEHOLDER)
    if n_ph and n_ph != len(images):
        problems.append(
            f"question has {n_ph} {IMAGE_PLACEHOLDER} placeholders but the record has {len(images)} image(s)"
        )
    choices = row.get("choices") or []
    if choices and answer.strip():
        letters = choice_letters(len(choices))
        if answer.strip() not in letters:
            problems.append(
                f"answer {answer.strip()!r} is not a choice letter ({', '.join(letters)}) for {len(choices)} choices"
            )
    if count_prompt_tokens is not None and max_prompt_tokens and not problems:
        record = {
            "id": str(row.get("id", "")),
            "images": decoded,
            "question": question,
            "answer": answer,
            "choices": list(choices),
            "task": row.get("task") or "",
            "difficulty": int(row.get("difficulty") or 0),
            "metadata": decode_metadata(row.get("metadata")),
        }
        try:
            n = int(count_prompt_tokens(record))
        except Exception as e:
            problems.append(f"could not count prompt tokens ({_short(e)})")
        else:
            if n > max_prompt_tokens:
                problems.append(f"prompt has {n} tokens > max_prompt_tokens={max_prompt_tokens}")
    return problems


def validate_records(
    ds: Dataset,
    *,
    count_prompt_tokens: Callable[[dict], int] | None = None,
    max_prompt_tokens: int = 512,
    on_invalid: str = "skip",
    split: str = "train",
    batch_size: int = 256,
) -> tuple[Dataset, ValidationReport]:
    """Check every record of ``ds``. ``skip``: returns the valid records and a report of
    the others (its summary is logged as a warning); ``error``: raises :class:`DataError`
    listing them (index, id, reason)."""
    if on_invalid not in ("skip", "error"):
        raise ConfigError(f"data.on_invalid must be 'skip' or 'error', not {on_invalid!r}")
    problems: list[tuple[int, str, str]] = []
    # Arrow format: raw rows without decoding images, so that decode errors are ours to catch
    raw = ds.with_format("arrow")
    index = 0
    for table in raw.iter(batch_size=batch_size):
        for row in table.to_pylist():
            why = check_record(row, count_prompt_tokens=count_prompt_tokens, max_prompt_tokens=max_prompt_tokens)
            if why:
                problems.append((index, str(row.get("id", "")), "; ".join(why)))
            index += 1
    total = len(ds)
    bad = {i for i, _, _ in problems}
    report = ValidationReport(split=split, total=total, kept=total - len(bad), problems=problems, on_invalid=on_invalid)
    if not problems:
        return ds, report
    if on_invalid == "error":
        raise DataError(f"{report.summary()}. {FIX_HINT}")
    if report.kept == 0:
        raise DataError(f"{report.summary()}. Every record of split {split} is invalid; nothing to train on.")
    log.warning(report.summary())
    return ds.select([i for i in range(total) if i not in bad]), report


__all__ = ["DataError", "ValidationReport", "check_record", "validate_records"]
