"""Rendered resources and thumbnails (PS3.18 10.4.1.1.3, 10.4.1.1.4, 8.3.5).

Routes, relative to ``/dicomweb``:

* ``GET /studies/{study}/series/{series}/instances/{instance}/rendered`` and
  ``.../instances/{instance}/frames/{frames}/rendered``: one frame (the first of a
  multi-frame instance when no frame is named) as ``image/jpeg`` (the default),
  ``image/png`` or ``image/gif``, chosen from the ``Accept`` header or the ``accept`` query
  parameter (PS3.18 8.3.3.1); anything else is 406.
* ``GET /studies/{study}/thumbnail``, ``.../series/{series}/thumbnail`` and
  ``.../instances/{instance}/thumbnail``: a small image (fitted into 128 x 128 unless a
  ``viewport`` is given, never enlarged) of a representative instance: the middle instance of
  the series, or of the first series of the study that holds an image.
* ``GET /studies/{study}/rendered`` and ``.../series/{series}/rendered`` answer 406: a
  rendered study or series would be a multipart of images, which Stockade does not produce.

Query parameters (PS3.18 8.3.5.1): ``window=center,width[,function]`` (``linear``, the
default, ``linear-exact`` or ``sigmoid``, PS3.3 C.11.2.1.2), ``viewport=vw,vh[,sx,sy,sw,sh]``
(the source region ``sx,sy,sw,sh`` is cropped first, a negative ``sw`` or ``sh`` flips it;
then the image is scaled to fit ``vw x vh`` keeping its aspect ratio; at most
:data:`MAX_VIEWPORT` on a side), ``quality=1..100`` (JPEG only; default
:data:`DEFAULT_QUALITY`), ``annotation=patient,technique`` (accepted and ignored: no text is
burned in), ``charset`` (ignored), ``accept``. Unknown or repeated parameters are 400.

The pipeline (:func:`render_part10`): the decoded size (``max_decoded_size``) and
:data:`MAX_RENDER_PIXELS` per frame are checked from the header (:func:`check_size`); then
the rest runs in a decoder process with memory and time limits
(:mod:`stockade.dicom.sandbox`, threat model SR-13): the stored file is decoded to native
pixel data by :func:`stockade.dicom.transcode.transcode` (which checks the decoded size and
every codestream header again before a codec runs) and the bounds once more before pydicom
builds the frame's array. Grey images then go through the Modality LUT (Rescale
Slope and Intercept or a Modality LUT Sequence, PS3.3 C.11.1), the VOI window (the
request's, else the first Window Center and Width of the file with its VOI LUT Function,
else the frame's minimum and maximum) and, for ``MONOCHROME1``, an inversion. Colour images
(``RGB``, ``YBR_FULL``, ``YBR_FULL_422`` converted to RGB, ``PALETTE COLOR`` through its
lookup tables) are rendered as 8-bit RGB; ``window`` does not apply to them. Pillow encodes
the result. An object without Pixel Data (a structured report, say) is 406.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, convert_color_space
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from stockade.dicom import transcode
from stockade.dicom.attributes import Level
from stockade.dicom.part10 import file_header, read_part10
from stockade.dicom.tables import EXPLICIT_VR_LITTLE_ENDIAN
from stockade.errors import (
    CannotTranscode,
    DecodeFailure,
    InvalidQuery,
    NotFound,
    StockadeError,
)
from stockade.web.app import actor_of, archive_of, path_uids, scope_of

if TYPE_CHECKING:
    from stockade.retrieve import Retrieval, StoredInstance

__all__ = [
    "MAX_VIEWPORT",
    "ROUTES",
    "RenderOptions",
    "Viewport",
    "Window",
    "render_part10",
]

JPEG = "image/jpeg"
PNG = "image/png"
GIF = "image/gif"
#: Media types a rendered resource can be sent in, the default first (PS3.18 8.7.4).
MEDIA_TYPES = (JPEG, PNG, GIF)
_PILLOW_FORMAT = {JPEG: "JPEG", PNG: "PNG", GIF: "GIF"}
#: Largest output width and height (a bound on what one request makes the server allocate).
MAX_VIEWPORT = 4096
#: Largest frame, in pixels, that is rendered (a 5792 x 5792 image; larger ones are 406).
MAX_RENDER_PIXELS = 1 << 25
DEFAULT_QUALITY = 90
#: The default size of a thumbnail (PS3.18 10.4.1.1.4 leaves it to the server).
THUMBNAIL_SIZE = 128
#: Series of a study tried in turn for a study thumbnail before giving up.
THUMBNAIL_SERIES_TRIED = 8
#: Largest frame number accepted in a URL (Number of Frames is an IS, at most 2^31 - 1).
MAX_FRAME = 2**31 - 1
_PIXEL_DATA = 0x7FE00010
_DECIMAL = re.compile(r"[+-]?(?:\d{1,15}(?:\.\d{0,15})?|\.\d{1,15})(?:[eE][+-]?\d{1,3})?")
_INTEGER = re.compile(r"[+-]?\d{1,10}")
_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}
_ANNOTATIONS = frozenset({"patient", "technique"})

FloatArray = npt.NDArray[np.float64]
ByteArray = npt.NDArray[np.uint8]


# -- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center, width and the VOI LUT Function."""

    center: float
    width: float
    function: str = "LINEAR"  # LINEAR, LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.3)


