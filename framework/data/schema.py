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

import copy
import errno
import io
import json
import os
import stat
import warnings
from collections.abc import Mapping
from typing import Any

import datasets
from datasets import Features, Image, List, Value

from framework.config import DataConfig
from framework.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_MAX_IMAGE_BYTES = DataConfig.max_image_bytes  # data.max_image_bytes: larger image files are refused unread
DEFAULT_MAX_IMAGE_PIXELS = DataConfig.max_image_pixels  # data.max_image_pixels: larger images are refused undecoded
DEFAULT_MAX_RECORD_BYTES = DataConfig.max_record_bytes  # data.max_record_bytes: longer records are refused unread
# reserved metadata key set by the loaders: where the record came from ({"file", "line"} or
# {"file", "row"}) and the problems found while reading it ({"problems": [...]}); validation
# reports them, :func:`to_record` drops the key
SOURCE_KEY = "_apo_source"

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


def read_image_file(path: str | os.PathLike, max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the image file at ``path``: a regular file (never a FIFO, a device such as
    ``/dev/zero``, a socket or a directory) of at most ``max_bytes`` bytes.

    The file is opened non-blocking (opening a FIFO does not wait for a writer) and checked on
    the open descriptor (no race between the check and the read); at most ``max_bytes + 1``
    bytes are read, so a file that grows while it is read cannot exhaust memory either. Raises
    ``FileNotFoundError`` (naming the path) or :class:`DataError`."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO/socket without a peer, a directory
            raise DataError(f"{path} is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path} is not a regular file ({_file_kind(st.st_mode)})")
        if max_bytes is not None and st.st_size > max_bytes:
            raise DataError(
                f"{path} has {st.st_size:,} bytes > data.max_image_bytes={max_bytes:,} (raise it to allow larger images)"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read(max_bytes + 1) if max_bytes is not None else f.read()
    finally:
        if fd >= 0:
            os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:
        raise DataError(f"{path} grew beyond data.max_image_bytes={max_bytes:,} bytes while it was read")
    return data


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def decode_image(
    value: Any,
    max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
):
    """A PIL image (RGB) from a decoded image, ``{"bytes", "path"}`` dict, bytes or path.

    A path is read with :func:`read_image_file` (regular files of at most ``max_bytes``
    only). An encoded image of more than ``max_pixels`` pixels (width x height, from its header)
    is refused before it is decoded; a truncated file is an error, never an image completed with
    black rows (PIL's ``LOAD_TRUNCATED_IMAGES`` is ignored, and a PNG whose image data ends early
    is caught: :func:`png_rows_missing`). Raises ``FileNotFoundError`` /
    ``PIL.UnidentifiedImageError`` / ``OSError`` on bad input and
    :class:`~framework.errors.DataError` (a ``ValueError``) when there is nothing to decode or the
    file is refused."""
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
            if max_bytes is not None and len(data) > max_bytes:
                raise DataError(f"image has {len(data):,} bytes > data.max_image_bytes={max_bytes:,}")
        elif path is not None:
            data = read_image_file(path, max_bytes)  # FileNotFoundError names the path
        else:
            raise DataError("image is missing (no path or bytes)")
        with warnings.catch_warnings():  # PIL's decompression-bomb warning: max_pixels is the limit here
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            im = PIL.Image.open(io.BytesIO(data))  # reads the header only
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise DataError(
                f"image has {w:,}x{h:,} = {w * h:,} pixels > data.max_image_pixels={max_pixels:,} "
                "(raise it to allow larger images)"
            )
        _load_whole(im, bytes(data))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def _load_whole(im, data: bytes) -> None:
    """Decode ``im`` (opened from ``data``); a truncated file raises ``OSError`` whatever
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` says (a plugin or a library may have set it)."""
    from PIL import ImageFile

    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        im.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
    if im.format == "PNG":
        missing = png_rows_missing(data)
        if missing:
            raise OSError(f"image file is truncated: {missing}")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_rows_missing(data: bytes) -> str | None:
    """What is missing when the image data (IDAT) of PNG ``data`` decompresses to fewer bytes
    than its header's size needs (``"its image data holds 32 of 64 rows"``), else None. PIL
    decodes such a file without a word and leaves the missing rows black. The data are
    decompressed in bounded pieces and only counted."""
    import struct
    import zlib

    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, header, got, need = len(_PNG_SIGNATURE), None, 0, 0
    z = zlib.decompressobj()
    try:
        while pos + 8 <= len(data):
            n = int.from_bytes(data[pos : pos + 4], "big")
            kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
            pos += 12 + n
            if kind == b"IHDR" and len(body) >= 13:
                w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body[:13])
                bits = depth * _PNG_CHANNELS.get(colour, 4)
                passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
                for x0, y0, dx, dy in passes:
                    pw, ph = (w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy
                    if pw and ph:
                        need += ph * (1 + (pw * bits + 7) // 8)
                header = (w, h, 1 + (w * bits + 7) // 8, interlace)
            elif kind == b"IDAT":
                while body and got <= need and not z.eof:
                    got += len(z.decompress(body, 1 << 20))
                    body = z.unconsumed_tail
            elif kind == b"IEND":
                break
        if not z.eof:
            got += len(z.flush())
    except zlib.error:
        return None  # damaged compressed data: PIL's own decoder reports it
    if header is None or got >= need:
        return None
    w, h, row, interlace = header
    if interlace:
        return f"its interlaced image data holds {got:,} of the {need:,} bytes of a {w}x{h} image"
    return f"its image data holds {got // row} of {h} rows"


def decode_metadata(value: Any) -> dict:
    """The metadata dict of a row, without the loaders' reserved :data:`SOURCE_KEY`."""
    meta, _ = split_metadata(value)
    return meta


def split_metadata(value: Any) -> tuple[dict, dict]:
    """``(metadata, source)``: the row's metadata dict and the loaders' :data:`SOURCE_KEY`
    entry (``{}`` when absent; ``{"file", "line"|"row", "problems"}``)."""
    if value is None or value == "":
        return {}, {}
    if isinstance(value, Mapping):
        out = dict(value)
    else:
        try:
            out = json.loads(value)
        except (TypeError, ValueError):
            return {"value": value}, {}
    if not isinstance(out, dict):
        return {"value": out}, {}
    source = out.pop(SOURCE_KEY, None)
    return out, (source if isinstance(source, dict) else {})


def encode_metadata(value: Any) -> str:
    if value is None or value == "":
        return "{}"
    if isinstance(value, str):
        json.loads(value)  # must already be JSON
        return value
    return json.dumps(value, sort_keys=True, default=str)


def to_record(row: Mapping[str, Any], max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> dict:
    """Normalise a dataset row (decoded or not) into the plain-dict record the framework uses."""
    images = row.get("images") or []
    return {
        "id": str(row.get("id", "")),
        "images": [decode_image(im, max_image_bytes) for im in images],
        "question": row.get("question") or "",
        "answer": "" if row.get("answer") is None else str(row.get("answer")),
        "choices": [str(c) for c in (row.get("choices") or [])],
        "task": row.get("task") or "",
        "difficulty": int(row.get("difficulty") or 0),
        "metadata": decode_metadata(row.get("metadata")),
    }


def empty_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict({k: [] for k in COLUMNS}, features=FEATURES)


def data_default(key: str) -> Any:
    """The default of ``data.<key>`` where it is written, the typed data section
    (framework/config.py ``DataConfig``); None for a key that is not one of its fields (a plugin
    task's own option). A fresh copy per call (lists and dicts)."""
    return copy.deepcopy(getattr(DataConfig(), key, None))


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` for a dict, an OmegaConf config or an attribute object. Unset or null: ``default``
    when one is given, else the key's own default (:func:`data_default`): a loader called with a
    partial config reads the same defaults as the run's typed data section."""
    if default is None:
        default = data_default(key)
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
