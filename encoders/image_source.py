"""Read an item's image reference into a decoded picture, within time, size and pixel limits.

An :class:`~ppm.events.ItemEvent` carries ``image`` as a reference, not pixels. This module
turns that reference into a fully decoded ``PIL.Image.Image`` or raises
:class:`ImageLoadError` with a reason in words, so the caller can record it and go on.

Supported references:

* a local path (``/data/img/1.png`` or relative to the working directory);
* a ``file://`` URL (host empty or ``localhost``);
* an ``http://`` or ``https://`` URL;
* an inline ``data:image/<type>;base64,<data>`` URL.

A reference whose text before the first ``:`` looks like a URL scheme is read as a URL, so
spell a local path that contains ``:`` as a ``file://`` URL.

A reference may come from a stranger (any producer on the items topic), so reading one is
fenced in:

* one deadline, ``ImageFetchConfig.timeout_s``, bounds the whole read: name lookup, connect,
  TLS handshake, every redirect and every socket read, however slowly a server trickles;
* local paths and ``file://`` URLs are read only when the caller passes ``local_files=True``
  (refused otherwise with one reason, before the file system is touched, so the reason never
  tells whether a file exists); even then only regular files are read, never a FIFO, device,
  directory or anything under ``/proc``, ``/sys`` or ``/dev``;
* an http(s) host is resolved once, every address it resolves to is checked, and the socket
  connects to a checked address; loopback, private, link-local, multicast and reserved
  addresses are refused unless ``ImageFetchConfig.private_networks`` is on. Redirects (at most
  5, to http(s) only) are checked the same way. Proxy environment variables are not used: the
  check must see the address that is really connected to.

The module changes no global state: it never touches Pillow's ``MAX_IMAGE_PIXELS`` or
``LOAD_TRUNCATED_IMAGES``; it checks ``ImageFetchConfig.max_pixels`` itself from the image
header, before any pixel is decoded. Safe to call from several threads at once.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import io
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import urllib.request

from PIL import Image, UnidentifiedImageError

from ppm.config import ImageFetchConfig

_CHUNK_BYTES = 64 * 1024
_MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

# Pseudo-file systems: their files stat as regular (size 0 or 4096) yet hold kernel state
# (/proc/self/environ is the worker's environment, secrets included), and merely opening a
# device can act on it (a watchdog, a tape rewind).
_SYSTEM_DIRS = ("/proc", "/sys", "/dev")

LOCAL_FILES_REFUSED = (
    "local image paths and file:// URLs are not allowed from this source "
    "(setting images.local_files_from_kafka)"
)
"""The one reason given for any local reference when ``local_files`` is off."""


class ImageLoadError(ValueError):
    """An image reference could not be turned into a picture; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_image(ref: str, config: ImageFetchConfig, *, local_files: bool = True) -> Image.Image:
    """Read, check and fully decode the image that ``ref`` points to.

    Returns the image in its own mode (``L``, ``RGB``, ``RGBA``, ``P`` ...), first frame only;
    colour conversion is the encoder's job.

    Args:
        ref: a local path, ``file://``, ``http(s)://`` or ``data:image/...`` reference.
        config: limits: ``timeout_s`` for the whole read (lookup, connect, redirects, every
            read; decoding is bounded by ``max_pixels`` instead), ``max_bytes``,
            ``max_pixels``, and ``private_networks`` for http(s).
        local_files: whether a local path or ``file://`` URL may be read. Pass True only for
            references from a trusted source (files the user named to ``ppm stream``, ``ppm
            import`` output); the Faust worker passes ``images.local_files_from_kafka``.

    Raises :class:`ImageLoadError` for a refused local reference, a missing, unreadable or
    non-regular file, more than ``config.max_bytes`` bytes, the deadline passing, a name that
    does not resolve, a refused address, a connection error, an HTTP error status or too many
    redirects, bytes that are not a decodable image, more than ``config.max_pixels`` pixels,
    or an unknown scheme. A file on a hung network mount can still block inside one read.
    """
    deadline = time.monotonic() + config.timeout_s
    return _decode(_read_bytes(ref, config, local_files, deadline), config)


