"""Load the ``data`` config into a :class:`datasets.DatasetDict` of :data:`FEATURES` rows.

``load_data(cfg)`` dispatches on ``cfg.task``, a name in the ``TASKS`` registry:

* ``synthetic`` (framework/data/synthetic.py) and any plugin task: ``TASKS.get(task)(cfg)``;
* ``local``: ``path`` = a .jsonl/.json/.parquet file or a directory holding ``train.*`` and
  ``test.*`` files (``split_files: {train: ..., test: ...}`` names them explicitly). Images
  are file paths (relative to the data file's directory), raw bytes, base64 strings / data
  URIs, or ``{"bytes", "path"}`` dicts; one image or a list per row;
* ``hub``: ``hub_id`` + ``splits: {train: <split spec>, test: ...}`` (+ ``config_name``,
  ``revision``) through ``datasets.load_dataset``.

``field_map`` maps schema fields to source columns (``{question: query, images: decoded_image}``);
unmapped fields use the column of the same name when present (``images`` also tries
``image``). ``metadata_columns`` copies further columns into ``metadata``. For multiple-choice
rows whose answer is the text of one of the choices, the answer becomes that choice's letter
(the text is kept in ``metadata.answer_text``).

Nothing a record holds stops loading: each row keeps where it came from (file and line, or
row) and the problems found while reading it (a line that is not a JSON object, not UTF-8 or
not JSON; a value of the wrong type - ``question`` a list, ``answer`` a dict or a list of
several, ``difficulty`` not an integer, ``images``/``choices`` a number -; an image path
outside the data folder, absolute or through ``..``, unless ``allow_absolute_paths``) in
``metadata[SOURCE_KEY]``; :mod:`framework.data.validation` reports them with the rest
(:func:`prepare_data` writes them all to the run's ``data_report.jsonl``). A refused image
path is not stored.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from framework.registry import TASKS

from .schema import (
    COLUMNS,
    DEFAULT_MAX_RECORD_BYTES,
    FEATURES,
    SOURCE_KEY,
    cfg_get,
    choice_letters,
    encode_metadata,
    to_plain,
)
from .validation import DataError, ValidationReport, apply_policy, check_split, write_report

log = logging.getLogger(__name__)

DATA_EXTS = (".jsonl", ".json", ".parquet")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_OPTIONAL_DEFAULTS = {"images": [], "choices": [], "difficulty": 0, "metadata": "{}"}


# ----------------------------------------------------------------------------- entry points
def load_data(cfg: Any) -> DatasetDict:
    """The data of ``cfg.task`` as a DatasetDict (usually ``train`` and ``test``) of FEATURES rows."""
    task = cfg_get(cfg, "task")
    if not task:
        raise DataError(
            f"data.task is not set; choose one of: {', '.join(TASKS.names())} "
            "(e.g. data=synthetic, data=local data.path=..., data=hub data.hub_id=...)"
        )
    out = TASKS.get(str(task))(cfg)
    if isinstance(out, Dataset):
        out = DatasetDict({"train": out})
    if not isinstance(out, DatasetDict):
        raise DataError(f"task '{task}' returned {type(out).__name__}; a task must return a DatasetDict")
    return DatasetDict({split: conform(ds, str(task), split) for split, ds in out.items()})


def prepare_data(
    cfg: Any,
    count_prompt_tokens: Callable[[dict], int] | None = None,
    *,
    special_tokens: Iterable[str] | None = None,
    report_path: str | os.PathLike | None = None,
    splits: Iterable[str] | None = None,
) -> tuple[DatasetDict, dict[str, ValidationReport]]:
    """``load_data`` then every record of every split (or of ``splits``) checked with the
    generic data options (``max_prompt_tokens``, ``on_invalid``, ``max_image_bytes``,
    ``max_image_pixels``, ``max_record_bytes``, ``control_tokens``); ``special_tokens``: the
    tokenizer's control tokens (:func:`~framework.data.validation.control_token_list`). With ``report_path`` (the run's
    ``data_report.jsonl``) every problem of every split is written there before anything is
    skipped or raised (a file-level error too); the console summaries name the file."""
    try:
        dsd = load_data(cfg)
    except DataError as e:
        if report_path is not None:
            write_report(report_path, [], errors=[str(e)])
        raise
    wanted = None if splits is None else set(splits)
    on_invalid = str(cfg_get(cfg, "on_invalid"))
    checked: dict[str, tuple[Dataset, ValidationReport]] = {}
    for split, ds in dsd.items():
        if wanted is not None and split not in wanted:
            continue
        checked[split] = check_split(
            ds,
            count_prompt_tokens=count_prompt_tokens,
            max_prompt_tokens=int(cfg_get(cfg, "max_prompt_tokens")),
            on_invalid=on_invalid,
            split=split,
            max_image_bytes=int(cfg_get(cfg, "max_image_bytes")),
            control_tokens=str(cfg_get(cfg, "control_tokens")),
            special_tokens=special_tokens,
            max_record_bytes=int(cfg_get(cfg, "max_record_bytes")),
            max_image_pixels=int(cfg_get(cfg, "max_image_pixels")),
        )
    reports = {split: rep for split, (_, rep) in checked.items()}
    if report_path is not None:
        write_report(report_path, reports.values())
    _warn_shared_ids(checked)
    out, errors = {}, []
    for split, (ds, rep) in checked.items():
        try:
            out[split] = apply_policy(ds, rep)
        except DataError as e:
            errors.append(str(e))
    if errors:
        raise DataError(" | ".join(errors))
    return DatasetDict(out), reports


def _warn_shared_ids(checked: Mapping[str, tuple[Dataset, ValidationReport]]) -> None:
    """Warn when a test record has the id of a train record (a likely leak between the splits)."""
    if "train" not in checked or "test" not in checked:
        return
    ids = {s: set(checked[s][0].with_format("arrow")["id"].to_pylist()) for s in ("train", "test")}
    shared = sorted(ids["train"] & ids["test"])
    if shared:
        log.warning(
            "%d id(s) occur in both the train and the test split (e.g. %s): check the data for a leak",
            len(shared),
            ", ".join(shared[:5]),
        )


def conform(ds: Dataset, task: str, split: str) -> Dataset:
    """Bring a plugin task's split to FEATURES (fills optional columns, drops extras)."""
    if ds.features == FEATURES:
        return ds
    missing = [c for c in ("question", "answer") if c not in ds.column_names]
    if missing:
        raise DataError(
            f"task '{task}' split '{split}' has no column {missing[0]!r}; available columns: "
            f"{ds.column_names}; records need {COLUMNS}"
        )
    n = len(ds)
    if "id" not in ds.column_names:
        ds = ds.add_column("id", [f"{task}-{split}-{i}" for i in range(n)])
    if "task" not in ds.column_names:
        ds = ds.add_column("task", [task] * n)
    for col, default in _OPTIONAL_DEFAULTS.items():
        if col not in ds.column_names:
            ds = ds.add_column(col, [default] * n)
    ds = ds.remove_columns([c for c in ds.column_names if c not in FEATURES])
    ds = ds.select_columns(COLUMNS)
    return ds.cast(FEATURES)