@dataclass(frozen=True)
class Viewport:
    """Output size and source region (PS3.18 8.3.5.1.3).

    ``width`` and ``height`` bound the output; either may be ``None`` (WADO-URI ``rows`` or
    ``columns`` alone), then the other one alone sets the scale. ``region`` is
    ``(sx, sy, sw, sh)`` in pixels, or fractions ``(x1, y1, x2, y2)`` of the image when
    ``relative`` (WADO-URI ``region``, PS3.18 9). ``enlarge`` allows scaling up.
    """

    width: int | None
    height: int | None
    region: tuple[float, float, float, float] | None = None
    relative: bool = False
    enlarge: bool = True


@dataclass(frozen=True)
class RenderOptions:
    """What to render: the frame (1-based), window, viewport, media type and JPEG quality."""

    media_type: str = JPEG
    frame: int = 1
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = DEFAULT_QUALITY


def decimal(text: str, name: str) -> float:
    """A finite decimal number of a query parameter.

    Raises
    ------
    InvalidQuery
        Not a decimal number, or not finite.
    """
    text = text.strip()
    if not _DECIMAL.fullmatch(text):
        raise InvalidQuery(f"{name} must be a decimal number, not {text[:32]!r}")
    value = float(text)
    if not math.isfinite(value):
        raise InvalidQuery(f"{name} is out of range")
    return value


def integer(text: str, name: str, low: int, high: int) -> int:
    """A whole number of a query parameter between *low* and *high*.

    Raises
    ------
    InvalidQuery
        Not a whole number or out of range.
    """
    text = text.strip()
    if not _INTEGER.fullmatch(text) or not low <= int(text) <= high:
        raise InvalidQuery(f"{name} must be a whole number from {low} to {high}")
    return int(text)


def make_window(center: float, width: float, function: str = "LINEAR") -> Window:
    """A :class:`Window`, its width checked against PS3.3 C.11.2.1.2.

    Raises
    ------
    InvalidQuery
        Width below 1 (``LINEAR``) or not above 0 (``LINEAR_EXACT``, ``SIGMOID``).
    """
    if function == "LINEAR" and width < 1:
        raise InvalidQuery("the window width must be 1 or more for the linear function")
    if width <= 0:
        raise InvalidQuery("the window width must be more than 0")
    return Window(center, width, function)


def parse_window(text: str) -> Window:
    """The ``window`` parameter: ``center,width[,function]`` (PS3.18 8.3.5.1.4).

    Raises
    ------
    InvalidQuery
        Not two or three values, a bad number or an unknown function.
    """
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise InvalidQuery("window must be center,width,function")
    function = parts[2].strip().lower() if len(parts) == 3 else "linear"
    if function not in _FUNCTIONS:
        raise InvalidQuery("the window function must be linear, linear-exact or sigmoid")
    center = decimal(parts[0], "the window center")
    width = decimal(parts[1], "the window width")
    return make_window(center, width, _FUNCTIONS[function])


