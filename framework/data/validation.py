"""Check every record before training; invalid records are skipped *and counted* or raise.

Checks: the problems the loaders recorded (a line that is not a JSON object, not UTF-8 or not
JSON, a value of the wrong type, an image path outside the data folder: see
``framework/data/loading.py``), every image present and decodable (datasets' Image() decodes
lazily, so each image is decoded here; image files are read only when they are regular files
of at most ``max_image_bytes``, and an image of more than ``max_image_pixels`` pixels is refused
before it is decoded, a truncated one is unreadable), a record's text (everything but its
images) of at most ``max_record_bytes`` bytes, checked before anything else reads it,
``<image>`` placeholder count (when > 0) equal to the number of images, non-empty question and answer, a gold letter that names one of the choices, unique
ids, no control token of the chat template (``<|im_end|>``, ``<|image_pad|>``, ...) in the
record's text (refused, or escaped with ``control_tokens="escape"``), and (with a
``count_prompt_tokens`` callback from the trainer's processor) a prompt no longer than
``max_prompt_tokens``.

Every problem is named with the record's file and line (or row) and id; the console summary
shows the first ten and :func:`write_report` writes all of them, one JSON object per line
(``data_report.jsonl`` beside the run).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from framework.errors import ConfigError, DataError

from .schema import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_RECORD_BYTES,
    IMAGE_PLACEHOLDER,
    choice_letters,
    decode_image,
    split_metadata,
)

log = logging.getLogger(__name__)

MAX_SHOWN = 10
REPORT_NAME = "data_report.jsonl"
FIX_HINT = "Fix the data, or set data.on_invalid=skip to skip and count them."
ON_INVALID = ("skip", "error")
CONTROL_TOKEN_MODES = ("error", "escape")

# Control tokens of the chat templates of the supported model families (Qwen2 / Qwen2-VL /
# Qwen2.5-VL, and Llama 3's), used in addition to the tokenizer's own special tokens (or alone
# when there is no tokenizer). Any other ``<|name|>`` is refused as well.
FALLBACK_CONTROL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_call>",
    "</tool_call>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
)
_GENERIC_CONTROL = r"<\|[A-Za-z0-9_.:-]{1,64}\|>"
ESCAPE_MARK = "\u200b"  # zero-width space after the first character: the text reads the same, never matches


def control_token_list(tokenizer: Any = None) -> list[str]:
    """The control tokens refused in record text: the tokenizer's special tokens (a tokenizer,
    a processor or a :class:`~framework.models.loading.ModelBundle`) plus
    :data:`FALLBACK_CONTROL_TOKENS`, without the ``<image>`` placeholder (it is ours)."""
    tokens = set(FALLBACK_CONTROL_TOKENS)
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if tok is not None:
        try:
            tokens.update(str(t) for t in (getattr(tok, "all_special_tokens", None) or []))
            for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
                if getattr(added, "special", False):
                    tokens.add(str(getattr(added, "content", added)))
        except Exception as e:  # an exotic tokenizer: the fallback list still applies
            log.debug("no special tokens from %s: %s", type(tok).__name__, e)
    tokens.discard(IMAGE_PLACEHOLDER)
    return sorted(t for t in tokens if t.strip())


def control_token_pattern(tokens: Iterable[str] | None = None) -> re.Pattern:
    """A regex matching any of ``tokens`` (default :func:`control_token_list`) or ``<|name|>``."""
    toks = sorted(set(control_token_list() if tokens is None else tokens) - {IMAGE_PLACEHOLDER}, key=len, reverse=True)
    return re.compile("|".join([*(re.escape(t) for t in toks if t), _GENERIC_CONTROL]))


def escape_control_tokens(text: str, pattern: re.Pattern | None = None) -> str:
    """``text`` with every control token broken by a zero-width space after its first character."""
    pattern = pattern or control_token_pattern()
    return pattern.sub(lambda m: m.group(0)[0] + ESCAPE_MARK + m.group(0)[1:], text)


def location(source: Mapping[str, Any] | None) -> str:
    """``"data.jsonl line 3"`` / ``"x.parquet row 7"`` from a row's source ("" when unknown)."""
    if not source or not source.get("file"):
        return ""
    for key in ("line", "row"):
        if source.get(key) is not None:
            return f"{source['file']} {key} {source[key]}"
    return str(source["file"])