# ----------------------------------------------------------------------------- columns
def resolve_columns(
    available: Iterable[str], field_map: Mapping[str, Any] | None, source: str
) -> dict[str, str | None]:
    """Schema field -> source column (None where absent); raises DataError naming the
    column and the available ones when a mapped or required column is missing."""
    available = list(available)
    field_map = dict(to_plain(field_map) or {})
    out: dict[str, str | None] = {}
    for field, col in field_map.items():
        if field not in FEATURES:
            raise DataError(f"field_map key {field!r} is not a schema field; schema fields: {COLUMNS}")
        if col is None:
            out[field] = None
        elif col not in available:
            raise DataError(
                f"column {col!r} (data.field_map.{field}) not found in {source}; available columns: {available}"
            )
        else:
            out[field] = str(col)
    for field in FEATURES:
        if field in out:
            continue
        if field in available:
            out[field] = field
        elif field == "images" and "image" in available:
            out[field] = "image"
        elif field in ("question", "answer"):
            raise DataError(
                f"column {field!r} not found in {source}; available columns: {available}. "
                f"Map one with data.field_map.{field}=<column>"
            )
        else:
            out[field] = None
    return out


def _check_metadata_columns(cols: Iterable[str], available: list[str], source: str) -> list[str]:
    cols = list(to_plain(cols) or [])
    for c in cols:
        if c not in available:
            raise DataError(
                f"column {c!r} (data.metadata_columns) not found in {source}; available columns: {available}"
            )
    return cols