def parse_viewport(text: str, *, enlarge: bool = True) -> Viewport:
    """The ``viewport`` parameter: ``vw,vh[,sx,sy,sw,sh]`` (PS3.18 8.3.5.1.3).

    Raises
    ------
    InvalidQuery
        Not two or six values, a size outside 1 to :data:`MAX_VIEWPORT`, a negative origin
        or an empty source region.
    """
    parts = text.split(",")
    if len(parts) not in (2, 6):
        raise InvalidQuery("viewport must be vw,vh or vw,vh,sx,sy,sw,sh")
    width = integer(parts[0], "the viewport width", 1, MAX_VIEWPORT)
    height = integer(parts[1], "the viewport height", 1, MAX_VIEWPORT)
    region = None
    if len(parts) == 6:
        sx = integer(parts[2], "sx", 0, 65535)
        sy = integer(parts[3], "sy", 0, 65535)
        sw = integer(parts[4], "sw", -65535, 65535)
        sh = integer(parts[5], "sh", -65535, 65535)
        if sw == 0 or sh == 0:
            raise InvalidQuery("the viewport source region is empty")
        region = (float(sx), float(sy), float(sw), float(sh))
    return Viewport(width, height, region, enlarge=enlarge)


def choose_media_type(accept: str | None, offered: Sequence[str] = MEDIA_TYPES) -> str:
    """The media type to send, from an ``Accept`` value (PS3.18 8.7.4, RFC 9110 12.5.1).

    The first of *offered* is the default (no or an empty header, ``*/*``, ``image/*``).
    Ties in quality go to the order of the header.

    Raises
    ------
    CannotTranscode
        None of *offered* is acceptable (406).
    """
    if accept is None or not accept.strip():
        return offered[0]
    ranked: list[tuple[float, int, str]] = []
    for position, item in enumerate(accept.split(",")[:32]):
        fields = [f.strip() for f in item.split(";")]
        media = fields[0].lower()
        quality = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
        if quality <= 0 or not math.isfinite(quality):
            continue
        if media in ("*/*", "image/*"):
            ranked.append((quality, position, offered[0]))
        elif media in offered:
            ranked.append((quality, position, media))
    if not ranked:
        raise CannotTranscode(
            f"rendered images are sent as {', '.join(offered)}; none of them is acceptable"
        )
    ranked.sort(key=lambda r: (-r[0], r[1]))
    return ranked[0][2]


def single(params: Mapping[str, list[str]], name: str) -> str | None:
    """The one value of parameter *name*, if present.

    Raises
    ------
    InvalidQuery
        Given more than once.
    """
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidQuery(f"{name} is given more than once")
    return values[0]


def check_annotation(text: str | None) -> None:
    """Accept ``annotation=patient,technique`` (PS3.18 8.3.5.1.1); nothing is burned in.

    Raises
    ------
    InvalidQuery
        An unknown annotation.
    """
    if text is None:
        return
    for item in text.split(","):
        if item.strip().lower() not in _ANNOTATIONS:
            raise InvalidQuery("annotation must be patient, technique or both")


def _params(request: Request, allowed: frozenset[str]) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise InvalidQuery(f"unknown query parameter {name[:64]!r}")
        params.setdefault(name, []).append(value)
    if sum(len(v) for v in params.values()) > 16:
        raise InvalidQuery("too many query parameters")
    return params


_RENDERED_PARAMS = frozenset({"window", "viewport", "quality", "annotation", "charset", "accept"})
_THUMBNAIL_PARAMS = frozenset({"viewport", "charset", "accept"})


