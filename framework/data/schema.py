"""The one record schema shared by every data source.

On disk / in Arrow a record is a row of :data:`FEATURES`. The rest of the framework sees
plain dicts produced by :func:`to_record`::

    {"id": str, "images": [PIL.Image, ...], "question": str, "answer": str,
     "choices": [str, ...], "task": str, "difficulty": int, "metadata": dict}

``question`` may contain ``<image>`` placeholders, one per image, marking where each image
goes; with none, all images are placed before the text. ``choices`` is empty unless the
question is multiple choice, in which case ``answer`` is the letter ("A", "B", ...) of the
right option.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import Any

import datasets
from datasets import Features, Image, List, Value

from framework.errors import DataError

IMAGE_PLACEHOLDER = "<image>"

FEATURES = Features(
    {
        "id": Value("string"),
        "images": List(Image()),
        "question": Value("string"),
        "answer": Value("string"),
        "choices": List(Value("string")),
        "task": Value("string"),
        "difficulty": Value("int32"),
        "metadata": Value("string"),  # JSON-encoded dict
    }
)

COLUMNS = list(FEATURES)


def choice_letters(n: int) -> list[str]:
    """``["A", "B", ...]`` for ``n`` options."""
    return [chr(ord("A") + i) for i in range(n)]


def decode_image(value: Any):
    """A PIL image (RGB) from a decoded image, ``{"bytes", "path"}`` dict, bytes or path.

    Raises ``FileNotFoundError`` / ``PIL.UnidentifiedImageError`` / ``OSError`` on bad input
    and :class:`~framework.errors.DataError` (a ``ValueError``) when there is nothing to decode.
    """
    import PIL.Image

    if isinstance(value, PIL.Image.Image):
        im = value
    else:
        if isinstance(value, Mapping):
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray)):
            data, path = value, None
        elif isinstance(value, (str, os.PathLike)):
            data, path = None, value
        elif value is None:
            raise DataError("image is missing (no path or bytes)")
        else:
            raise DataError(f"cannot decode an image from {type(value).__name__}")
        if data is not None:
            im = PIL.Image.open(io.BytesIO(data))
        elif path is not None:
            with open(path, "rb") as f:  # FileNotFoundError names the path
                im = PIL.Image.open(io.BytesIO(f.read()))
        else:
            raise DataError("image is missing (no path or bytes)")
        im.load()
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def decode_metadata(value: Any) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    out = json.loads(value)
    return out if isinstance(out, dict) else {"value": out}


def encode_metadata(value: Any) -> str:
    if value is None or value == "":
        return "{}"
    if isinstance(value, str):
        json.loads(value)  # must already be JSON
        return value
    return json.dumps(value, sort_keys=True, default=str)


def to_record(row: Mapping[str, Any]) -> dict:
    """Normalise a dataset row (decoded or not) into the plain-dict record the framework uses."""
    images = row.get("images") or []
    return {
        "id": str(row.get("id", "")),
        "images": [decode_image(im) for im in images],
        "question": row.get("question") or "",
        "answer": "" if row.get("answer") is None else str(row.get("answer")),
        "choices": [str(c) for c in (row.get("choices") or [])],
        "task": row.get("task") or "",
        "difficulty": int(row.get("difficulty") or 0),
        "metadata": decode_metadata(row.get("metadata")),
    }


def empty_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict({k: [] for k in COLUMNS}, features=FEATURES)


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` for a dict, an OmegaConf config or an attribute object; ``default`` if unset."""
    if cfg is None:
        return default
    try:
        val = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key)
    except (AttributeError, KeyError):
        return default
    except Exception as e:  # OmegaConf's MissingMandatoryValue for "???"
        if type(e).__name__ == "MissingMandatoryValue":
            return default
        raise
    return default if val is None else val


def to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain dict/list (anything else unchanged)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value
