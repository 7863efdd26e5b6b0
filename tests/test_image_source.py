"""encoders.image_source: every kind of reference, every refusal, against real files and a
real local HTTP server."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from encoders.image_source import ImageLoadError, load_image
from ppm.config import ImageFetchConfig

LIMITS = ImageFetchConfig(timeout_s=0.5, max_bytes=50_000, max_pixels=1_000_000)


def png_bytes(size: tuple[int, int] = (20, 12), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color=128).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


# --- local files, file:// and data: URLs -------------------------------------------------


def test_local_path(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes((20, 12), "L"))
    image = load_image(str(path), LIMITS)
    assert image.size == (20, 12)
    assert image.mode == "L"  # returned as decoded; RGB conversion is the encoder's job


def test_file_url(tmp_path: Path) -> None:
    path = tmp_path / "with space.png"
    path.write_bytes(png_bytes())
    assert load_image(path.as_uri(), LIMITS).size == (20, 12)


def test_file_url_with_remote_host_is_refused() -> None:
    with pytest.raises(ImageLoadError, match="remote host"):
        load_image("file://example.com/a.png", LIMITS)


def test_data_url() -> None:
    assert load_image(data_url(png_bytes()), LIMITS).size == (20, 12)


def test_data_url_not_base64() -> None:
    with pytest.raises(ImageLoadError, match="base64"):
        load_image("data:image/png;base64,@@@@", LIMITS)


def test_data_url_of_other_media_type() -> None:
    with pytest.raises(ImageLoadError, match="data URL must be"):
        load_image("data:text/plain;base64,aGVsbG8=", LIMITS)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="file not found") as err:
        load_image(str(tmp_path / "nope.png"), LIMITS)
    assert isinstance(err.value, ValueError)
    assert "nope.png" in err.value.reason


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="cannot read file"):
        load_image(str(tmp_path), LIMITS)


def test_oversized_file_and_data_url(tmp_path: Path) -> None:
    big = b"\x89PNG" + bytes(LIMITS.max_bytes)
    path = tmp_path / "big.png"
    path.write_bytes(big)
    with pytest.raises(ImageLoadError, match="larger than 50000 bytes"):
        load_image(str(path), LIMITS)
    with pytest.raises(ImageLoadError, match="larger than 50000 bytes"):
        load_image(data_url(big), LIMITS)


def test_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not a picture at all")
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        load_image(str(path), LIMITS)


def test_truncated_image_fails_at_load_not_later() -> None:
    data = png_bytes((200, 200))
    with pytest.raises(ImageLoadError, match="cannot be decoded"):
        load_image(data_url(data[: len(data) // 2]), LIMITS)


def test_too_many_pixels_is_refused_from_the_header() -> None:
    # 5000 x 5000 black compresses to a few kB: a small decompression bomb.
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < LIMITS.max_bytes
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError, match="more than 1000000 pixels"):
        load_image(data_url(buf.getvalue()), LIMITS)
    assert before == Image.MAX_IMAGE_PIXELS  # no global state touched


def test_unknown_scheme() -> None:
    with pytest.raises(ImageLoadError, match="unknown scheme 'ftp'"):
        load_image("ftp://example.com/a.png", LIMITS)


def _picture_or_reason(ref: str) -> None:
    try:
        image = load_image(ref, LIMITS)
    except ImageLoadError as exc:
        assert exc.reason
    else:
        assert image.size[0] * image.size[1] <= LIMITS.max_pixels


@given(st.binary(max_size=300))
def test_any_inline_bytes_give_a_picture_or_a_reason(data: bytes) -> None:
    _picture_or_reason(data_url(data))


@given(st.text(max_size=80))
def test_any_data_url_text_gives_a_picture_or_a_reason(body: str) -> None:
    _picture_or_reason("data:image/png;base64," + body)


# --- http(s) against a real server on 127.0.0.1 ---------------------------------------------

PNG = png_bytes((30, 30))
SLOW_S = 2.0  # well past LIMITS.timeout_s


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/img.png":
            self._send(200, PNG)
        elif self.path == "/slow.png":
            time.sleep(SLOW_S)
            self._send(200, PNG)
        elif self.path == "/big-declared.png":
            self._send(200, bytes(LIMITS.max_bytes + 1))
        elif self.path == "/big-undeclared.png":
            # No Content-Length: the body ends when the connection closes, so only the
            # streaming cap can stop it.
            self.send_response(200)
            self.end_headers()
            for _ in range(LIMITS.max_bytes // 1000 + 10):
                self.wfile.write(bytes(1000))
        else:
            self._send(404, b"not here")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True  # a handler still sleeping in /slow.png must not block exit
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_image(server: str) -> None:
    assert load_image(f"{server}/img.png", LIMITS).size == (30, 30)


def test_http_404(server: str) -> None:
    with pytest.raises(ImageLoadError, match="HTTP 404"):
        load_image(f"{server}/nope.png", LIMITS)


def test_http_timeout(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"timed out after 0\.5s"):
        load_image(f"{server}/slow.png", LIMITS)
    assert time.monotonic() - start < SLOW_S


@pytest.mark.parametrize("path", ["/big-declared.png", "/big-undeclared.png"])
def test_http_oversized_body(server: str, path: str) -> None:
    with pytest.raises(ImageLoadError, match="larger than 50000 bytes"):
        load_image(server + path, LIMITS)


def test_http_connection_refused() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageLoadError, match="cannot connect"):
        load_image(f"http://127.0.0.1:{port}/a.png", LIMITS)