def rendered_options(request: Request, frame: int, *, parts: bool = False) -> RenderOptions:
    """The :class:`RenderOptions` of a rendered request (PS3.18 8.3.5.1); with *parts*, the
    media type of the parts of a multipart answer (a rendered study or series).

    Raises
    ------
    InvalidQuery
        An unknown, repeated or invalid parameter.
    CannotTranscode
        No acceptable media type.
    """
    params = _params(request, _RENDERED_PARAMS)
    accept = single(params, "accept") or request.headers.get("accept")
    media = choose_media_type(_part_accept(accept) if parts else accept)
    window = single(params, "window")
    viewport = single(params, "viewport")
    quality = single(params, "quality")
    check_annotation(single(params, "annotation"))
    return RenderOptions(
        media_type=media,
        frame=frame,
        window=parse_window(window) if window is not None else None,
        viewport=parse_viewport(viewport) if viewport is not None else None,
        quality=integer(quality, "quality", 1, 100) if quality is not None else DEFAULT_QUALITY,
    )


def thumbnail_options(request: Request) -> RenderOptions:
    """The :class:`RenderOptions` of a thumbnail request (PS3.18 10.4.1.1.4).

    Raises
    ------
    InvalidQuery
        An unknown, repeated or invalid parameter.
    CannotTranscode
        No acceptable media type.
    """
    params = _params(request, _THUMBNAIL_PARAMS)
    media = choose_media_type(single(params, "accept") or request.headers.get("accept"))
    viewport = single(params, "viewport")
    if viewport is None:
        fit = Viewport(THUMBNAIL_SIZE, THUMBNAIL_SIZE, enlarge=False)
    else:
        fit = parse_viewport(viewport, enlarge=False)
    return RenderOptions(media_type=media, viewport=fit)


def parse_frame(text: str) -> int:
    """The one frame number of a ``frames/{frames}`` path segment (PS3.18 8.3.3.2).

    Raises
    ------
    InvalidQuery
        Not a positive whole number.
    CannotTranscode
        More than one frame: a single image cannot hold them (406).
    """
    parts = text.split(",")
    if len(parts) > 1:
        raise CannotTranscode("a rendered image holds one frame; ask for the frames one at a time")
    return integer(parts[0], "the frame number", 1, MAX_FRAME)


# -- the pipeline ----------------------------------------------------------------------------


def _header_int(ds: Dataset, keyword: str, default: int | None) -> int:
    try:
        value = ds.get(keyword)
        number = default if value is None or value == "" else int(value)
    except (TypeError, ValueError) as exc:
        raise CannotTranscode(f"{keyword} is not a number; the image cannot be rendered") from exc
    if number is None or number <= 0:
        raise CannotTranscode(f"{keyword} is missing or not positive; it cannot be rendered")
    return number


def _check_size(ds: Dataset, max_pixel_bytes: int) -> int:
    """Refuse what would decode to more than the bounds (SR-13); return Number of Frames."""
    rows = _header_int(ds, "Rows", None)
    columns = _header_int(ds, "Columns", None)
    samples = _header_int(ds, "SamplesPerPixel", 1)
    bits = _header_int(ds, "BitsAllocated", None)
    frames = _header_int(ds, "NumberOfFrames", 1)
    size = rows * columns * samples * math.ceil(bits / 8) * frames
    if size > max_pixel_bytes:
        raise CannotTranscode(
            f"the decoded pixel data would take {size} bytes, over the limit of "
            f"{max_pixel_bytes} bytes"
        )
    if rows * columns > MAX_RENDER_PIXELS:
        raise CannotTranscode(
            f"a {columns} x {rows} frame is larger than the {MAX_RENDER_PIXELS} pixels rendered"
        )
    return frames