@dataclass
class ValidationReport:
    split: str
    total: int
    kept: int
    problems: list[tuple[int, str, str]] = field(default_factory=list)  # (index, id, reasons joined by "; ")
    on_invalid: str = "skip"
    locations: dict[int, str] = field(default_factory=dict)  # index -> "file line N" / "file row N"
    entries: list[dict] = field(default_factory=list)  # one per problem: what the report file lists
    escaped: int = 0  # records whose control tokens were escaped (control_tokens="escape")
    report_path: str | None = None  # where every problem is listed (set by write_report)

    @property
    def invalid(self) -> int:
        return self.total - self.kept

    def summary(self, max_shown: int = MAX_SHOWN) -> str:
        if not self.problems:
            return f"split {self.split}: all {self.total} records valid"
        action = " (skipped)" if self.on_invalid == "skip" else ""

        def one(i, rid, why):
            where = self.locations.get(i)
            return f"#{i} id={rid}: {why}" + (f" [{where}]" if where else "")

        shown = "; ".join(one(*p) for p in self.problems[:max_shown])
        more = len(self.problems) - max_shown
        tail = f"; ... and {more} more" if more > 0 else ""
        listed = f"; every problem: {self.report_path}" if self.report_path else ""
        bad = len({i for i, _, _ in self.problems})
        return f"split {self.split}: {bad} of {self.total} records invalid{action}: {shown}{tail}{listed}"

    def __str__(self) -> str:
        return self.summary()


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = msg if len(msg) <= 160 else msg[:157] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _control_problems(row: Mapping[str, Any], pattern: re.Pattern) -> list[str]:
    out = []
    texts = [("question", row.get("question")), ("answer", row.get("answer"))]
    texts += [(f"choice {j}", c) for j, c in enumerate(row.get("choices") or [])]
    for name, text in texts:
        if isinstance(text, str):
            found = sorted(set(pattern.findall(text)))
            if found:
                out.append(
                    f"{name} holds chat-template control token(s) {', '.join(found)}; remove them, "
                    "or set data.control_tokens=escape"
                )
    return out


def check_record(
    row: dict,
    *,
    count_prompt_tokens: Callable[[dict], int] | None = None,
    max_prompt_tokens: int | None = None,
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
    control_pattern: re.Pattern | None = None,
    max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[str]:
    """Problems of one raw row (images as ``{"bytes", "path"}`` dicts or PIL images)."""
    meta, source = split_metadata(row.get("metadata"))
    problems: list[str] = [str(p) for p in source.get("problems") or []]
    if source.get("unreadable"):  # not a record at all (a JSON list, bad bytes): nothing else to check
        return problems
    size = text_bytes(row)
    if max_record_bytes is not None and size > max_record_bytes:  # nothing reads (tokenizes) it further
        return [
            *problems,
            f"the record has {size:,} bytes of text > data.max_record_bytes={max_record_bytes:,} (raise it to allow longer records)",
        ]
    load_problems = bool(problems)  # then its images are not opened (a refused path is not stored anyway)
    flagged = {p.split(" ", 1)[0] for p in problems}  # fields with a wrong value: not "empty" on top
    images = row.get("images") or []
    decoded = []
    for j, im in enumerate(images):
        path = im.get("path") if isinstance(im, dict) else None
        has_bytes = isinstance(im, dict) and im.get("bytes") is not None
        if im is None or (isinstance(im, dict) and not has_bytes and not path):
            if not load_problems:
                problems.append(f"image {j} missing (no path or bytes)")
            continue
        if load_problems:
            continue
        try:
            decoded.append(decode_image(im, max_image_bytes, max_image_pixels))
        except FileNotFoundError:
            problems.append(f"image {j} missing (file not found: {path})")
        except DataError as e:  # not a regular file, too large, too many pixels
            problems.append(f"image {j} refused ({e})")
        except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
            problems.append(f"image {j} unreadable ({_short(e)})")
    question = row.get("question") or ""
    answer = row.get("answer") or ""
    if not question.strip() and "question" not in flagged:
        problems.append("empty question")
    if not answer.strip() and "answer" not in flagged:
        problems.append("empty answer")
    n_ph = question.count(IMAGE_PLACEHOLDER)
    if n_ph and n_ph != len(images):
        problems.append(
            f"question has {n_ph} {IMAGE_PLACEHOLDER} placeholders but the record has {len(images)} image(s)"
        )
    choices = row.get("choices") or []
    if choices and answer.strip() and not flagged & {"choices", "choice"}:
        letters = choice_letters(len(choices))
        if answer.strip() not in letters:
            problems.append(
                f"answer {answer.strip()!r} is not a choice letter ({', '.join(letters)}) for {len(choices)} choices"
            )
    if control_pattern is not None:
        problems += _control_problems(row, control_pattern)
    if count_prompt_tokens is not None and max_prompt_tokens and not problems:
        record = {
            "id": str(row.get("id", "")),
            "images": decoded,
            "question": question,
            "answer": answer,
            "choices": list(choices),
            "task": row.get("task") or "",
            "difficulty": int(row.get("difficulty") or 0),
            "metadata": meta,
        }
        try:
            n = int(count_prompt_tokens(record))
        except Exception as e:
            problems.append(f"could not count prompt tokens ({_short(e)})")
        else:
            if n > max_prompt_tokens:
                problems.append(f"prompt has {n} tokens > max_prompt_tokens={max_prompt_tokens}")
    return problems


def text_bytes(row: Mapping[str, Any]) -> int:
    """The UTF-8 size of a row's text: question, answer, choices and metadata (not its images)."""
    n = 0
    for v in (row.get("question"), row.get("answer"), row.get("metadata"), *(row.get("choices") or [])):
        if isinstance(v, str):
            n += len(v.encode("utf-8", "surrogatepass"))
    return n


def _check_options(on_invalid: str, control_tokens: str, max_image_bytes: int | None, **limits: int | None) -> None:
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"data.on_invalid must be 'skip' or 'error', not {on_invalid!r}")
    if control_tokens not in CONTROL_TOKEN_MODES:
        raise ConfigError(f"data.control_tokens must be 'error' or 'escape', not {control_tokens!r}")
    for key, value in {"max_image_bytes": max_image_bytes, **limits}.items():
        if value is not None and (isinstance(value, bool) or int(value) <= 0):
            raise ConfigError(f"data.{key}={value!r} must be > 0")