# ----------------------------------------------------------------------------- values
# Every value of a source row is checked for its type here, where the source's types are still
# visible (FEATURES stores strings): a problem never raises, it is recorded in the row's
# metadata[SOURCE_KEY]["problems"] with the row's file and line, and validation reports it.
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.I)
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")
_INT32 = (-(2**31), 2**31 - 1)
_BYTES = (bytes, bytearray, memoryview)
IMAGE_FORMS = "a path, bytes, a base64 data URI or a {bytes, path} dict"


def _describe(value: Any) -> str:
    """``list ['What', 'color?']``: the type and a short repr, for problem messages."""
    r = repr(value)
    return f"{type(value).__name__} {r if len(r) <= 60 else r[:57] + '...'}"


def _unicode_ok(field: str, value: str, problems: list[str]) -> str:
    """``value`` if it can be stored (UTF-8 encodable: no unpaired surrogates such as a JSON
    ``"\\ud800"``), else ``""`` and a problem."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        problems.append(f"{field} holds invalid Unicode (an unpaired surrogate at character {e.start})")
        return ""
    return value


def _text(field: str, value: Any, problems: list[str], *, numbers: bool = False) -> str:
    """A string field (``numbers``: a finite int/float is written as text too)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return _unicode_ok(field, value, problems)
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{field} is {value!r}, not a finite number")
            return ""
        return str(value)
    problems.append(f"{field} must be a string{' or a number' if numbers else ''}, not {_describe(value)}")
    return ""


def _image_value(
    value: Any,
    base_dir: Path | None,
    j: int = 0,
    problems: list[str] | None = None,
    allow_absolute_paths: bool = False,
    root_dir: Path | None = None,
) -> dict | None:
    """One image in any accepted form -> ``{"bytes", "path"}`` (None when missing or refused:
    a refused path is never stored, so that nothing opens it)."""
    problems = [] if problems is None else problems
    if value is None:
        return None
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is not None and not isinstance(data, _BYTES):
            problems.append(f"image {j} bytes must be bytes, not {_describe(data)}")
            return None
        if path is not None and not isinstance(path, (str, os.PathLike)):
            problems.append(f"image {j} path must be a string, not {_describe(path)}")
            return None
        if data is None and not path:
            return None
        if data is None:
            resolved = _safe_path(path, base_dir, j, problems, allow_absolute_paths, root_dir)
            return None if resolved is None else {"bytes": None, "path": resolved}
        path = _unicode_ok(f"image {j} path", str(path), problems) if path is not None else None
        return {"bytes": bytes(data), "path": path or None}
    if isinstance(value, _BYTES):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, (str, os.PathLike)):
        s = str(value).strip()
        if not s:
            return None
        if _DATA_URI.match(s):
            try:
                return {"bytes": base64.b64decode(s.split(",", 1)[1]), "path": None}
            except (binascii.Error, ValueError):
                return {"bytes": b"", "path": None}  # reported as unreadable by validation
        if not s.lower().endswith(IMAGE_EXTS) and len(s) > 64 and "/" not in s[:64]:
            try:
                data = base64.b64decode(s, validate=True)
                if data.startswith(_IMAGE_MAGIC):
                    return {"bytes": data, "path": None}
            except (binascii.Error, ValueError):
                pass
        resolved = _safe_path(s, base_dir, j, problems, allow_absolute_paths, root_dir)
        return None if resolved is None else {"bytes": None, "path": resolved}
    try:  # a PIL image
        import PIL.Image

        if isinstance(value, PIL.Image.Image):
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return {"bytes": buf.getvalue(), "path": None}
    except ImportError:  # pragma: no cover
        pass
    problems.append(f"image {j} must be {IMAGE_FORMS}, not {_describe(value)}")
    return None