def check_size(part10: bytes, max_pixel_bytes: int) -> None:
    """Refuse, from the header alone, an image over the bounds of :func:`render_dataset`.

    Run by the server before a frame is handed to a decoder process (threat model SR-13:
    the size is checked before any decode); an object without Rows is left to the renderer,
    which says why it cannot be rendered.

    Raises
    ------
    CannotTranscode
        The header does not parse, or the image is over ``max_decoded_size`` or
        :data:`MAX_RENDER_PIXELS`.
    """
    try:
        ds = dcmread(BytesIO(part10), stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many kinds; re-raised as CannotTranscode
        raise CannotTranscode(f"the stored object could not be parsed: {exc}") from exc
    if "Rows" in ds:
        _check_size(ds, max_pixel_bytes)


def _native(part10: bytes, max_pixel_bytes: int) -> Dataset:
    """The stored object parsed with native pixel data (decoded by transcode, SR-13)."""
    info = read_part10(part10)
    if info.transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN:
        data = part10
    else:
        body = transcode.transcode(
            part10, EXPLICIT_VR_LITTLE_ENDIAN, max_pixel_bytes=max_pixel_bytes
        )
        meta = file_header(
            info.media_sop_class_uid or "1.2",
            info.media_sop_instance_uid or "1.2",
            EXPLICIT_VR_LITTLE_ENDIAN,
            None,
        )
        data = meta + body
    try:
        return dcmread(BytesIO(data))
    except Exception as exc:  # pydicom raises many kinds; re-raised as CannotTranscode
        raise CannotTranscode(f"the stored object could not be parsed: {exc}") from exc


def _first(value: Any) -> Any:
    """The first value of a multi-valued attribute (Window Center may hold several)."""
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0] if len(value) else None
    return value


def file_window(ds: Dataset) -> Window | None:
    """The first window of the file (PS3.3 C.11.2), if it has a usable one."""
    try:
        center = _first(ds.get("WindowCenter"))
        width = _first(ds.get("WindowWidth"))
        if center is None or width is None:
            return None
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        if function not in _FUNCTIONS.values():
            function = "LINEAR"
        c, w = float(center), float(width)
        if not (math.isfinite(c) and math.isfinite(w)):
            return None
        return make_window(c, w, function)
    except (TypeError, ValueError, InvalidQuery):
        return None


