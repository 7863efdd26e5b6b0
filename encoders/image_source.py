"""Read an item's image reference into a decoded picture, within time, size and pixel limits.

An :class:`~ppm.events.ItemEvent` carries ``image`` as a reference, not pixels. This module
turns that reference into a fully decoded ``PIL.Image.Image`` or raises
:class:`ImageLoadError` with a reason in words, so the caller can record it and go on.

Supported references:

* a local path (``/data/img/1.png`` or relative to the working directory);
* a ``file://`` URL (host empty or ``localhost``);
* an ``http://`` or ``https://`` URL, fetched with ``urllib``;
* an inline ``data:image/<type>;base64,<data>`` URL.

A reference whose text before the first ``:`` looks like a URL scheme is read as a URL, so
spell a local path that contains ``:`` as a ``file://`` URL.

The module has no global state: it never changes Pillow's ``MAX_IMAGE_PIXELS`` or
``LOAD_TRUNCATED_IMAGES``; it checks ``ImageFetchConfig.max_pixels`` itself from the image
header, before any pixel is decoded. Safe to call from several threads at once.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ppm.config import ImageFetchConfig

_CHUNK_BYTES = 64 * 1024


class ImageLoadError(ValueError):
    """An image reference could not be turned into a picture; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_image(ref: str, config: ImageFetchConfig) -> Image.Image:
    """Read, check and fully decode the image that ``ref`` points to.

    Returns the image in its own mode (``L``, ``RGB``, ``RGBA``, ``P`` ...), first frame only;
    colour conversion is the encoder's job. Raises :class:`ImageLoadError` for a missing or
    unreadable file, more than ``config.max_bytes`` bytes, a timeout or connection error, an
    HTTP error status, bytes that are not a decodable image, more than ``config.max_pixels``
    pixels, or an unknown scheme. An HTTP fetch waits at most ``config.timeout_s`` for any one
    socket operation and stops reading once the whole download has taken longer than that.
    """
    return _decode(_read_bytes(ref, config), config)


def _read_bytes(ref: str, config: ImageFetchConfig) -> bytes:
    try:
        scheme = urllib.parse.urlsplit(ref).scheme.lower()
    except ValueError as exc:  # e.g. an unbalanced '[' in the host
        raise ImageLoadError(f"malformed image reference: {exc}") from None
    if scheme == "data":
        return _read_data_url(ref, config.max_bytes)
    if scheme in ("http", "https"):
        return _read_http(ref, config)
    if scheme == "file":
        return _read_file(_file_url_path(ref), config.max_bytes)
    if scheme == "":
        return _read_file(Path(ref), config.max_bytes)
    raise ImageLoadError(f"unknown scheme {scheme!r} (expected a path, file, http(s) or data)")


def _read_data_url(ref: str, max_bytes: int) -> bytes:
    header, sep, body = ref.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.endswith(";base64"):
        raise ImageLoadError("data URL must be 'data:image/<type>;base64,<data>'")
    # Base64 is 4 characters per 3 bytes: refuse by length before decoding anything.
    if (len(body) // 4) * 3 > max_bytes + 2:
        raise ImageLoadError(f"image larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ImageLoadError("data URL is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageLoadError(f"image larger than {max_bytes} bytes")
    return data


def _file_url_path(ref: str) -> Path:
    parts = urllib.parse.urlsplit(ref)
    if parts.netloc not in ("", "localhost"):
        raise ImageLoadError(f"file URL names a remote host {parts.netloc!r}")
    return Path(urllib.request.url2pathname(parts.path))


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as fh:
            # Read one byte past the cap rather than trusting stat(): pipes and devices
            # report size 0, and a file may grow while we read it.
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageLoadError(f"file not found: {path}") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot read file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. an embedded NUL byte
        raise ImageLoadError(f"invalid file path: {exc}") from None
    if len(data) > max_bytes:
        raise ImageLoadError(f"image larger than {max_bytes} bytes")
    return data


def _read_http(url: str, config: ImageFetchConfig) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "ppm-stream"})
    deadline = time.monotonic() + config.timeout_s
    try:
        with urllib.request.urlopen(request, timeout=config.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > config.max_bytes:
                raise ImageLoadError(f"image larger than {config.max_bytes} bytes")
            # Stream in chunks: the declared length may be absent or a lie.
            chunks: list[bytes] = []
            size = 0
            while chunk := response.read(_CHUNK_BYTES):
                size += len(chunk)
                if size > config.max_bytes:
                    raise ImageLoadError(f"image larger than {config.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ImageLoadError(f"timed out after {config.timeout_s}s reading {url}")
                chunks.append(chunk)
            return b"".join(chunks)
    except ImageLoadError:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageLoadError(f"HTTP {exc.code} from {url}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise ImageLoadError(f"timed out after {config.timeout_s}s fetching {url}") from None
        raise ImageLoadError(f"cannot connect to {url}: {exc.reason}") from None
    except TimeoutError:
        raise ImageLoadError(f"timed out after {config.timeout_s}s fetching {url}") from None
    except (OSError, http.client.HTTPException) as exc:  # reset, TLS, truncated body ...
        raise ImageLoadError(f"connection error fetching {url}: {exc!r}") from None
    except ValueError as exc:  # http.client.InvalidURL and friends
        raise ImageLoadError(f"invalid URL {url!r}: {exc}") from None


def _decode(data: bytes, config: ImageFetchConfig) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageLoadError(f"image has more than {config.max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageLoadError("bytes are not a recognised image format") from None
    # Image.open reads only the header, so this refuses a decompression bomb before
    # a single pixel is decoded.
    width, height = image.size
    if width * height > config.max_pixels:
        image.close()
        raise ImageLoadError(f"image of {width}x{height} has more than {config.max_pixels} pixels")
    try:
        image.load()  # decode now, so truncated or corrupt data fails here, not in the encoder
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        image.close()
        raise ImageLoadError(f"image bytes cannot be decoded ({type(exc).__name__})") from None
    return image