def _inside(p: Path, base: Path) -> bool:
    p = os.path.normpath(str(p))
    for b in {os.path.normpath(str(base)), os.path.realpath(str(base))}:
        if p == b or p.startswith(b.rstrip(os.sep) + os.sep):
            return True
    return False


def _safe_path(
    path: Any,
    base_dir: Path | None,
    j: int,
    problems: list[str],
    allow_absolute_paths: bool,
    root_dir: Path | None = None,
) -> str | None:
    """The path of image ``j`` resolved against ``base_dir`` (the data file's folder), or None
    and a problem: a path that lies outside the data folder ``root_dir`` (default ``base_dir``),
    absolute or through ``..``, or through a symbolic link whose target lies outside it, is
    refused unless ``data.allow_absolute_paths=true``. The check is on the path as written
    (normalised) and on the file it resolves to (links followed)."""
    raw = _unicode_ok(f"image {j} path", str(path), problems)
    if not raw:
        return None
    root = root_dir if root_dir is not None else base_dir
    allow = " (or set data.allow_absolute_paths=true)"
    p = Path(raw).expanduser()
    if p.is_absolute():
        full = p
    elif base_dir is not None:
        full = base_dir / p
    elif allow_absolute_paths:
        return raw  # relative to the working directory, as asked
    else:
        problems.append(
            f"image {j} path {raw!r} is relative but this data source has no folder to resolve it against{allow}"
        )
        return None
    full = Path(os.path.normpath(str(full)))
    if allow_absolute_paths:
        return str(full)
    if root is not None and _inside(full, root):
        real = os.path.realpath(full)
        if _inside(Path(real), Path(os.path.realpath(root))):
            return str(full)
        problems.append(
            f"image {j} path {raw!r} is a symbolic link (or lies under one) to {real}, outside the data folder "
            f"{root}; image paths must stay inside the data folder{allow}"
        )
        return None
    where = f"the data folder {root}" if root is not None else "a data folder"
    why = "is absolute" if p.is_absolute() else "leads out of the data folder"
    problems.append(f"image {j} path {raw!r} {why}; image paths must be relative to {where}{allow}")
    return None


def _resolve_path(path: Any, base_dir: Path | None) -> str:
    p = Path(str(path)).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return str(p)


def _images(
    value: Any,
    base_dir: Path | None,
    problems: list[str] | None = None,
    allow_absolute_paths: bool = False,
    root_dir: Path | None = None,
) -> list:
    problems = [] if problems is None else problems
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [_image_value(v, base_dir, j, problems, allow_absolute_paths, root_dir) for j, v in enumerate(value)]
    if isinstance(value, (str, os.PathLike, Mapping, *_BYTES)) or type(value).__module__.startswith("PIL"):
        return [_image_value(value, base_dir, 0, problems, allow_absolute_paths, root_dir)]
    problems.append(f"images must be an image ({IMAGE_FORMS}) or a list of them, not {_describe(value)}")
    return []


def _choice(j: int, value: Any, problems: list[str]) -> str:
    if isinstance(value, str):
        return _unicode_ok(f"choice {j}", value, problems)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    problems.append(f"choice {j} must be a string or a number, not {_describe(value)}")
    return ""


def _choices(value: Any, problems: list[str] | None = None) -> list[str]:
    problems = [] if problems is None else problems
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return []
        try:
            parsed = json.loads(s)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, list):
            return [_choice(j, c, problems) for j, c in enumerate(parsed)]
        return [_unicode_ok("choice 0", value, problems)]
    if isinstance(value, Mapping):  # e.g. {"A": "...", "B": "..."}
        try:
            items = sorted(value.items())
        except TypeError:
            items = list(value.items())
        return [_choice(j, v, problems) for j, (_, v) in enumerate(items)]
    if isinstance(value, (list, tuple)):
        return [_choice(j, c, problems) for j, c in enumerate(value)]
    problems.append(f"choices must be a list of strings, not {_describe(value)}")
    return []


