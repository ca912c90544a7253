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
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from framework.registry import TASKS

from .schema import COLUMNS, FEATURES, cfg_get, choice_letters, encode_metadata, to_plain
from .validation import DataError, ValidationReport, validate_records

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
    cfg: Any, count_prompt_tokens: Callable[[dict], int] | None = None
) -> tuple[DatasetDict, dict[str, ValidationReport]]:
    """``load_data`` then ``validate_records`` on every split with the generic data options
    (``max_prompt_tokens``, ``on_invalid``)."""
    dsd = load_data(cfg)
    reports = {}
    out = {}
    for split, ds in dsd.items():
        out[split], reports[split] = validate_records(
            ds,
            count_prompt_tokens=count_prompt_tokens,
            max_prompt_tokens=int(cfg_get(cfg, "max_prompt_tokens", 512)),
            on_invalid=str(cfg_get(cfg, "on_invalid", "skip")),
            split=split,
        )
    return DatasetDict(out), reports


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
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.I)
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def _image_value(value: Any, base_dir: Path | None) -> dict | None:
    """One image in any accepted form -> ``{"bytes", "path"}`` (None when missing)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            return None
        if data is None:
            return {"bytes": None, "path": _resolve_path(path, base_dir)}
        return {"bytes": bytes(data), "path": path}
    if isinstance(value, (bytes, bytearray, memoryview)):
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
        return {"bytes": None, "path": _resolve_path(s, base_dir)}
    try:  # PIL image or numpy array
        import PIL.Image

        if isinstance(value, PIL.Image.Image):
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return {"bytes": buf.getvalue(), "path": None}
    except ImportError:  # pragma: no cover
        pass
    raise DataError(f"cannot interpret an image given as {type(value).__name__}")


def _resolve_path(path: Any, base_dir: Path | None) -> str:
    p = Path(str(path)).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return str(p)


def _images(value: Any, base_dir: Path | None) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [_image_value(v, base_dir) for v in value]
    return [_image_value(value, base_dir)]


def _choices(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return []
        try:
            parsed = json.loads(s)
        except ValueError:
            parsed = None
        return [str(c) for c in parsed] if isinstance(parsed, list) else [value]
    if isinstance(value, Mapping):  # e.g. {"A": "...", "B": "..."}
        return [str(v) for _, v in sorted(value.items())]
    return [str(c) for c in value]


def _metadata(value: Any) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        try:
            out = json.loads(value)
            return out if isinstance(out, dict) else {"value": out}
        except ValueError:
            return {"value": value}
    return {"value": value}


def convert_row(
    row: Mapping[str, Any],
    columns: Mapping[str, str | None],
    *,
    index: int,
    base_dir: Path | None,
    default_task: str,
    id_prefix: str,
    metadata_columns: Iterable[str] = (),
) -> dict:
    """A source row -> a FEATURES row (images as ``{"bytes", "path"}`` dicts)."""

    def get(field):
        col = columns.get(field)
        return row.get(col) if col is not None else None

    question = get("question")
    answer = get("answer")
    if isinstance(answer, (list, tuple)) and len(answer) == 1:
        answer = answer[0]
    answer = "" if answer is None else str(answer)
    choices = _choices(get("choices"))
    meta = _metadata(get("metadata"))
    for c in metadata_columns:
        meta[c] = row.get(c)
    letters = choice_letters(len(choices))
    if choices and answer.strip() not in letters and answer.strip() in [c.strip() for c in choices]:
        meta.setdefault("answer_text", answer)
        answer = letters[[c.strip() for c in choices].index(answer.strip())]
    rid = get("id")
    try:
        difficulty = int(get("difficulty") or 0)
    except (TypeError, ValueError):
        difficulty = 0
    return {
        "id": f"{id_prefix}-{index}" if rid is None or rid == "" else str(rid),
        "images": _images(get("images"), base_dir),
        "question": "" if question is None else str(question),
        "answer": answer,
        "choices": choices,
        "task": str(get("task") or default_task),
        "difficulty": difficulty,
        "metadata": encode_metadata(json.loads(json.dumps(meta, default=str))),
    }


def _from_rows(rows: list[dict], source: str, **kw) -> Dataset:
    available = sorted({k for r in rows for k in r}) if rows else []
    columns = resolve_columns(available, kw.pop("field_map"), source)
    meta_cols = _check_metadata_columns(kw.pop("metadata_columns"), available, source)
    cols = {name: [] for name in FEATURES}
    for i, r in enumerate(rows):
        rec = convert_row(r, columns, index=i, metadata_columns=meta_cols, **kw)
        for name in FEATURES:
            cols[name].append(rec[name])
    return Dataset.from_dict(cols, features=FEATURES)


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
        recs = [convert_row(r, columns, index=i, metadata_columns=meta_cols, **kw) for r, i in zip(rows, indices)]
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
def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise DataError(f"{path}: line {ln} is not valid JSON: {e}") from e
        return rows
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, Mapping):
        for key in ("data", "records", "rows", "examples"):
            if isinstance(data.get(key), list):
                return data[key]
        raise DataError(f'{path}: expected a JSON list of records (or {{"data": [...]}})')
    return data


def _load_file(path: Path, split: str, cfg: Any) -> Dataset:
    kw = dict(
        field_map=cfg_get(cfg, "field_map", {}),
        metadata_columns=cfg_get(cfg, "metadata_columns", []),
        base_dir=path.parent,
        default_task=str(cfg_get(cfg, "task_name", "local")),
        id_prefix=f"{path.stem}-{split}",
    )
    if not path.is_file():
        raise DataError(f"data file for split '{split}' not found: {path}")
    if path.suffix == ".parquet":
        ds = Dataset.from_parquet(str(path), keep_in_memory=True)
        return _from_dataset(ds, f"{path}", **kw)
    if path.suffix in (".jsonl", ".json"):
        return _from_rows(_read_rows(path), f"{path}", **kw)
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
    split_files = to_plain(cfg_get(cfg, "split_files", {})) or {}
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
        parts = [_load_file(f, split, cfg) for f in fs]
        out[split] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    holdout = cfg_get(cfg, "test_size")
    if "test" not in out and holdout:
        holdout = float(holdout)
        holdout = holdout if holdout < 1 else int(holdout)
        parts = out["train"].train_test_split(test_size=holdout, seed=int(cfg_get(cfg, "seed", 0)))
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
    splits = to_plain(cfg_get(cfg, "splits", {})) or {"train": "train", "test": "test"}
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
            field_map=cfg_get(cfg, "field_map", {}),
            metadata_columns=cfg_get(cfg, "metadata_columns", []),
            base_dir=None,
            default_task=str(cfg_get(cfg, "task_name", hub_id)),
            id_prefix=f"{Path(str(hub_id)).name if Path(str(hub_id)).is_dir() else str(hub_id).replace('/', '_')}-{split}",
        )
    return DatasetDict(out)