def _remaining(deadline: float) -> float:
    """Seconds left before ``deadline``; raises TimeoutError when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _read_bytes(ref: str, config: ImageFetchConfig, local_files: bool, deadline: float) -> bytes:
    try:
        scheme = urllib.parse.urlsplit(ref).scheme.lower()
    except ValueError as exc:  # e.g. an unbalanced '[' in the host
        raise ImageLoadError(f"malformed image reference: {exc}") from None
    if scheme == "data":
        return _read_data_url(ref, config.max_bytes)
    if scheme in ("http", "https"):
        return _read_http(ref, config, deadline)
    if scheme in ("file", ""):
        if not local_files:
            raise ImageLoadError(LOCAL_FILES_REFUSED)
        path = _file_url_path(ref) if scheme == "file" else ref
        return _read_file(path, config, deadline)
    raise ImageLoadError(f"unknown scheme {scheme!r} (expected a path, file, http(s) or data)")


# --- data: URLs --------------------------------------------------------------------------------


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


# --- local files -------------------------------------------------------------------------------


def _file_url_path(ref: str) -> str:
    parts = urllib.parse.urlsplit(ref)
    if parts.netloc not in ("", "localhost"):
        raise ImageLoadError(f"file URL names a remote host {parts.netloc!r}")
    return urllib.request.url2pathname(parts.path)


def _is_system_path(path: str) -> bool:
    return any(path == top or path.startswith(top + "/") for top in _SYSTEM_DIRS)


def _opened_path(fd: int, fallback: str) -> str:
    """The path the kernel says ``fd`` is open on (Linux), else ``fallback``."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return fallback