def _difficulty(value: Any, problems: list[str]) -> int:
    if value is None or value == "":
        return 0
    integral = isinstance(value, float) and value.is_integer()
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif integral or (isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,12}\s*", value)):
        n = int(value)
    else:
        problems.append(f"difficulty must be an integer, not {_describe(value)}")
        return 0
    if not _INT32[0] <= n <= _INT32[1]:
        problems.append(f"difficulty {n} is out of range (a 32-bit integer)")
        return 0
    return n


def _metadata(value: Any) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        try:
            out = json.loads(value)
            return out if isinstance(out, dict) else {"value": out}
        except (ValueError, RecursionError):
            return {"value": value}
    return {"value": value}


def convert_row(
    row: Any,
    columns: Mapping[str, str | None],
    *,
    index: int,
    base_dir: Path | None,
    default_task: str,
    id_prefix: str,
    metadata_columns: Iterable[str] = (),
    source: Mapping[str, Any] | None = None,
    allow_absolute_paths: bool = False,
    root_dir: Path | None = None,
    problems: list[str] | None = None,
) -> dict:
    """A source row -> a FEATURES row (images as ``{"bytes", "path"}`` dicts).

    Never raises for a bad value: the problems (wrong types, a row that is not an object,
    refused image paths, ...) and ``source`` (``{"file", "line"|"row"}``) are stored under
    ``metadata[SOURCE_KEY]``, where :func:`~framework.data.validation.validate_records` reports
    them."""
    problems = [] if problems is None else list(problems)
    unreadable = not isinstance(row, Mapping)
    if unreadable:
        if not problems:
            problems.append(f"the record is a JSON {_json_kind(row)}, not an object of fields (question, answer, ...)")
        row = {}

    def get(field):
        col = columns.get(field)
        return row.get(col) if col is not None else None

    answer = get("answer")
    if isinstance(answer, (list, tuple)) and len(answer) == 1:
        answer = answer[0]
    answer = _text("answer", answer, problems, numbers=True)
    question = _text("question", get("question"), problems)
    choices = _choices(get("choices"), problems)
    meta = _metadata(get("metadata"))
    for c in metadata_columns:
        meta[c] = row.get(c)
    letters = choice_letters(len(choices))
    if choices and answer.strip() not in letters and answer.strip() in [c.strip() for c in choices]:
        meta.setdefault("answer_text", answer)
        answer = letters[[c.strip() for c in choices].index(answer.strip())]
    rid = get("id")
    if isinstance(rid, bool) or not (rid is None or isinstance(rid, (str, int))):
        problems.append(f"id must be a string or an integer, not {_describe(rid)}")
        rid = None
    elif isinstance(rid, str):
        rid = _unicode_ok("id", rid, problems)
    task = get("task")
    if task is not None and not isinstance(task, str):
        problems.append(f"task must be a string, not {_describe(task)}")
        task = None
    elif isinstance(task, str):
        task = _unicode_ok("task", task, problems)
    difficulty = _difficulty(get("difficulty"), problems)
    images = _images(get("images"), base_dir, problems, allow_absolute_paths, root_dir)
    meta = json.loads(json.dumps(meta, default=str))
    if source or problems:
        meta[SOURCE_KEY] = {
            **(source or {}),
            **({"problems": problems} if problems else {}),
            **({"unreadable": True} if unreadable else {}),
        }
    return {
        "id": f"{id_prefix}-{index}" if rid is None or rid == "" else str(rid),
        "images": images,
        "question": question,
        "answer": answer,
        "choices": choices,
        "task": str(task or default_task),
        "difficulty": difficulty,
        "metadata": encode_metadata(meta),
    }


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


