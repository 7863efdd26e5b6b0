"""encoders.image_source: every kind of reference, every refusal, against real files and a
real local HTTP server (reached with ``private_networks`` on; the refusals run with it off)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from encoders import image_source
from encoders.image_source import LOCAL_FILES_REFUSED, ImageLoadError, load_image
from ppm.config import ImageFetchConfig

LIMITS = ImageFetchConfig(timeout_s=0.5, max_bytes=50_000, max_pixels=1_000_000,
                          private_networks=True)
STRICT = ImageFetchConfig(timeout_s=0.5, max_bytes=50_000, max_pixels=1_000_000)
"""The defaults a Faust worker runs with: no private addresses."""
SLACK_S = 0.5  # how far past the deadline a refused read may end (thread wake-ups, CI noise)


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
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(str(tmp_path), LIMITS)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.timeout(10)  # the bug was a fetch that never returned
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # no writer ever opens it: a blocking open() would wait forever
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(str(fifo), LIMITS)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(fifo.as_uri(), LIMITS)
    assert time.monotonic() - start < LIMITS.timeout_s


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux pseudo-files")
@pytest.mark.parametrize("ref", ["/proc/self/environ", "file:///proc/self/environ",
                                 "/proc/self/../self/environ", "/sys/kernel/uevent_seqnum",
                                 "/dev/zero", "/dev/null", "/proc"])
def test_system_paths_are_refused(ref: str) -> None:
    with pytest.raises(ImageLoadError, match="refusing a system path"):
        load_image(ref, LIMITS)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux pseudo-files")
def test_a_symlink_into_proc_is_refused(tmp_path: Path) -> None:
    (tmp_path / "env.png").symlink_to("/proc/self/environ")
    (tmp_path / "proc").symlink_to("/proc")
    for path in (tmp_path / "env.png", tmp_path / "proc" / "self" / "environ"):
        with pytest.raises(ImageLoadError, match="refusing a system path"):
            load_image(str(path), LIMITS)


def test_a_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    assert load_image(str(tmp_path / "link.png"), LIMITS).size == (20, 12)


def test_local_references_refused_alike_when_local_files_are_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    present = tmp_path / "a.png"
    present.write_bytes(png_bytes())
    refs = [str(present), present.as_uri(), str(tmp_path / "missing.png"),
            (tmp_path / "missing.png").as_uri(), str(tmp_path), "relative/a.png",
            "/proc/self/environ", "file:///proc/self/environ", "file://example.com/a.png",
            "bad\0path"]
    # The file system is not touched at all, so nothing about it can leak into the reason.
    def untouchable(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file system was touched")

    monkeypatch.setattr(os, "open", untouchable)
    monkeypatch.setattr(os.path, "realpath", untouchable)
    reasons = set()
    for ref in refs:
        with pytest.raises(ImageLoadError) as err:
            load_image(ref, LIMITS, local_files=False)
        reasons.add(err.value.reason)
    assert reasons == {LOCAL_FILES_REFUSED}
    assert "not allowed" in LOCAL_FILES_REFUSED


def test_inline_images_need_no_local_files() -> None:
    assert load_image(data_url(png_bytes()), STRICT, local_files=False).size == (20, 12)


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
TRICKLE_S = 0.25  # one byte this often: each read is quick, the whole is far too slow


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers["Host"]))  # type: ignore[attr-defined]
        path, _, query = self.path.partition("?")
        if path == "/img.png":
            self._send(200, PNG)
        elif path == "/slow.png":
            time.sleep(SLOW_S)
            self._send(200, PNG)
        elif path == "/big-declared.png":
            self._send(200, bytes(LIMITS.max_bytes + 1))
        elif path == "/big-undeclared.png":
            # No Content-Length: the body ends when the connection closes, so only the
            # streaming cap can stop it.
            self.send_response(200)
            self.end_headers()
            for _ in range(LIMITS.max_bytes // 1000 + 10):
                self.wfile.write(bytes(1000))
        elif path == "/trickle-body.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self._trickle(PNG)
        elif path == "/trickle-headers.png":
            self._trickle(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(query))
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"not here")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, data: bytes) -> None:
        try:
            for i in range(min(len(data), 40)):  # at most 10 s, then the thread ends
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                time.sleep(TRICKLE_S)
        except OSError:  # the client hung up at its deadline, as it should
            pass

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def httpd() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True  # a handler still sleeping in /slow.png must not block exit
    httpd.seen = []  # type: ignore[attr-defined]  # (path, Host header) of every request
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(httpd: ThreadingHTTPServer) -> str:
    httpd.seen.clear()  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def seen(httpd: ThreadingHTTPServer) -> list[tuple[str, str]]:
    return httpd.seen  # type: ignore[attr-defined]


def test_http_image(server: str) -> None:
    assert load_image(f"{server}/img.png", LIMITS).size == (30, 30)


def test_http_404(server: str) -> None:
    with pytest.raises(ImageLoadError, match="HTTP 404"):
        load_image(f"{server}/nope.png", LIMITS)


def test_http_timeout(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"timed out after 0\.5s"):
        load_image(f"{server}/slow.png", LIMITS)
    assert time.monotonic() - start < LIMITS.timeout_s + SLACK_S


@pytest.mark.parametrize("path", ["/trickle-body.png", "/trickle-headers.png"])
def test_a_trickling_server_is_cut_at_the_deadline(server: str, path: str) -> None:
    # Every byte comes well within 1 s, so only a deadline for the whole read can stop it.
    limits = LIMITS.model_copy(update={"timeout_s": 1.0})
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"timed out after 1\.0s"):
        load_image(server + path, limits)
    assert time.monotonic() - start < limits.timeout_s + SLACK_S


def test_a_slow_name_lookup_is_cut_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def slow_getaddrinfo(host: str, *args: object, **kwargs: object) -> list:
        if host == "slow-dns.test":
            time.sleep(SLOW_S)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    start = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"timed out after 0\.5s"):
        load_image("http://slow-dns.test/a.png", LIMITS)
    assert time.monotonic() - start < LIMITS.timeout_s + SLACK_S


def test_a_stalled_tls_handshake_is_cut_at_the_deadline() -> None:
    with socket.socket() as listener:  # connects complete in the backlog; nobody answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        start = time.monotonic()
        with pytest.raises(ImageLoadError, match=r"timed out after 0\.5s"):
            load_image(f"https://127.0.0.1:{listener.getsockname()[1]}/a.png", LIMITS)
        assert time.monotonic() - start < LIMITS.timeout_s + SLACK_S


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


# --- which addresses http(s) may reach ----------------------------------------------------------


def test_the_local_server_is_refused_by_default(httpd: ThreadingHTTPServer, server: str) -> None:
    with pytest.raises(ImageLoadError, match=r"127\.0\.0\.1, not a public address"):
        load_image(f"{server}/img.png", STRICT)
    assert seen(httpd) == []  # refused before connecting


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.1.2.3", "localhost", "[::1]", "0.0.0.0", "[::]", "10.1.2.3",
    "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "[fe80::1]", "[fc00::1]",
    "224.0.0.1", "[ff02::1]", "240.0.0.1", "255.255.255.255", "[::ffff:127.0.0.1]",
    "2130706433",  # 127.0.0.1 as one decimal number, which getaddrinfo accepts
])
def test_private_addresses_are_refused_by_default(host: str) -> None:
    with pytest.raises(ImageLoadError, match="not a public address"):
        load_image(f"http://{host}:9/a.png", STRICT)


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.215.14", "2606:4700::1111",
                                     "::ffff:8.8.8.8"])
def test_public_addresses_pass_the_check(address: str) -> None:
    assert image_source._is_public(address)


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Make ``socket.getaddrinfo`` answer ``answers`` for those names; returns the names
    looked up, in order."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))
                for ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_the_checked_address_is_the_one_connected(
    httpd: ThreadingHTTPServer, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend 127.0.0.1 is public so a name can lead to the test server.
    monkeypatch.setattr(image_source, "_is_public", lambda address: address == "127.0.0.1")
    asked = fake_dns(monkeypatch, {"cdn.test": ["127.0.0.1"],
                                   "rebind.test": ["127.0.0.1", "10.0.0.7"]})
    port = httpd.server_address[1]
    assert load_image(f"http://cdn.test:{port}/img.png", STRICT).size == (30, 30)
    assert seen(httpd) == [("/img.png", f"cdn.test:{port}")]  # the name, sent to the address
    assert asked == ["cdn.test"]  # resolved once: no second answer could pick another address
    with pytest.raises(ImageLoadError, match=r"10\.0\.0\.7, not a public address"):
        load_image(f"http://rebind.test:{port}/img.png", STRICT)
    assert len(seen(httpd)) == 1  # one bad address among good ones refuses the host


def test_redirects_are_followed(httpd: ThreadingHTTPServer, server: str) -> None:
    assert load_image(f"{server}/redirect?/img.png", LIMITS).size == (30, 30)
    assert [path for path, _ in seen(httpd)] == ["/redirect?/img.png", "/img.png"]


def test_a_redirect_to_a_private_address_is_refused(
    httpd: ThreadingHTTPServer, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_source, "_is_public", lambda address: address == "127.0.0.1")
    target = urllib.parse.quote("http://169.254.169.254/latest/meta-data/", safe="")
    with pytest.raises(ImageLoadError, match=r"169\.254\.169\.254, not a public address"):
        load_image(f"{server}/redirect?{target}", STRICT)
    assert len(seen(httpd)) == 1


def test_a_redirect_to_a_file_url_is_refused(server: str) -> None:
    with pytest.raises(ImageLoadError, match="non-http"):
        load_image(f"{server}/redirect?file:///etc/hostname", LIMITS)


def test_too_many_redirects_end(server: str) -> None:
    assert load_image(server + "/redirect?" * 5 + "/img.png", LIMITS).size == (30, 30)
    with pytest.raises(ImageLoadError, match="more than 5 redirects"):
        load_image(server + "/redirect?" * 6 + "/img.png", LIMITS)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_checks_the_certificate_against_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=img.test", "-addext", "subjectAltName=DNS:img.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    httpsd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpsd.seen = []  # type: ignore[attr-defined]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    httpsd.socket = context.wrap_socket(httpsd.socket, server_side=True)
    threading.Thread(target=httpsd.serve_forever, daemon=True).start()
    try:
        fake_dns(monkeypatch, {"img.test": ["127.0.0.1"]})
        url = f"https://img.test:{httpsd.server_address[1]}/img.png"
        with pytest.raises(ImageLoadError, match="CERTIFICATE_VERIFY_FAILED"):
            load_image(url, LIMITS)  # self-signed: the system's CAs do not vouch for it
        trusting = ssl.create_default_context(cafile=cert)
        monkeypatch.setattr(image_source, "_tls_context", lambda: trusting)
        assert load_image(url, LIMITS).size == (30, 30)  # name checked, checked address used
        with pytest.raises(ImageLoadError, match="CERTIFICATE_VERIFY_FAILED"):
            load_image(f"https://127.0.0.1:{httpsd.server_address[1]}/img.png", LIMITS)
    finally:
        httpsd.shutdown()
        httpsd.server_close()
