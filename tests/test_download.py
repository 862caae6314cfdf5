"""Tests for jaxlstm.download against a local HTTP server on 127.0.0.1."""

import errno
import logging
import os
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import requests

from jaxlstm import download
from jaxlstm.download import (
    CACHE_DIR_ENV,
    corpus_cache_path,
    default_cache_dir,
    fetch_corpus,
)
from jaxlstm.errors import DownloadError, InputError

GOOD_BODY = (
    "\ufeffTHE TRAGEDY OF HAMLET, PRINCE OF DENMARK\n\n"
    "To be, or not to be\u2014that is the question.\n"
).encode("utf-8")
OTHER_BODY = b"SONNET 18\nShall I compare thee to a summer's day?\n"
HTML_BODY = b"<!DOCTYPE html>\n<html><body>Not found</body></html>\n"
# Seconds the slow routes wait, and the client timeout that they exceed.
SLOW_SECONDS = 1.5
SHORT_TIMEOUT = 0.3


def _send(handler, status, body, content_type="text/plain; charset=utf-8"):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _send_good(handler, count):
    _send(handler, 200, GOOD_BODY)


def _send_after_failures(status, failures):
    def send(handler, count):
        if count <= failures:
            _send(handler, status, b"try again later\n")
        else:
            _send(handler, 200, GOOD_BODY)

    return send


def _send_slow_headers(handler, count):
    handler.server.stop_event.wait(SLOW_SECONDS)
    try:
        _send(handler, 200, GOOD_BODY)
    except OSError:
        pass  # The client timed out and closed the connection.


def _send_stalled_body(handler, count):
    handler.send_response(200)
    handler.send_header("Content-Type", "text/plain")
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(b"0123456789")
    handler.wfile.flush()
    handler.server.stop_event.wait(SLOW_SECONDS)
    handler.close_connection = True


def _send_truncated_body(handler, count):
    handler.send_response(200)
    handler.send_header("Content-Type", "text/plain")
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(b"0123456789")
    handler.close_connection = True


def _send_redirect(handler, count):
    handler.send_response(301)
    handler.send_header("Location", "/good.txt")
    handler.send_header("Content-Length", "0")
    handler.end_headers()


ROUTES = {
    "/good.txt": _send_good,
    "/other/good.txt": lambda h, c: _send(h, 200, OTHER_BODY),
    "/page.html": lambda h, c: _send(h, 200, HTML_BODY, "text/html"),
    "/login.txt": lambda h, c: _send(
        h, 200, b"\xef\xbb\xbf \r\n\t<HTML><body>Sign in</body></HTML>"
    ),
    "/empty.txt": lambda h, c: _send(h, 200, b""),
    "/missing.txt": lambda h, c: _send(h, 404, b"no such file\n"),
    "/latin1.txt": lambda h, c: _send(h, 200, b"caf\xe9 au lait\n"),
    # The lead byte 0xC3 ends the first 64 KiB chunk, and the next byte is
    # not a continuation byte.
    "/split.txt": lambda h, c: _send(h, 200, b"a" * 65535 + b"\xc3\x28"),
    "/cut-char.txt": lambda h, c: _send(h, 200, b"a" * 70000 + b"\xc3"),
    "/boundary.txt": lambda h, c: _send(
        h, 200, b"x" * 65535 + "\u00e9\n".encode()
    ),
    "/flaky.txt": _send_after_failures(500, failures=2),
    "/busy.txt": _send_after_failures(429, failures=1),
    "/down.txt": lambda h, c: _send(h, 503, b"down\n"),
    "/mirror/good.txt": lambda h, c: _send(h, 503, b"down\n"),
    "/slow.txt": _send_slow_headers,
    "/stall.txt": _send_stalled_body,
    "/truncated.txt": _send_truncated_body,
    "/moved.txt": _send_redirect,
}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        path = urlsplit(self.path).path
        count = self.server.record(path, self.headers)
        route = ROUTES.get(path)
        if route is None:
            _send(self, 404, b"unknown test route\n")
        else:
            route(self, count)

    def log_message(self, format, *args):
        pass


