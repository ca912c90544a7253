"""Built-in image tools: ``crop`` and ``zoom`` on an image of the trajectory.

Both take ``image_index`` (into :attr:`ToolContext.images`: the prompt's images, then those
returned by earlier calls) and ``bbox = [x1, y1, x2, y2]`` (left, top, right, bottom), in
relative coordinates (fractions of the width and height, in [0, 1]) or in pixels
(``coordinates``: ``auto`` takes the box as relative when every value is <= 1). Pixel
coordinates are in the frame of the image as stored (``pixel_frame="image"``, the default) or,
for a model that grounds in the resolution its processor fed it (Qwen2.5-VL's absolute
coordinates), in the frame of the processor-resized image (``pixel_frame="processor"``).

The box is mapped to source pixels, rounded, checked (inside the image, each side at least
``min_box`` pixels, aspect ratio at most ``max_aspect``) and cut out. The result is resized to
a resolution the Qwen2-VL image processor accepts unchanged, computed by transformers'
``smart_resize`` (not rewritten here)::

    (h', w') = smart_resize(s * h, s * w, factor, min_pixels, max_pixels)

with ``s = 1`` for ``crop`` and ``s = scale`` (the call's zoom factor) for ``zoom``: both sides
multiples of ``factor`` (patch_size * merge_size = 28), ``min_pixels <= h' * w' <= max_pixels``,
aspect ratio kept as closely as the grid allows. ``smart_resize`` is idempotent on such sizes,
so the processor does not resample the returned image again. A crop whose size is already on the
grid and within the bounds is returned pixel for pixel.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from framework.registry import TOOLS

from .base import Tool, ToolArgumentError, ToolContext, ToolResult

# Qwen2.5-VL's processor defaults: 28 = patch_size 14 * merge_size 2; 56*56 .. 28*28*1280 pixels
DEFAULT_FACTOR = 28
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280

_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}  # PIL.Image.Resampling values


@functools.lru_cache(maxsize=1)
def _transformers_smart_resize():
    # imported on first use (transformers takes seconds to import): the image tools call this in
    # their constructor, so that the import is never timed as part of a call
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL ``smart_resize`` (the PIL image processor's copy, which needs no
    torchvision), imported here so that every caller uses one definition."""
    return _transformers_smart_resize()(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def resize_options(image_processor: Any) -> dict[str, int]:
    """``{factor, min_pixels, max_pixels}`` of a Qwen2-VL-style image processor, to build the
    image tools with the resolution the model's processor accepts (transformers 5 keeps the
    pixel bounds in ``size.shortest_edge`` / ``size.longest_edge``)."""
    size = getattr(image_processor, "size", None)

    def get(key: str, attr: str, default: int) -> int:
        v = getattr(image_processor, attr, None)
        if v is None and size is not None:
            v = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return int(v) if v is not None else default

    factor = int(getattr(image_processor, "patch_size", 14) * getattr(image_processor, "merge_size", 2))
    return {
        "factor": factor,
        "min_pixels": get("shortest_edge", "min_pixels", DEFAULT_MIN_PIXELS),
        "max_pixels": get("longest_edge", "max_pixels", DEFAULT_MAX_PIXELS),
    }


_BOX_PARAMETERS = {
    "image_index": {
        "type": "integer",
        "minimum": 0,
        "description": "Which image: 0 is the first image of the conversation; images returned by tools follow.",
    },
    "bbox": {
        "type": "array",
        "items": {"type": "number"},
        "minItems": 4,
        "maxItems": 4,
        "description": "[x1, y1, x2, y2]: left, top, right, bottom; fractions of the width and height in [0, 1], or pixels.",
    },
    "coordinates": {
        "type": "string",
        "enum": ["auto", "relative", "pixel"],
        "description": "How to read bbox; auto: relative when every value is at most 1.",
    },
}


class _BoxTool(Tool):
    """Shared by ``crop`` and ``zoom``: argument checks, box mapping, the cut and the resize."""

    def __init__(
        self,
        factor: int = DEFAULT_FACTOR,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_box: int = 4,
        max_aspect: float = 50.0,
        resample: str = "bicubic",
        pixel_frame: str = "image",
        max_scale: float = 4.0,
    ):
        if factor < 1 or min_pixels < 1 or max_pixels < min_pixels:
            raise ToolArgumentError(
                f"need factor >= 1 and 1 <= min_pixels <= max_pixels, got {factor}, {min_pixels}, {max_pixels}"
            )
        if max_pixels < factor * factor:
            raise ToolArgumentError(f"max_pixels={max_pixels} is below one grid cell ({factor}x{factor})")
        if not 1.0 <= max_aspect < 200.0:  # smart_resize refuses an aspect ratio of 200 or more
            raise ToolArgumentError(f"max_aspect must be in [1, 200), got {max_aspect}")
        if resample not in _RESAMPLE:
            raise ToolArgumentError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        if pixel_frame not in ("image", "processor"):
            raise ToolArgumentError(f"pixel_frame must be 'image' or 'processor', got {pixel_frame!r}")
        if min_box < 1 or max_scale < 1.0:
            raise ToolArgumentError(f"need min_box >= 1 and max_scale >= 1, got {min_box}, {max_scale}")
        self.factor, self.min_pixels, self.max_pixels = int(factor), int(min_pixels), int(max_pixels)
        self.min_box, self.max_aspect, self.max_scale = int(min_box), float(max_aspect), float(max_scale)
        self.resample, self.pixel_frame = resample, pixel_frame
        _transformers_smart_resize()  # import now, not inside the first (timed) call

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(h', w') on the processor's grid, within the pixel bounds (smart_resize)."""
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def pixel_box(self, arguments: dict, width: int, height: int) -> tuple[int, int, int, int]:
        """The call's box as integer source pixels (left, top, right, bottom), checked."""
        x1, y1, x2, y2 = (float(v) for v in arguments["bbox"])
        mode = arguments.get("coordinates", "auto")
        if mode == "auto":
            mode = "relative" if max(x1, y1, x2, y2) <= 1.0 else "pixel"
        if not (x1 < x2 and y1 < y2):
            raise ToolArgumentError(f"bbox {arguments['bbox']} must have x1 < x2 and y1 < y2")
        if mode == "relative":
            if min(x1, y1) < 0.0 or max(x2, y2) > 1.0:
                raise ToolArgumentError(f"relative bbox {arguments['bbox']} must lie in [0, 1]")
            sx, sy = float(width), float(height)
        else:
            fw, fh = float(width), float(height)
            if self.pixel_frame == "processor":  # the model's frame: the image as the processor resized it
                try:
                    fh, fw = (float(v) for v in self.target_size(height, width))
                except ValueError as e:  # smart_resize refuses an image with aspect ratio >= 200
                    raise ToolArgumentError(f"image {width}x{height} has no processor frame: {e}") from None
            if min(x1, y1) < 0.0 or x2 > fw or y2 > fh:
                raise ToolArgumentError(
                    f"pixel bbox {arguments['bbox']} lies outside the image ({int(fw)}x{int(fh)} pixels, width x height)"
                )
            sx, sy = width / fw, height / fh
        # round each edge, not the size: adjacent boxes then tile the image without gap or overlap
        left, top = round(x1 * sx), round(y1 * sy)
        right, bottom = min(width, round(x2 * sx)), min(height, round(y2 * sy))
        w, h = right - left, bottom - top
        if w < self.min_box or h < self.min_box:
            raise ToolArgumentError(
                f"bbox {arguments['bbox']} is {w}x{h} pixels of the image; each side must be at least {self.min_box}"
            )
        if max(w, h) / min(w, h) > self.max_aspect:
            raise ToolArgumentError(
                f"bbox {arguments['bbox']} is too elongated (aspect ratio above {self.max_aspect:g})"
            )
        return left, top, right, bottom

    def cut(self, arguments: dict, context: ToolContext, scale: float) -> ToolResult:
        images = context.images
        index = int(arguments.get("image_index", 0))
        if not images:
            raise ToolArgumentError("there is no image in this conversation")
        if index >= len(images):
            raise ToolArgumentError(
                f"image_index {index} is out of range: there are {len(images)} images (0..{len(images) - 1})"
            )
        image = images[index]
        width, height = image.size
        left, top, right, bottom = self.pixel_box(arguments, width, height)
        region = image.convert("RGB").crop((left, top, right, bottom))
        h, w = bottom - top, right - left
        th, tw = self.target_size(max(1, round(h * scale)), max(1, round(w * scale)))
        if (th, tw) != (h, w):
            region = region.resize((tw, th), resample=_RESAMPLE[self.resample])
        text = f"Region [{left}, {top}, {right}, {bottom}] of image {index} ({width}x{height}), shown at {tw}x{th}."
        return ToolResult(text=text, images=[region])


@TOOLS.register("crop")
class CropTool(_BoxTool):
    description = (
        "Crop a region of an image of the conversation and look at it at its own resolution. Returns the cropped image."
    )
    parameters = {
        "type": "object",
        "properties": dict(_BOX_PARAMETERS),
        "required": ["bbox"],
        "additionalProperties": False,
    }

    def run(self, arguments: dict, context: ToolContext) -> ToolResult:
        return self.cut(arguments, context, 1.0)


@TOOLS.register("zoom")
class ZoomTool(_BoxTool):
    description = (
        "Zoom into a region of an image of the conversation: the region is enlarged by `scale` "
        "(default 2) so that small details become visible. Returns the enlarged image."
    )
    parameters = {
        "type": "object",
        "properties": {
            **_BOX_PARAMETERS,
            "scale": {"type": "number", "minimum": 1, "description": "Enlargement factor (default 2)."},
        },
        "required": ["bbox"],
        "additionalProperties": False,
    }

    def run(self, arguments: dict, context: ToolContext) -> ToolResult:
        scale = float(arguments.get("scale", 2.0))
        if not math.isfinite(scale) or scale > self.max_scale:
            raise ToolArgumentError(f"scale must be in [1, {self.max_scale:g}], got {arguments.get('scale')}")
        return self.cut(arguments, context, scale)


__all__ = ["CropTool", "ZoomTool", "resize_options", "smart_resize"]