def apply_window(values: FloatArray, window: Window) -> FloatArray:
    """Map values through a VOI window onto 0..255 (PS3.3 C.11.2.1.2.1, .2, C.11.2.1.3.1)."""
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        with np.errstate(over="ignore"):
            return 255.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if window.function == "LINEAR_EXACT":
        return np.clip(((values - c) / w + 0.5) * 255.0, 0.0, 255.0)
    if w <= 1:  # a threshold at c - 0.5
        return np.where(values <= c - 0.5, 0.0, 255.0)
    return np.clip(((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0, 0.0, 255.0)


def _grey(frame: npt.NDArray[Any], ds: Dataset, window: Window | None) -> ByteArray:
    values = np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)
    chosen = window or file_window(ds)
    if chosen is not None:
        out = apply_window(values, chosen)
    else:
        low, high = float(values.min()), float(values.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        out = (values - low) * scale
    grey = np.rint(out).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _to_8bit(array: npt.NDArray[Any], bits: int) -> ByteArray:
    if array.dtype == np.uint8 and bits <= 8:
        return array.astype(np.uint8, copy=False)
    top = float(2 ** max(1, min(bits, 32)) - 1)
    scaled = np.clip(array.astype(np.float64) * (255.0 / top), 0.0, 255.0)
    return np.rint(scaled).astype(np.uint8)


def _colour(frame: npt.NDArray[Any], ds: Dataset, photometric: str) -> ByteArray:
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)
        descriptor = ds.get("RedPaletteColorLookupTableDescriptor") or [0, 0, 16]
        bits = int(descriptor[2]) if int(descriptor[2]) in (8, 16) else 16
        return _to_8bit(np.asarray(rgb), bits)
    bits = _header_int(ds, "BitsStored", 8)
    if photometric in ("YBR_FULL", "YBR_FULL_422") and frame.dtype == np.uint8:
        frame = convert_color_space(frame, photometric, "RGB")
    elif photometric not in ("RGB", "YBR_ICT", "YBR_RCT"):
        raise CannotTranscode(f"Photometric Interpretation {photometric} cannot be rendered")
    return _to_8bit(frame, bits)


def _region(image: Image.Image, viewport: Viewport) -> Image.Image:
    """Crop (and flip) the source region of *viewport* (PS3.18 8.3.5.1.3)."""
    if viewport.region is None:
        return image
    w, h = image.size
    if viewport.relative:
        x1, y1, x2, y2 = viewport.region
        box = (round(x1 * w), round(y1 * h), round(x2 * w), round(y2 * h))
        flip_x = flip_y = False
    else:
        sx, sy, sw, sh = (int(v) for v in viewport.region)
        flip_x, flip_y = sw < 0, sh < 0
        box = (min(sx, sx + sw), min(sy, sy + sh), max(sx, sx + sw), max(sy, sy + sh))
    left, top = max(0, box[0]), max(0, box[1])
    right, bottom = min(w, box[2]), min(h, box[3])
    if right <= left or bottom <= top:
        raise InvalidQuery(f"the source region lies outside the {w} x {h} image")
    image = image.crop((left, top, right, bottom))
    if flip_x:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip_y:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def fitted_size(size: tuple[int, int], viewport: Viewport) -> tuple[int, int]:
    """The output size: *size* scaled to fit the viewport, aspect ratio kept."""
    w, h = size
    scales = []
    if viewport.width is not None:
        scales.append(viewport.width / w)
    if viewport.height is not None:
        scales.append(viewport.height / h)
    if not scales:
        return size
    scale = min(scales)
    if not viewport.enlarge:
        scale = min(scale, 1.0)
    out_w = max(1, min(MAX_VIEWPORT, round(w * scale)))
    out_h = max(1, min(MAX_VIEWPORT, round(h * scale)))
    return out_w, out_h


def _encode(image: Image.Image, options: RenderOptions) -> bytes:
    out = BytesIO()
    if options.media_type == JPEG:
        image.save(out, "JPEG", quality=options.quality)
    else:
        image.save(out, _PILLOW_FORMAT[options.media_type])
    return out.getvalue()


def render_dataset(ds: Dataset, options: RenderOptions, *, max_pixel_bytes: int) -> bytes:
    """Render one frame of a data set with native pixel data (see the module docstring).

    Raises
    ------
    CannotTranscode
        No Pixel Data, over the size bounds (checked before decoding), an image that
        cannot be rendered.
    NotFound
        The frame does not exist.
    InvalidQuery
        The source region lies outside the image.
    """
    if _PIXEL_DATA not in ds:
        raise CannotTranscode("the instance holds no Pixel Data: it cannot be rendered")
    frames = _check_size(ds, max_pixel_bytes)
    if options.frame > frames:
        raise NotFound(f"frame {options.frame} does not exist: the instance has {frames}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    try:
        decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
        kwargs: dict[str, Any] = {"as_rgb": False}  # pydicom types **kwargs wrongly
        frame, _ = decoder.as_array(ds, index=options.frame - 1, **kwargs)
        samples = _header_int(ds, "SamplesPerPixel", 1)
        if samples == 1 and photometric != "PALETTE COLOR":
            pixels = _grey(frame, ds, options.window)
            image = Image.fromarray(pixels, mode="L")
        elif samples == 3 or photometric == "PALETTE COLOR":
            image = Image.fromarray(_colour(frame, ds, photometric), mode="RGB")
        else:
            raise CannotTranscode(f"{samples} samples per pixel cannot be rendered")
    except StockadeError:
        raise
    except Exception as exc:  # pydicom and numpy raise many kinds; re-raised
        raise CannotTranscode(f"the pixel data could not be rendered: {exc}") from exc
    if options.viewport is not None:
        image = _region(image, options.viewport)
        size = fitted_size(image.size, options.viewport)
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    return _encode(image, options)


def render_part10(part10: bytes, options: RenderOptions, *, max_pixel_bytes: int) -> bytes:
    """Render one frame of a stored Part 10 file as *options* ask (PS3.18 10.4.1.1.3).

    This runs the codecs in the calling process: the servers call it in a decoder process
    (:meth:`stockade.dicom.sandbox.DecodePool.render`, threat model SR-13).

    Parameters
    ----------
    part10 : bytes
        The stored file, already hash-verified (:meth:`Retrieval.read`).
    options : RenderOptions
        Frame, window, viewport, media type, quality.
    max_pixel_bytes : int
        ``max_decoded_size``: checked from the header before anything is decoded (SR-13).

    Returns
    -------
    bytes
        The encoded image.

    Raises
    ------
    CannotTranscode
        See :func:`render_dataset`; also no decoder, or a codestream larger than the header.
    NotFound
        The frame does not exist.
    """
    ds = _native(part10, max_pixel_bytes)
    return render_dataset(ds, options, max_pixel_bytes=max_pixel_bytes)


def render_instance(retrieval: Retrieval, inst: StoredInstance, options: RenderOptions) -> bytes:
    """Read (hash-verified), render and account for one instance of *retrieval*.

    The sub-operation is marked completed or failed; the caller finishes the retrieval.
    The size is checked from the header, then the frame is decoded and rendered by the
    archive's decoder (a decoder process, threat model SR-13).
    """
    try:
        data = retrieval.read(inst)
        image = retrieval.archive.decoder.render(
            data, options, max_pixel_bytes=retrieval.archive.settings.max_decoded_size
        )
    except StockadeError as exc:
        retrieval.done(inst, "failed", exc.reason)
        raise
    retrieval.done(inst, "completed")
    return image


# -- routes ----------------------------------------------------------------------------------


def _level(values: Mapping[str, str]) -> Level:
    if "SOPInstanceUID" in values:
        return Level.IMAGE
    if "SeriesInstanceUID" in values:
        return Level.SERIES
    return Level.STUDY


def _representatives(instances: Sequence[StoredInstance]) -> list[StoredInstance]:
    """The middle instance of each series, in series order (located order)."""
    by_series: dict[str, list[StoredInstance]] = {}
    for inst in instances:
        by_series.setdefault(inst.series_instance_uid, []).append(inst)
    return [group[len(group) // 2] for group in by_series.values()]


def render_located(
    request: Request,
    values: Mapping[str, str],
    options: RenderOptions,
    pick: Callable[[Sequence[StoredInstance]], list[StoredInstance]],
) -> Any:
    """Locate through the one retrieve path, render the first of *pick* that renders.

    Returns an awaitable of the :class:`Response`.
    """

    async def run() -> Response:
        archive = archive_of(request)
        retrieval = archive.retrieve(
            _level(values),
            dict(values),
            service="wado",
            actor=actor_of(request),
            scope=scope_of(request),
        )
        try:
            candidates = pick(retrieval.instances)
            if not candidates:
                raise NotFound("no such instance, series or study is stored")
            error: CannotTranscode | None = None
            for inst in candidates[:THUMBNAIL_SERIES_TRIED]:
                try:
                    body = await run_in_threadpool(render_instance, retrieval, inst, options)
                except DecodeFailure:
                    raise  # a crash or timeout: not worth trying the next candidate
                except CannotTranscode as exc:
                    error = exc
                    continue
                return Response(body, media_type=options.media_type)
            assert error is not None  # noqa: S101 - candidates is not empty
            raise error
        finally:
            retrieval.finish()

    return run()


async def rendered_instance(request: Request) -> Response:
    """``.../instances/{instance}/rendered`` and ``.../frames/{frames}/rendered``."""
    values = path_uids(request)
    frames = request.path_params.get("frames")
    options = rendered_options(request, parse_frame(frames) if frames is not None else 1)
    response: Response = await render_located(request, values, options, lambda found: [*found][:1])
    return response


def _part_accept(accept: str | None) -> str | None:
    """``multipart/related; type="image/png"`` ranges as ``image/png`` (the media type of
    the parts of a rendered study or series, PS3.18 8.7.4); other ranges as they are."""
    if accept is None:
        return None
    out = []
    for item in accept.split(",")[:32]:
        fields = [f.strip() for f in item.split(";")]
        if fields[0].lower() == "multipart/related":
            kind = next(
                (
                    f.partition("=")[2].strip().strip('"')
                    for f in fields[1:]
                    if f.partition("=")[0].strip().lower() == "type"
                ),
                "image/*",
            )
            rest = [f for f in fields[1:] if f.partition("=")[0].strip().lower() == "q"]
            out.append(";".join([kind, *rest]))
        else:
            out.append(item)
    return ",".join(out)


async def rendered_collection(request: Request) -> Response:
    """``/studies/{study}/rendered`` and ``.../series/{series}/rendered`` (PS3.18 10.4.1.1.3):
    every instance that renders, as ``multipart/related`` of rendered images (JPEG by
    default, PNG or GIF on request; ``window``, ``viewport``, ``quality`` apply to each),
    one part per instance (its first frame) with the instance's ``rendered`` URL as
    ``Content-Location``, streamed one instance at a time.

    Instances that cannot be rendered (no pixel data, too large) are left out and counted
    as failed in the audit record; when none renders the answer is 406.
    """
    from stockade.web.wado import RetrievalStream, _Multipart

    values = path_uids(request)
    options = rendered_options(request, 1, parts=True)
    archive = archive_of(request)
    retrieval = await run_in_threadpool(
        lambda: archive.retrieve(
            _level(values),
            dict(values),
            service="wado",
            actor=actor_of(request),
            scope=scope_of(request),
        )
    )
    base = str(request.url.path).rsplit("/rendered", 1)[0]
    instances = retrieval.instances

    async def render_next(start: int) -> tuple[int, bytes] | None:
        """The index and image of the first instance from *start* that renders."""
        for i in range(start, len(instances)):
            try:
                image = await run_in_threadpool(render_instance, retrieval, instances[i], options)
            except DecodeFailure:
                raise  # a crash or timeout of the decoder: the answer ends here
            except StockadeError:
                continue  # counted as failed by render_instance
            return i, image
        return None

    try:
        if not instances:
            raise NotFound("no such series or study is stored")
        first = await render_next(0)
        if first is None:
            raise CannotTranscode("no instance of this study or series can be rendered")
    except BaseException:
        retrieval.finish()
        raise
    multipart = _Multipart(options.media_type)

    def part(i: int, image: bytes) -> bytes:
        inst = instances[i]
        location = (
            f"{base}/series/{inst.series_instance_uid}/instances/{inst.sop_instance_uid}/rendered"
            if "/series/" not in base
            else f"{base}/instances/{inst.sop_instance_uid}/rendered"
        )
        return multipart.head(options.media_type, len(image), location) + image + b"\r\n"

    async def stream() -> AsyncIterator[bytes]:
        found: tuple[int, bytes] | None = first
        while found is not None:
            i, image = found
            yield part(i, image)
            found = await render_next(i + 1)
        yield multipart.end()

    return RetrievalStream(stream(), retrieval, multipart.content_type)


async def thumbnail(request: Request) -> Response:
    """The thumbnail of a study, series or instance (PS3.18 10.4.1.1.4)."""
    values = path_uids(request)
    options = thumbnail_options(request)
    response: Response = await render_located(request, values, options, _representatives)
    return response


_INSTANCE = "/studies/{study}/series/{series}/instances/{instance}"

ROUTES: list[BaseRoute] = [
    Route(f"{_INSTANCE}/rendered", rendered_instance, methods=["GET"]),
    Route(f"{_INSTANCE}/frames/{{frames}}/rendered", rendered_instance, methods=["GET"]),
    Route(f"{_INSTANCE}/thumbnail", thumbnail, methods=["GET"]),
    Route("/studies/{study}/series/{series}/thumbnail", thumbnail, methods=["GET"]),
    Route("/studies/{study}/thumbnail", thumbnail, methods=["GET"]),
    Route("/studies/{study}/series/{series}/rendered", rendered_collection, methods=["GET"]),
    Route("/studies/{study}/rendered", rendered_collection, methods=["GET"]),
]