def _escape(ds: Dataset, pattern: re.Pattern) -> tuple[Dataset, int]:
    """``ds`` with the control tokens of question, answer and choices escaped (images untouched)."""
    cols = ds.with_format("arrow").select_columns(["question", "answer", "choices"])[:]
    q, a, c = (cols[k].to_pylist() for k in ("question", "answer", "choices"))
    hit = [
        i
        for i in range(len(q))
        if pattern.search(q[i] or "") or pattern.search(a[i] or "") or any(pattern.search(x or "") for x in c[i] or [])
    ]
    if not hit:
        return ds, 0

    def fn(question, answer, choices):
        return {
            "question": [escape_control_tokens(x or "", pattern) for x in question],
            "answer": [escape_control_tokens(x or "", pattern) for x in answer],
            "choices": [[escape_control_tokens(x or "", pattern) for x in cs or []] for cs in choices],
        }

    out = ds.map(
        fn,
        batched=True,
        input_columns=["question", "answer", "choices"],
        features=ds.features,
        desc="escaping control tokens",
    )
    return out, len(hit)


def check_split(
    ds: Dataset,
    *,
    count_prompt_tokens: Callable[[dict], int] | None = None,
    max_prompt_tokens: int = 512,
    on_invalid: str = "skip",
    split: str = "train",
    batch_size: int = 256,
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
    control_tokens: str = "error",
    special_tokens: Iterable[str] | None = None,
    max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[Dataset, ValidationReport]:
    """Every problem of every record of ``ds``, nothing dropped or raised yet (see
    :func:`apply_policy`). Returns ``ds`` (with its control tokens escaped under
    ``control_tokens="escape"``) and the report."""
    _check_options(
        on_invalid,
        control_tokens,
        max_image_bytes,
        max_record_bytes=max_record_bytes,
        max_image_pixels=max_image_pixels,
    )
    pattern = control_token_pattern(special_tokens)
    escaped = 0
    if control_tokens == "escape":
        ds, escaped = _escape(ds, pattern)
    problems: list[tuple[int, str, str]] = []
    locations: dict[int, str] = {}
    entries: list[dict] = []
    seen: dict[str, tuple[int, str]] = {}
    # Arrow format: raw rows without decoding images, so that decode errors are ours to catch
    raw = ds.with_format("arrow")
    index = 0
    for table in raw.iter(batch_size=batch_size):
        for row in table.to_pylist():
            why = check_record(
                row,
                count_prompt_tokens=count_prompt_tokens,
                max_prompt_tokens=max_prompt_tokens,
                max_image_bytes=max_image_bytes,
                control_pattern=pattern if control_tokens == "error" else None,
                max_record_bytes=max_record_bytes,
                max_image_pixels=max_image_pixels,
            )
            rid = str(row.get("id", ""))
            _, source = split_metadata(row.get("metadata"))
            where = location(source)
            if rid in seen:
                first, first_where = seen[rid]
                why.append(f"duplicate id (first at #{first}" + (f", {first_where})" if first_where else ")"))
            else:
                seen[rid] = (index, where)
            if why:
                problems.append((index, rid, "; ".join(why)))
                if where:
                    locations[index] = where
                pos = {k: source[k] for k in ("file", "line", "row") if source.get(k) is not None}
                entries += [{"split": split, "index": index, "id": rid, **pos, "problem": w} for w in why]
            index += 1
    total = len(ds)
    bad = {i for i, _, _ in problems}
    report = ValidationReport(
        split=split,
        total=total,
        kept=total - len(bad),
        problems=problems,
        on_invalid=on_invalid,
        locations=locations,
        entries=entries,
        escaped=escaped,
    )
    return ds, report


def apply_policy(ds: Dataset, report: ValidationReport) -> Dataset:
    """``skip``: the valid records (the summary is logged as a warning); ``error``: raises
    :class:`DataError` with the summary. Raises as well when no record is left."""
    if report.escaped:
        log.warning(
            "split %s: control tokens of the chat template escaped in %d record(s) (data.control_tokens=escape)",
            report.split,
            report.escaped,
        )
    if not report.problems:
        return ds
    if report.on_invalid == "error":
        raise DataError(f"{report.summary()}. {FIX_HINT}")
    if report.kept == 0:
        raise DataError(f"{report.summary()}. Every record of split {report.split} is invalid; nothing to train on.")
    log.warning(report.summary())
    bad = {i for i, _, _ in report.problems}
    return ds.select([i for i in range(report.total) if i not in bad])


def write_report(path: str | Path, reports: Iterable[ValidationReport], errors: Iterable[str] = ()) -> Path:
    """Write every problem of ``reports`` (and any data-level ``errors``) to ``path``, one JSON
    object per line (``{"split", "index", "id", "file", "line"|"row", "problem"}``); an empty
    file when there is none. Each report's ``report_path`` is set to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for e in errors:
            f.write(json.dumps({"problem": str(e)}, ensure_ascii=False) + "\n")
        for r in reports:
            for entry in r.entries:
                f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
            r.report_path = str(path)
    tmp.replace(path)
    return path


def validate_records(
    ds: Dataset,
    *,
    count_prompt_tokens: Callable[[dict], int] | None = None,
    max_prompt_tokens: int = 512,
    on_invalid: str = "skip",
    split: str = "train",
    batch_size: int = 256,
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
    control_tokens: str = "error",
    special_tokens: Iterable[str] | None = None,
    report_path: str | Path | None = None,
    max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[Dataset, ValidationReport]:
    """Check every record of ``ds``. ``skip``: returns the valid records and a report of
    the others (its summary is logged as a warning); ``error``: raises :class:`DataError`
    listing them (index, id, reason, file and line). With ``report_path`` every problem is
    written there first (:func:`write_report`)."""
    ds, report = check_split(
        ds,
        count_prompt_tokens=count_prompt_tokens,
        max_prompt_tokens=max_prompt_tokens,
        on_invalid=on_invalid,
        split=split,
        batch_size=batch_size,
        max_image_bytes=max_image_bytes,
        control_tokens=control_tokens,
        special_tokens=special_tokens,
        max_record_bytes=max_record_bytes,
        max_image_pixels=max_image_pixels,
    )
    if report_path is not None:
        write_report(report_path, [report])
    return apply_policy(ds, report), report


__all__ = [
    "CONTROL_TOKEN_MODES",
    "FALLBACK_CONTROL_TOKENS",
    "REPORT_NAME",
    "DataError",
    "ValidationReport",
    "apply_policy",
    "check_record",
    "check_split",
    "control_token_list",
    "control_token_pattern",
    "escape_control_tokens",
    "location",
    "validate_records",
    "write_report",
]