def _read_file(path: str, config: ImageFetchConfig, deadline: float) -> bytes:
    max_bytes = config.max_bytes
    try:
        real = os.path.realpath(path)
    except ValueError as exc:  # e.g. an embedded NUL byte
        raise ImageLoadError(f"invalid file path: {exc}") from None
    # Checked before open: opening some devices already does something.
    if _is_system_path(real):
        raise ImageLoadError(f"refusing a system path: {path}")
    try:
        # O_NONBLOCK: a FIFO with no writer would block open() forever. O_NOFOLLOW: the
        # path is already resolved, so a symlink here was swapped in since the check.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY)
    except FileNotFoundError:
        raise ImageLoadError(f"file not found: {path}") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot read file {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageLoadError(f"not a regular file: {path}")
        # Again on the open file itself, in case a directory on the way was swapped for a
        # symlink into /proc between realpath() and open().
        if _is_system_path(_opened_path(fd, real)):
            raise ImageLoadError(f"refusing a system path: {path}")
        if info.st_size > max_bytes:
            raise ImageLoadError(f"image larger than {max_bytes} bytes")
        os.set_blocking(fd, True)  # a regular file: O_NONBLOCK has done its job at open()
        # Read one byte past the cap rather than trusting st_size: a file may grow meanwhile.
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            if time.monotonic() > deadline:
                raise ImageLoadError(f"timed out after {config.timeout_s}s reading {path}")
            chunk = os.read(fd, min(_CHUNK_BYTES, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ImageLoadError(f"cannot read file {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise ImageLoadError(f"image larger than {max_bytes} bytes")
    return b"".join(chunks)


# --- http(s) -----------------------------------------------------------------------------------


def _read_http(url: str, config: ImageFetchConfig, deadline: float) -> bytes:
    """Follow up to ``_MAX_REDIRECTS`` redirects, each hop checked like the first."""
    first = url
    for _ in range(_MAX_REDIRECTS + 1):
        location = _fetch_once(url, config, deadline)
        if isinstance(location, bytes):
            return location
        url = urllib.parse.urljoin(url, location)
        if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
            raise ImageLoadError(f"redirect from {first} to a non-http(s) URL")
    raise ImageLoadError(f"more than {_MAX_REDIRECTS} redirects from {first}")


def _fetch_once(url: str, config: ImageFetchConfig, deadline: float) -> bytes | str:
    """The body of a 2xx answer, or the Location of a redirect."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
        if not host:
            raise ImageLoadError(f"invalid URL {url!r}: no host")
        tls = parts.scheme.lower() == "https"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = _CheckedConnection(host, port or (443 if tls else 80), tls, config, deadline, url)
        response = None
        try:
            conn.request("GET", target, headers={"User-Agent": "ppm-stream", "Accept": "image/*",
                                                 "Connection": "close"})
            response = conn.getresponse()
            if response.status in _REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise ImageLoadError(f"HTTP {response.status} without a Location from {url}")
                return location
            if not 200 <= response.status < 300:
                raise ImageLoadError(f"HTTP {response.status} from {url}")
            return _read_body(response, config.max_bytes)
        finally:
            if response is not None:
                response.close()
            conn.close()
    except ImageLoadError:
        raise
    except TimeoutError:
        raise ImageLoadError(f"timed out after {config.timeout_s}s fetching {url}") from None
    except http.client.InvalidURL as exc:
        raise ImageLoadError(f"invalid URL {url!r}: {exc}") from None
    except (OSError, http.client.HTTPException) as exc:  # reset, TLS, truncated body ...
        raise ImageLoadError(f"connection error fetching {url}: {exc!r}") from None
    except ValueError as exc:  # a bad port, a non-ASCII path ...
        raise ImageLoadError(f"invalid URL {url!r}: {exc}") from None


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ImageLoadError(f"image larger than {max_bytes} bytes")
    # Stream in chunks: the declared length may be absent or a lie.
    chunks: list[bytes] = []
    size = 0
    while chunk := response.read(_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise ImageLoadError(f"image larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _CheckedConnection(http.client.HTTPConnection):
    """An HTTP or HTTPS connection to a checked address of ``host``, within ``deadline``.

    The Host header and the TLS server name are ``host``; the socket goes to the address
    :func:`_open_socket` checked, so a second DNS answer can never pick another one.
    """

    def __init__(self, host: str, port: int, tls: bool, config: ImageFetchConfig,
                 deadline: float, url: str) -> None:
        super().__init__(host, port)
        self.default_port = 443 if tls else 80  # so the Host header leaves the port out
        self._tls = tls
        self._config = config
        self._deadline = deadline
        self._url = url

    def connect(self) -> None:
        sock = _open_socket(self.host, self.port, self._config, self._deadline, self._url)
        if self._tls:
            try:
                sock.settimeout(_remaining(self._deadline))  # the handshake, in all
                sock = _tls_context().wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        self.sock = _DeadlineSocket(sock, self._deadline)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Loading the system CA store takes milliseconds; one context serves every thread.
    return ssl.create_default_context()


class _DeadlineSocket:
    """What http.client uses of a socket (``sendall``, ``makefile``, ``close``), with every
    operation given only the time left before ``deadline``.

    A plain socket timeout bounds each recv alone, so a server sending a byte every half
    second would never time out; here the timeout shrinks with every read. As with a real
    socket, ``close`` waits for the files made by ``makefile`` to be closed too, since
    http.client closes the connection while its response still reads the body.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._readers = 0
        self._closed = False

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_remaining(self._deadline))
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args: object, **kwargs: object) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(_DeadlineReader(self))

    def recv_into(self, buffer: memoryview) -> int:
        self._sock.settimeout(_remaining(self._deadline))
        return self._sock.recv_into(buffer)

    def reader_closed(self) -> None:
        self._readers -= 1
        if self._closed and not self._readers:
            self._sock.close()

    def close(self) -> None:
        self._closed = True
        if not self._readers:
            self._sock.close()


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket) -> None:
        super().__init__()
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._sock.reader_closed()
        super().close()


def _open_socket(host: str, port: int, config: ImageFetchConfig, deadline: float,
                 url: str) -> socket.socket:
    """A socket connected to one of ``host``'s addresses, all of them checked first."""
    infos = _resolve(host, port, deadline)
    if not config.private_networks:
        for *_, sockaddr in infos:
            if not _is_public(sockaddr[0]):
                raise ImageLoadError(
                    f"{url} reaches {sockaddr[0]}, not a public address "
                    "(setting images.private_networks)")
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(sockaddr)
            return sock
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
    reason = (error.strerror or error) if error else "no address"
    raise ImageLoadError(f"cannot connect to {url}: {reason}")


def _resolve(host: str, port: int, deadline: float) -> list[tuple]:
    """``getaddrinfo`` for a TCP connection to ``host``, within ``deadline``."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:  # a literal address: no lookup, nothing to wait for
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST)
    # getaddrinfo has no timeout of its own: it runs in a daemon thread, which we stop
    # waiting for at the deadline (the thread ends by itself when the resolver gives up).
    outcome: list[list[tuple] | Exception] = []

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as exc:  # gaierror, or UnicodeError for a bad IDNA name
            outcome.append(exc)

    thread = threading.Thread(target=lookup, name="ppm-image-dns", daemon=True)
    thread.start()
    thread.join(_remaining(deadline))
    if not outcome:
        raise TimeoutError
    if isinstance(outcome[0], Exception):
        raise ImageLoadError(f"cannot resolve host {host!r}: {outcome[0]}")
    return outcome[0]


def _is_public(address: str) -> bool:
    """Whether ``address`` (as getaddrinfo gives it) is a public unicast address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 on the wire
    # is_global leaves out private, loopback, link-local, reserved, unspecified and shared
    # (100.64/10) addresses, but not multicast.
    return ip.is_global and not ip.is_multicast


# --- decoding ----------------------------------------------------------------------------------


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