class _Unreadable:
    """A source line that could not be read as a record (bad encoding, bad JSON)."""

    def __init__(self, problem: str):
        self.problem = problem


def _from_rows(rows: list[tuple[dict, Any]], source: str, **kw) -> Dataset:
    """``rows``: ``(location, value)`` pairs, ``value`` a record dict, any other JSON value or
    an :class:`_Unreadable`; every one becomes a row (problems stored for validation)."""
    dict_rows = [r for _, r in rows if isinstance(r, Mapping)]
    available = sorted({str(k) for r in dict_rows for k in r})
    if dict_rows:
        columns = resolve_columns(available, kw.pop("field_map"), source)
        meta_cols = _check_metadata_columns(kw.pop("metadata_columns"), available, source)
    else:  # nothing but malformed lines: each is reported by validation
        kw.pop("field_map"), kw.pop("metadata_columns")
        columns, meta_cols = {f: f for f in FEATURES}, []
    cols = {name: [] for name in FEATURES}
    for i, (loc, r) in enumerate(rows):
        pre = [r.problem] if isinstance(r, _Unreadable) else []
        rec = convert_row(
            None if pre else r, columns, index=i, metadata_columns=meta_cols, source=loc, problems=pre, **kw
        )
        for name in FEATURES:
            cols[name].append(rec[name])
    try:
        return Dataset.from_dict(cols, features=FEATURES)
    except Exception as e:  # the checks above should make this unreachable; name the file if not
        raise DataError(f"{source}: could not store the records ({type(e).__name__}: {e})") from e


def undecoded(ds: Dataset) -> Dataset:
    """``ds`` with its image columns (one image or a list) cast to ``Image(decode=False)``:
    rows then hold ``{"bytes", "path"}`` dicts instead of decoded PIL images."""
    for col, feat in ds.features.items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(feat, (datasets.List, datasets.LargeList)) and isinstance(
            getattr(feat, "feature", None), datasets.Image
        ):
            ds = ds.cast_column(col, type(feat)(datasets.Image(decode=False)))
    return ds


def _from_dataset(ds: Dataset, source: str, **kw) -> Dataset:
    available = list(ds.column_names)
    columns = resolve_columns(available, kw.pop("field_map"), source)
    meta_cols = _check_metadata_columns(kw.pop("metadata_columns"), available, source)
    ds = undecoded(ds)  # keep images encoded: no decode/re-encode round trip

    def fn(batch, indices):
        n = len(indices)
        rows = [{k: v[j] for k, v in batch.items()} for j in range(n)]
        recs = [
            convert_row(r, columns, index=i, metadata_columns=meta_cols, source={"file": source, "row": i}, **kw)
            for r, i in zip(rows, indices)
        ]
        return {name: [rec[name] for rec in recs] for name in FEATURES}

    return ds.map(
        fn,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=FEATURES,
        desc=f"converting {source}",
    )


# ----------------------------------------------------------------------------- local files
def _utf8_problem(raw: bytes, e: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); save the file as UTF-8"


def _bounded_lines(f, limit: int | None) -> Iterator[tuple[bytes | None, int]]:
    """``(line, size)`` for each line of binary file ``f``; a line of more than ``limit`` bytes
    is ``(None, size)``: it is skipped in pieces and never held in memory whole."""
    while True:
        raw = f.readline() if limit is None else f.readline(limit + 1)
        if not raw:
            return
        if limit is None or len(raw) <= limit or (len(raw) == limit + 1 and raw.endswith(b"\n")):
            yield raw, len(raw)
            continue
        size = len(raw)
        while not raw.endswith(b"\n"):
            raw = f.readline(1 << 20)
            if not raw:
                break
            size += len(raw)
        yield None, size - raw.endswith(b"\n")  # the line's bytes, without its line break