class _CorpusServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.stop_event = threading.Event()
        self.counts = Counter()
        self.last_headers = {}
        self._lock = threading.Lock()

    def record(self, path, headers):
        with self._lock:
            self.counts[path] += 1
            self.last_headers[path] = headers
            return self.counts[path]

    def url(self, path):
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{path}"


@pytest.fixture
def server():
    corpus_server = _CorpusServer()
    thread = threading.Thread(
        target=corpus_server.serve_forever,
        kwargs={"poll_interval": 0.05},
        daemon=True,
    )
    thread.start()
    yield corpus_server
    corpus_server.stop_event.set()
    corpus_server.shutdown()
    corpus_server.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """Keep requests off proxies and the cache out of the home folder."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env-cache"))


@pytest.fixture(autouse=True)
def sleeps(monkeypatch):
    """Record the waits between attempts instead of sleeping."""
    delays = []
    monkeypatch.setattr(download, "_sleep", delays.append)
    return delays


def _closed_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fetch_error(url, cache_dir, **kwargs):
    with pytest.raises(DownloadError) as excinfo:
        fetch_corpus(url, cache_dir, **kwargs)
    return str(excinfo.value)


# Cache file names


def test_cache_path_name_has_url_hash(tmp_path):
    path = corpus_cache_path("https://example.org/books/pg100.txt", tmp_path)
    assert path.parent == tmp_path
    assert path.name.startswith("pg100-")
    assert path.suffix == ".txt"
    assert len(path.stem) == len("pg100-") + 8


def test_cache_path_same_name_differs(tmp_path):
    first = corpus_cache_path("https://a.example/pg100.txt", tmp_path)
    second = corpus_cache_path("https://b.example/pg100.txt", tmp_path)
    assert first != second


def test_cache_path_is_deterministic(tmp_path):
    url = "https://example.org/pg100.txt"
    assert corpus_cache_path(url, tmp_path) == corpus_cache_path(url, tmp_path)


def test_cache_path_without_file_name(tmp_path):
    path = corpus_cache_path("https://example.org/", tmp_path)
    assert path.name.startswith("corpus-")
    assert path.suffix == ".txt"


def test_cache_path_sanitizes_name(tmp_path):
    path = corpus_cache_path("https://example.org/a%20b;c.txt", tmp_path)
    assert path.parent == tmp_path
    assert path.name.startswith("a_20b_c-")


# default_cache_dir


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "corpora"))
    assert default_cache_dir() == tmp_path / "corpora"


def test_default_cache_dir_env_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(CACHE_DIR_ENV, "~/corpora")
    assert default_cache_dir() == tmp_path / "corpora"


def test_default_cache_dir_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "jaxlstm"


def test_default_cache_dir_relative_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "jaxlstm"


def test_default_cache_dir_home(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "jaxlstm"


# Successful downloads and the cache


def test_fetch_downloads_text(server, tmp_path):
    url = server.url("/good.txt")
    path = fetch_corpus(url, tmp_path)
    assert path == corpus_cache_path(url, tmp_path)
    assert path.read_bytes() == GOOD_BODY
    assert server.counts["/good.txt"] == 1


def test_fetch_leaves_only_cache_file(server, tmp_path):
    path = fetch_corpus(server.url("/good.txt"), tmp_path)
    assert os.listdir(tmp_path) == [path.name]


def test_fetch_creates_cache_folder(server, tmp_path):
    cache_dir = tmp_path / "a" / "b"
    path = fetch_corpus(server.url("/good.txt"), cache_dir)
    assert path.parent == cache_dir
    assert path.read_bytes() == GOOD_BODY


def test_fetch_default_cache_dir(server, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "from-env"))
    path = fetch_corpus(server.url("/good.txt"))
    assert path.parent == tmp_path / "from-env"


def test_fetch_reuses_cache(server, tmp_path, caplog):
    url = server.url("/good.txt")
    first = fetch_corpus(url, tmp_path)
    caplog.set_level(logging.INFO, logger="jaxlstm.download")
    second = fetch_corpus(url, tmp_path)
    assert second == first
    assert server.counts["/good.txt"] == 1
    assert "Using cached corpus" in caplog.text
    assert str(first) in caplog.text


def test_fetch_uses_placed_file_offline(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/pg100.txt"
    placed = corpus_cache_path(url, tmp_path)
    placed.write_bytes(OTHER_BODY)
    assert fetch_corpus(url, tmp_path) == placed
    assert placed.read_bytes() == OTHER_BODY


def test_fetch_replaces_empty_cache_file(server, tmp_path):
    url = server.url("/good.txt")
    corpus_cache_path(url, tmp_path).touch()
    path = fetch_corpus(url, tmp_path)
    assert path.read_bytes() == GOOD_BODY
    assert server.counts["/good.txt"] == 1


def test_fetch_char_across_chunks(server, tmp_path):
    path = fetch_corpus(server.url("/boundary.txt"), tmp_path)
    assert path.read_bytes().endswith("\u00e9\n".encode())


def test_fetch_follows_redirect(server, tmp_path):
    url = server.url("/moved.txt")
    path = fetch_corpus(url, tmp_path)
    assert path == corpus_cache_path(url, tmp_path)
    assert path.read_bytes() == GOOD_BODY


def test_fetch_uses_given_session(server, tmp_path):
    with requests.Session() as session:
        session.headers["X-Corpus-Test"] = "given-session"
        fetch_corpus(server.url("/good.txt"), tmp_path, session=session)
    headers = server.last_headers["/good.txt"]
    assert headers["X-Corpus-Test"] == "given-session"


# Retries


def test_fetch_retries_server_error(server, tmp_path, sleeps):
    url = server.url("/flaky.txt")
    path = fetch_corpus(url, tmp_path, retries=3, backoff=0.5)
    assert path.read_bytes() == GOOD_BODY
    assert server.counts["/flaky.txt"] == 3
    assert sleeps == [0.5, 1.0]


def test_fetch_retries_rate_limit(server, tmp_path):
    path = fetch_corpus(server.url("/busy.txt"), tmp_path, retries=2)
    assert path.read_bytes() == GOOD_BODY
    assert server.counts["/busy.txt"] == 2


def test_fetch_logs_retry(server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="jaxlstm.download")
    fetch_corpus(server.url("/flaky.txt"), tmp_path, retries=3)
    assert "attempt 1 of 3" in caplog.text
    assert "HTTP 500" in caplog.text


def test_fetch_gives_up_on_server_error(server, tmp_path, sleeps):
    url = server.url("/down.txt")
    message = _fetch_error(url, tmp_path, retries=3, backoff=2.0)
    assert "HTTP 503" in message
    assert "after 3 attempts" in message
    assert "--text" in message
    assert server.counts["/down.txt"] == 3
    assert sleeps == [2.0, 4.0]
    assert os.listdir(tmp_path) == []


def test_fetch_single_attempt(server, tmp_path, sleeps):
    message = _fetch_error(server.url("/down.txt"), tmp_path, retries=1)
    assert "after 1 attempt." in message
    assert server.counts["/down.txt"] == 1
    assert sleeps == []


# Rejected responses: each fails at once and leaves the folder empty.

REJECTIONS = [
    ("/missing.txt", "HTTP 404"),
    ("/page.html", "HTML page (Content-Type text/html)"),
    ("/login.txt", "HTML page instead of plain text"),
    ("/empty.txt", "empty body"),
    ("/latin1.txt", "not valid UTF-8 (invalid byte at offset 3)"),
    ("/split.txt", "invalid byte at offset 65535"),
    ("/cut-char.txt", "invalid byte at offset 70000"),
]


@pytest.mark.parametrize(("route", "reason"), REJECTIONS)
def test_fetch_rejects_response(server, tmp_path, sleeps, route, reason):
    url = server.url(route)
    message = _fetch_error(url, tmp_path, retries=3)
    assert url in message
    assert reason in message
    assert "--text FILE" in message
    assert str(corpus_cache_path(url, tmp_path)) in message
    assert "\n" not in message
    assert server.counts[route] == 1
    assert sleeps == []
    assert os.listdir(tmp_path) == []


# Network failures


def test_fetch_timeout_before_headers(server, tmp_path):
    url = server.url("/slow.txt")
    message = _fetch_error(url, tmp_path, timeout=SHORT_TIMEOUT, retries=2)
    assert f"timed out after {SHORT_TIMEOUT:g} s" in message
    assert "after 2 attempts" in message
    assert "offline" in message
    assert "--text FILE" in message
    assert server.counts["/slow.txt"] == 2
    assert os.listdir(tmp_path) == []


def test_fetch_timeout_during_body(server, tmp_path):
    url = server.url("/stall.txt")
    message = _fetch_error(url, tmp_path, timeout=SHORT_TIMEOUT, retries=1)
    assert f"timed out after {SHORT_TIMEOUT:g} s" in message
    assert "--text FILE" in message
    assert os.listdir(tmp_path) == []


def test_fetch_connection_refused(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/pg100.txt"
    message = _fetch_error(url, tmp_path, retries=2)
    assert url in message
    assert "Connection refused" in message
    assert "after 2 attempts" in message
    assert "seems to be offline" in message
    assert "--text FILE" in message
    assert str(corpus_cache_path(url, tmp_path)) in message
    assert "\n" not in message


def test_fetch_truncated_body(server, tmp_path):
    message = _fetch_error(server.url("/truncated.txt"), tmp_path, retries=2)
    assert "connection broke during the transfer" in message
    assert server.counts["/truncated.txt"] == 2
    assert os.listdir(tmp_path) == []


# The cache after failures


def test_failed_download_keeps_empty_file(server, tmp_path):
    url = server.url("/page.html")
    existing = corpus_cache_path(url, tmp_path)
    existing.touch()
    _fetch_error(url, tmp_path)
    assert existing.read_bytes() == b""
    assert os.listdir(tmp_path) == [existing.name]


def test_failed_download_keeps_other_cache(server, tmp_path):
    cached = fetch_corpus(server.url("/good.txt"), tmp_path)
    _fetch_error(server.url("/mirror/good.txt"), tmp_path, retries=2)
    assert cached.read_bytes() == GOOD_BODY
    assert os.listdir(tmp_path) == [cached.name]


def test_failed_rename_removes_part_file(server, tmp_path, monkeypatch):
    def fail_replace(source, target):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(download.os, "replace", fail_replace)
    message = _fetch_error(server.url("/good.txt"), tmp_path)
    assert f"cannot write to the cache folder {tmp_path}" in message
    assert "Permission denied" in message
    assert os.listdir(tmp_path) == []


def test_fetch_unwritable_cache_folder(server, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected\n")
    cache_dir = blocker / "cache"
    message = _fetch_error(server.url("/good.txt"), cache_dir)
    assert str(cache_dir) in message
    assert "--cache-dir" in message
    assert CACHE_DIR_ENV in message
    assert server.counts["/good.txt"] == 0


# Invalid arguments


INVALID_URLS = [
    "not a url",
    "ftp://127.0.0.1/pg100.txt",
    "http:///pg100.txt",
    "http://127.0.0.1:99999/pg100.txt",
]


@pytest.mark.parametrize("url", INVALID_URLS)
def test_fetch_invalid_url(tmp_path, url):
    cache_dir = tmp_path / "cache"
    message = _fetch_error(url, cache_dir)
    assert "invalid URL" in message
    assert "--text FILE" in message
    assert "\n" not in message
    assert not cache_dir.exists()


@pytest.mark.parametrize(
    "kwargs", [{"retries": 0}, {"timeout": 0.0}, {"backoff": -1.0}]
)
def test_fetch_rejects_bad_arguments(tmp_path, kwargs):
    url = f"http://127.0.0.1:{_closed_port()}/pg100.txt"
    with pytest.raises(InputError):
        fetch_corpus(url, tmp_path, **kwargs)
