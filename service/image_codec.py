"""Images in and out of the REST API: nested integer arrays and base64 PNG strings.

An image is H lists of W integer grey levels in [0, levels), or a base64 PNG (optionally a data URL,
`data:image/png;base64,...`), one channel: mode "L" (8-bit grey) or "1" (1-bit). A PNG's 8-bit value v
is read as level round(v * (levels - 1) / 255); levels are written as v = round(l * 255 / (levels - 1)),
so a PNG written here reads back exactly. PNG needs levels <= 256.

Every check raises `ImageInputError` with an error type and a message that names the image (its index
in the request), and for arrays the row, column and value, and says what is allowed. A PNG's size is
checked from its header, before any pixel is decompressed.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from typing import Any

import numpy as np

DATA_URL_PREFIX = "data:image/png;base64,"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = ("L", "1")
MAX_PNG_LEVELS = 256


class ImageInputError(ValueError):
    """An image the model cannot take; `type` is the API error type, the message says what is allowed."""

    def __init__(self, type_: str, message: str):
        super().__init__(message)
        self.type, self.message = type_, message


def decode_image(value: Any, where: str, height: int, width: int, levels: int, known: int | None = None) -> np.ndarray:
    """One image from the API, an (H, W) int64 array of levels. `where` names it in errors (e.g.
    "images[3]"). With `known`, only the first `known` pixels in raster order are checked and kept
    (the rest are set to 0): an array may hold any integer or null there."""
    if isinstance(value, str):
        image = decode_png(value, where, height, width, levels)
        if known is not None:
            image.reshape(-1)[known:] = 0
        return image
    if isinstance(value, list):
        return decode_array(value, where, height, width, levels, known)
    raise ImageInputError("invalid_image", f"{where} is a {_json_type(value)}; an image is a list of {height} rows "
                          f"of {width} integer levels in [0, {levels - 1}], or a base64 PNG string")


def decode_array(value: list, where: str, height: int, width: int, levels: int,
                 known: int | None = None) -> np.ndarray:
    shape = f"{height} rows of {width} integers in [0, {levels - 1}]"
    if len(value) != height:
        raise ImageInputError("wrong_image_shape", f"{where} has {len(value)} rows; the model's images are "
                              f"{height}x{width} (height x width): {shape}")
    limit = height * width if known is None else known
    out = np.zeros((height, width), dtype=np.int64)
    for r, row in enumerate(value):
        if not isinstance(row, list):
            raise ImageInputError("wrong_image_shape", f"{where} row {r} is a {_json_type(row)}, not a list of "
                                  f"{width} integers; the model's images are {shape}")
        if len(row) != width:
            raise ImageInputError("wrong_image_shape", f"{where} row {r} has {len(row)} values; the model's images "
                                  f"are {height}x{width} (height x width): {shape}")
        checked = min(width, max(0, limit - r * width))  # pixels of this row within the known prefix
        head = row[:checked]
        # Fast path: a row of in-range ints (bool is an int subclass, but true/false are not levels).
        if all(type(v) is int for v in head) and (not head or (min(head) >= 0 and max(head) < levels)):
            out[r, :checked] = head
        else:
            for c, v in enumerate(head):
                _check_level(v, f"{where} row {r} column {c}", levels)
        for c in range(checked, width):
            v = row[c]
            if v is not None and type(v) is not int:
                raise ImageInputError("invalid_image", f"{where} row {r} column {c}: {_shown(v)} is not an integer; "
                                      "pixels after the known prefix are ignored but must be integers or null")
    return out


def _check_level(v: Any, where: str, levels: int) -> None:
    if type(v) is not int:
        raise ImageInputError("invalid_image", f"{where}: {_shown(v)} is not an integer; pixels are integer grey "
                              f"levels in [0, {levels - 1}]")
    if not 0 <= v < levels:
        raise ImageInputError("invalid_image", f"{where}: {v} is out of range; pixels are integer grey levels in "
                              f"[0, {levels - 1}] ({levels} levels)")


def decode_png(value: str, where: str, height: int, width: int, levels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if levels > MAX_PNG_LEVELS:
        raise ImageInputError("invalid_image", f"{where}: PNG images need a model of at most {MAX_PNG_LEVELS} "
                              f"levels; this model has {levels}: send a list of rows of integers")
    text = value.strip()
    if text[: len(DATA_URL_PREFIX)].lower() == DATA_URL_PREFIX:
        text = text[len(DATA_URL_PREFIX):]
    elif text.startswith("data:"):
        raise ImageInputError("invalid_image", f"{where}: data URLs must be {DATA_URL_PREFIX}...; got "
                              f"{text[:30]!r}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("invalid_image", f"{where} is a string but not valid base64; send a base64 PNG "
                              f"(optionally prefixed {DATA_URL_PREFIX}) or a list of {height} rows of {width} "
                              "integers") from None
    if not data.startswith(PNG_SIGNATURE):
        raise ImageInputError("invalid_image", f"{where} is not a PNG (no PNG signature); send a base64 PNG of "
                              f"mode L or 1, {width}x{height} pixels")
    if len(data) >= 24 and data[12:16] == b"IHDR":  # the first chunk: width and height, before anything else
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if (w, h) != (width, height):
            raise ImageInputError("wrong_image_shape", f"{where} is a {w}x{h} PNG (width x height); the model's "
                                  f"images are {width}x{height}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG"])  # reads the header only
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise ImageInputError("invalid_image", f"{where} is not a readable PNG ({e})") from None
    if image.mode not in PNG_MODES:
        raise ImageInputError("invalid_image", f"{where} is a PNG of mode {image.mode!r}; allowed: one channel, "
                              "'L' (8-bit grey) or '1' (1-bit)")
    if image.size != (width, height):
        w, h = image.size
        raise ImageInputError("wrong_image_shape", f"{where} is a {w}x{h} PNG (width x height); the model's images "
                              f"are {width}x{height}")
    try:
        pixels = np.asarray(image.convert("L"), dtype=np.int64)  # "1" converts to 0 / 255
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageInputError("invalid_image", f"{where}: the PNG's pixel data cannot be decoded ({e})") from None
    return levels_from_bytes(pixels, levels)


def levels_from_bytes(values: np.ndarray, levels: int) -> np.ndarray:
    """8-bit values 0..255 -> levels round(v * (levels - 1) / 255), halves rounded up."""
    return np.floor(values.astype(np.int64) * (levels - 1) / 255 + 0.5).astype(np.int64)


def bytes_from_levels(image: np.ndarray, levels: int) -> np.ndarray:
    """Levels -> 8-bit values round(l * 255 / (levels - 1)), halves rounded up."""
    return np.floor(np.asarray(image, dtype=np.int64) * 255 / (levels - 1) + 0.5).astype(np.uint8)


def encode_png(image: np.ndarray, levels: int) -> str:
    """An (H, W) image of levels as a base64 8-bit grey PNG (no data-URL prefix)."""
    from PIL import Image

    if levels > MAX_PNG_LEVELS:
        raise ValueError(f"PNG output needs at most {MAX_PNG_LEVELS} levels, the model has {levels}")
    buffer = io.BytesIO()
    Image.fromarray(bytes_from_levels(image, levels), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_to_levels(value: str, levels: int) -> np.ndarray:
    """A base64 PNG (as the API returns them) back to an (H, W) array of levels, any size."""
    from PIL import Image

    text = value[len(DATA_URL_PREFIX):] if value.startswith(DATA_URL_PREFIX) else value
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return levels_from_bytes(np.asarray(image.convert("L")), levels)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, dict):
        return "object"
    return "list" if isinstance(v, list) else type(v).__name__


def _shown(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    text = repr(v)
    return text if len(text) <= 40 else text[:40] + "..."