def _read_rows(path: Path, max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES) -> list[tuple[dict, Any]]:
    """``(location, value)`` per record of a .jsonl (``{"file", "line"}``, 1-based, blank lines
    skipped) or .json file (``{"file", "row"}``, 0-based). A line that is not UTF-8 or not
    JSON, or longer than ``max_record_bytes`` (not read whole: ``data.max_record_bytes``),
    becomes an :class:`_Unreadable`; a .json file that cannot be read at all raises
    :class:`DataError` naming the file and the line."""
    file = str(path)
    if path.suffix == ".jsonl":
        rows = []
        with open(path, "rb") as f:
            for ln, (raw, size) in enumerate(_bounded_lines(f, max_record_bytes), 1):
                loc = {"file": file, "line": ln}
                if raw is None:
                    rows.append(
                        (
                            loc,
                            _Unreadable(
                                f"the line has {size:,} bytes > data.max_record_bytes={max_record_bytes:,} (raise it to "
                                "allow longer records; inline base64 images count: store large images as files)"
                            ),
                        )
                    )
                    continue
                if ln == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    rows.append((loc, _Unreadable(f"the line is {_utf8_problem(raw, e)}")))
                    continue
                if not line.strip():
                    continue
                try:
                    rows.append((loc, json.loads(line)))
                except (ValueError, RecursionError) as e:
                    rows.append((loc, _Unreadable(f"the line is not valid JSON ({e})")))
        return rows
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, Mapping):
        for key in ("data", "records", "rows", "examples"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise DataError(f'{path}: expected a JSON list of records (or {{"data": [...]}})')
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, not a JSON {_json_kind(data)}")
    return [({"file": file, "row": i}, r) for i, r in enumerate(data)]


def _load_file(path: Path, split: str, cfg: Any, root: Path | None = None) -> Dataset:
    """One data file; image paths resolve against its folder and must stay inside ``root``
    (the data folder: ``data.path``, or its folder when it is a file)."""
    kw = dict(
        field_map=cfg_get(cfg, "field_map"),
        metadata_columns=cfg_get(cfg, "metadata_columns"),
        base_dir=path.parent,
        default_task=str(cfg_get(cfg, "task_name") or "local"),  # null: the source's kind
        id_prefix=f"{path.stem}-{split}",
        allow_absolute_paths=bool(cfg_get(cfg, "allow_absolute_paths")),
        root_dir=root if root is not None else path.parent,
    )
    if not path.is_file():
        raise DataError(f"data file for split '{split}' not found (or not a regular file): {path}")
    if path.suffix == ".parquet":
        try:
            ds = Dataset.from_parquet(str(path), keep_in_memory=True)
        except Exception as e:  # pyarrow.ArrowInvalid etc.: a truncated or foreign file
            raise DataError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from e
        return _from_dataset(ds, f"{path}", **kw)
    if path.suffix in (".jsonl", ".json"):
        return _from_rows(_read_rows(path, int(cfg_get(cfg, "max_record_bytes"))), f"{path}", **kw)
    raise DataError(f"unsupported data file {path}; use one of {DATA_EXTS}")


def _find_split_files(directory: Path, split: str) -> list[Path]:
    found = []
    for p in sorted(directory.iterdir()):
        if p.suffix in DATA_EXTS and (p.stem == split or p.stem.startswith(split + "-")):
            found.append(p)
    return found


@TASKS.register("local")
def load_local(cfg: Any) -> DatasetDict:
    """Local .jsonl/.json/.parquet files (see module docstring)."""
    path = cfg_get(cfg, "path")
    if not path:
        raise DataError("data.path must be set for data.task=local (a data file or a directory)")
    path = Path(str(path)).expanduser().resolve()
    if not path.exists():
        raise DataError(f"data.path {path} does not exist")
    base = path if path.is_dir() else path.parent
    split_files = to_plain(cfg_get(cfg, "split_files")) or {}
    files: dict[str, list[Path]] = {}
    if split_files:
        for split, f in split_files.items():
            fs = f if isinstance(f, (list, tuple)) else [f]
            files[split] = [Path(_resolve_path(x, base)) for x in fs]
    elif path.is_dir():
        for split in ("train", "test"):
            found = _find_split_files(path, split)
            if not found and split == "test":
                found = _find_split_files(path, "validation") or _find_split_files(path, "val")
            if found:
                files[split] = found
        if "train" not in files:
            raise DataError(
                f"no train file in {path} (looked for train.jsonl/.json/.parquet or train-*.*); "
                f"it holds {sorted(p.name for p in path.iterdir())}; name them with "
                "data.split_files={train: ..., test: ...}"
            )
    else:
        files["train"] = [path]
    out = {}
    for split, fs in files.items():
        parts = [_load_file(f, split, cfg, root=base) for f in fs]
        out[split] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    holdout = cfg_get(cfg, "test_size")
    if "test" not in out and holdout:
        holdout = float(holdout)
        holdout = holdout if holdout < 1 else int(holdout)
        parts = out["train"].train_test_split(test_size=holdout, seed=int(cfg_get(cfg, "seed")))
        out["train"], out["test"] = parts["train"], parts["test"]
    return DatasetDict(out)


# ----------------------------------------------------------------------------- hub
@TASKS.register("hub")
def load_hub(cfg: Any, preprocess: Callable[[Dataset], Dataset] | None = None) -> DatasetDict:
    """A Hugging Face Hub dataset via ``datasets.load_dataset`` (see module docstring).

    ``hub_id`` may also be a local folder laid out like a hub dataset repo (parquet/jsonl
    files, optionally a README.md declaring configs). ``config_name`` may be a list: the
    configs are loaded and concatenated (MMMU's per-subject configs). ``preprocess`` (used by
    the benchmark adapters, framework/data/benchmarks.py) maps each raw split, images
    undecoded, before ``field_map`` applies."""
    hub_id = cfg_get(cfg, "hub_id")
    if not hub_id:
        raise DataError("data.hub_id must be set for data.task=hub (e.g. data.hub_id=lmms-lab/MathVista)")
    config_name = to_plain(cfg_get(cfg, "config_name"))
    configs = list(config_name) if isinstance(config_name, (list, tuple)) else [config_name]
    revision = cfg_get(cfg, "revision")
    # a local folder laid out like a hub repo: image paths (of path-only images) stay inside it
    hub_dir = Path(str(hub_id)).expanduser().resolve() if Path(str(hub_id)).expanduser().is_dir() else None
    splits = to_plain(cfg_get(cfg, "splits")) or {"train": "train", "test": "test"}
    out = {}
    for split, spec in splits.items():
        if spec is None:
            continue
        try:
            parts = [datasets.load_dataset(str(hub_id), c, split=str(spec), revision=revision) for c in configs]
            ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        except Exception as e:  # offline, unknown id, bad split spec, ...
            raise DataError(
                f"could not load hub dataset '{hub_id}'"
                + (f" (config '{config_name}')" if config_name else "")
                + f", split '{spec}' for '{split}': {type(e).__name__}: {e}. "
                "If this machine is offline or cannot reach the Hub, copy the data here "
                f"(e.g. on a connected machine: datasets.load_dataset('{hub_id}', split='{spec}')"
                ".to_parquet('DIR/" + split + ".parquet')) and use it with "
                "data=local data.path=DIR (keeping the same data.field_map), or download the dataset repo "
                "(huggingface-cli download --repo-type dataset " + str(hub_id) + " --local-dir DIR) and set "
                "data.hub_id=DIR."
            ) from e
        if preprocess is not None:
            ds = preprocess(undecoded(ds))
        out[split] = _from_dataset(
            ds,
            f"hub dataset '{hub_id}' split '{spec}'",
            field_map=cfg_get(cfg, "field_map"),
            metadata_columns=cfg_get(cfg, "metadata_columns"),
            base_dir=hub_dir,
            default_task=str(cfg_get(cfg, "task_name") or hub_id),
            allow_absolute_paths=bool(cfg_get(cfg, "allow_absolute_paths")),
            id_prefix=f"{Path(str(hub_id)).name if Path(str(hub_id)).is_dir() else str(hub_id).replace('/', '_')}-{split}",
        )
    return DatasetDict(out)
