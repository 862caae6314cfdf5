"""Download the training corpus once and keep it in a local cache folder.

The default corpus is Project Gutenberg eBook 100, the Complete Works of
Shakespeare. A download is written to a temporary file and renamed onto the
cache file only after every check passes, so a failed or rejected download
never writes to the cache file.
"""

import codecs
import hashlib
import logging
import os
import pathlib
import re
import tempfile
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests
import urllib3

from jaxlstm.errors import DownloadError, InputError

logger = logging.getLogger(__name__)

DEFAULT_URL = "https://www.gutenberg.org/cache/epub/100/pg100.txt"
CACHE_DIR_ENV = "JAXLSTM_CACHE_DIR"

_CHUNK_SIZE = 64 * 1024
# Number of leading body bytes inspected for an HTML document.
_SNIFF_SIZE = 1024
_HTML_PREFIXES = (b"<!doctype html", b"<html")
_HTML_MEDIA_TYPES = ("text/html", "application/xhtml+xml")
_MAX_STEM_LENGTH = 64
_DEFAULT_SUFFIX = ".txt"


def _sleep(seconds: float) -> None:
    """Wait between download attempts. Tests replace this to skip the wait."""
    time.sleep(seconds)


def default_cache_dir() -> pathlib.Path:
    """Return the folder where downloaded corpora are cached.

    Returns:
        ``$JAXLSTM_CACHE_DIR`` if it is set and non-empty, else
        ``$XDG_CACHE_HOME/jaxlstm`` if ``XDG_CACHE_HOME`` is an absolute path,
        else ``~/.cache/jaxlstm``. A relative ``XDG_CACHE_HOME`` is ignored,
        as the XDG Base Directory Specification (version 0.7 and later)
        requires.
    """
    configured = os.environ.get(CACHE_DIR_ENV, "")
    if configured:
        return pathlib.Path(configured).expanduser()

    xdg_cache_home = os.environ.get("XDG_CACHE_HOME", "")
    if xdg_cache_home and os.path.isabs(xdg_cache_home):
        return pathlib.Path(xdg_cache_home) / "jaxlstm"

    return pathlib.Path.home() / ".cache" / "jaxlstm"


def corpus_cache_path(
    url: str = DEFAULT_URL, cache_dir: str | os.PathLike | None = None
) -> pathlib.Path:
    """Return the cache file path that ``fetch_corpus`` uses for ``url``.

    The file name is the last component of the URL path, with the first 8
    hex digits of the SHA-256 of the full URL appended to the stem, for
    example ``pg100-1a2b3c4d.txt``. Two URLs that end in the same name thus
    get different cache files.

    Args:
        url: The corpus URL.
        cache_dir: The cache folder, or None for ``default_cache_dir()``.

    Returns:
        The path of the cache file. The file may not exist yet.
    """
    if cache_dir is None:
        folder = default_cache_dir()
    else:
        folder = pathlib.Path(cache_dir).expanduser()
    return folder / _cache_file_name(url)


def _cache_file_name(url: str) -> str:
    last_component = pathlib.PurePosixPath(urlsplit(url).path).name
    stem = pathlib.PurePosixPath(last_component).stem
    suffix = pathlib.PurePosixPath(last_component).suffix

    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._")
    stem = stem[:_MAX_STEM_LENGTH] or "corpus"
    if not re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix):
        suffix = _DEFAULT_SUFFIX

    url_hash = hashlib.sha256(url.encode("utf-8")).hexdigest()[:8]
    return f"{stem}-{url_hash}{suffix}"


def fetch_corpus(
    url: str = DEFAULT_URL,
    cache_dir: str | os.PathLike | None = None,
    *,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    session: requests.Session | None = None,
) -> pathlib.Path:
    """Return the path of the cached corpus file, downloading it if needed.

    A non-empty file at ``corpus_cache_path(url, cache_dir)`` is returned
    without any network request. Otherwise the body is streamed into a
    temporary ``.part`` file in the cache folder and renamed onto the cache
    path once it passes all checks. The body is stored byte for byte, so a
    leading UTF-8 byte order mark is kept.

    Connection errors, timeouts and HTTP 5xx or 429 responses are retried,
    with a wait of ``backoff * 2**attempt`` seconds after the failed attempt
    number ``attempt`` (counted from 0). Other HTTP errors and rejected
    content fail at once.

    Args:
        url: The http or https URL of a UTF-8 text file.
        cache_dir: The cache folder, or None for ``default_cache_dir()``. The
            folder and its parents are created if missing.
        timeout: Seconds to wait for the connection and for each read.
        retries: Maximum number of attempts, at least 1.
        backoff: Wait in seconds after the first failed attempt. The wait
            doubles after each further failed attempt.
        session: The session that sends the request. When None, a new
            ``requests.Session`` is created and closed afterwards.

    Returns:
        The path of the cached corpus file.

    Raises:
        InputError: If ``timeout``, ``retries`` or ``backoff`` is out of
            range.
        DownloadError: If the URL is not an http or https URL, the cache
            folder cannot be written, the request fails, or the body is
            empty, an HTML page or invalid UTF-8. The message names the URL
            and what to do next.
    """
    if timeout <= 0:
        raise InputError(f"timeout must be positive, got {timeout!r}")
    if retries < 1:
        raise InputError(f"retries must be at least 1, got {retries!r}")
    if backoff < 0:
        raise InputError(f"backoff must be non-negative, got {backoff!r}")

    _check_url(url)
    path = corpus_cache_path(url, cache_dir)
    if _is_cached(path):
        logger.info("Using cached corpus %s", path)
        return path

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_folder_error(url, path.parent, exc) from exc

    if session is None:
        with requests.Session() as own_session:
            _download_with_retries(
                own_session, url, path, timeout, retries, backoff
            )
    else:
        _download_with_retries(session, url, path, timeout, retries, backoff)
    return path


def _check_url(url: str) -> None:
    """Raise DownloadError unless ``url`` is http or https with a host."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # The port is not a number in 0-65535.
        port = -1
    is_http = parts.scheme in ("http", "https")
    if is_http and parts.hostname and port != -1:
        return

    error = DownloadError(
        f"Could not download {url}: invalid URL, expected an http:// or "
        "https:// URL with a host name and a valid port. Pass a valid URL, "
        "or pass --text FILE to train on a local UTF-8 text file instead."
    )
    raise error


def _is_cached(path: pathlib.Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


class _AttemptError(Exception):
    """A failed download attempt, before it is turned into a DownloadError.

    Attributes:
        reason: What went wrong, as a lower-case phrase.
        kind: ``network`` (no connection, DNS failure, timeout, broken
            transfer), ``server`` (HTTP 5xx or 429), ``client`` (other HTTP
            4xx), ``content`` (rejected body) or ``request`` (invalid URL or
            another request that cannot succeed on a retry).
    """

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind

    @property
    def retryable(self) -> bool:
        return self.kind in ("network", "server")


def _download_with_retries(
    session: requests.Session,
    url: str,
    path: pathlib.Path,
    timeout: float,
    retries: int,
    backoff: float,
) -> None:
    logger.info("Downloading %s to %s", url, path)
    for attempt in range(retries):
        try:
            size = _download_once(session, url, path, timeout)
        except DownloadError:
            raise
        except _AttemptError as exc:
            is_last = attempt == retries - 1
            if is_last or not exc.retryable:
                error = DownloadError(
                    _failure_message(url, path, exc, attempts=attempt + 1)
                )
                raise error from exc

            delay = backoff * 2**attempt
            logger.warning(
                "Download of %s failed on attempt %d of %d: %s. "
                "Retrying in %g s.",
                url,
                attempt + 1,
                retries,
                exc.reason,
                delay,
            )
            _sleep(delay)
        else:
            logger.info("Saved %d bytes to %s", size, path)
            return


def _download_once(
    session: requests.Session, url: str, path: pathlib.Path, timeout: float
) -> int:
    """Download ``url`` into ``path`` once and return the number of bytes.

    Raises:
        _AttemptError: If the request fails or the body is rejected.
        DownloadError: If the cache folder cannot be written.
    """
    try:
        response = session.get(url, timeout=timeout, stream=True)
    except requests.RequestException as exc:
        raise _request_error(exc, timeout) from exc

    with response:
        _check_response_headers(response)
        return _stream_to_cache(response, url, path, timeout)


def _check_response_headers(response: requests.Response) -> None:
    status = response.status_code
    if status >= 400:
        status_text = f"HTTP {status} {response.reason or ''}".strip()
        reason = f"the server returned {status_text}"
        if status == 429 or status >= 500:
            raise _AttemptError(reason, "server")
        raise _AttemptError(reason, "client")

    content_type = response.headers.get("Content-Type", "")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type in _HTML_MEDIA_TYPES:
        raise _AttemptError(
            f"the server returned an HTML page (Content-Type {media_type}) "
            "instead of plain text",
            "content",
        )


def _stream_to_cache(
    response: requests.Response, url: str, path: pathlib.Path, timeout: float
) -> int:
    folder = path.parent
    try:
        part_file = tempfile.NamedTemporaryFile(
            delete=False, dir=folder, prefix=f".{path.name}.", suffix=".part"
        )
    except OSError as exc:
        raise _cache_folder_error(url, folder, exc) from exc

    part_path = pathlib.Path(part_file.name)
    replaced = False
    try:
        checker = _BodyChecker()
        with part_file:
            for chunk in _iter_body(response, timeout):
                checker.feed(chunk)
                try:
                    part_file.write(chunk)
                except OSError as exc:
                    raise _cache_folder_error(url, folder, exc) from exc
            checker.finish()
            try:
                part_file.flush()
                os.fsync(part_file.fileno())
            except OSError as exc:
                raise _cache_folder_error(url, folder, exc) from exc

        try:
            # NamedTemporaryFile creates mode 0600; a cache is for all readers.
            os.chmod(part_path, 0o644)
            os.replace(part_path, path)
        except OSError as exc:
            raise _cache_folder_error(url, folder, exc) from exc
        replaced = True
        return checker.size
    finally:
        if not replaced:
            try:
                part_path.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning(
                    "Could not remove temporary file %s: %s", part_path, exc
                )


def _iter_body(response: requests.Response, timeout: float) -> Iterator[bytes]:
    try:
        yield from response.iter_content(chunk_size=_CHUNK_SIZE)
    except requests.RequestException as exc:
        raise _request_error(exc, timeout) from exc


class _BodyChecker:
    """Incremental checks on a response body: non-empty, not HTML, UTF-8."""

    def __init__(self) -> None:
        self.size = 0
        self._head = b""
        self._sniffed = False
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def feed(self, chunk: bytes) -> None:
        """Check the next chunk of the body.

        Raises:
            _AttemptError: If the body so far is an HTML page or invalid UTF-8.
        """
        if not self._sniffed:
            self._head += chunk[: _SNIFF_SIZE - len(self._head)]
            if len(self._head) >= _SNIFF_SIZE:
                self._sniff_html()
        self._decode(chunk, final=False)
        self.size += len(chunk)

    def finish(self) -> None:
        """Check the complete body after the last chunk.

        Raises:
            _AttemptError: If the body is empty, an HTML page or invalid UTF-8.
        """
        if self.size == 0:
            raise _AttemptError("the server returned an empty body", "content")
        if not self._sniffed:
            self._sniff_html()
        self._decode(b"", final=True)

    def _sniff_html(self) -> None:
        self._sniffed = True
        start = self._head.removeprefix(codecs.BOM_UTF8).lstrip().lower()
        if start.startswith(_HTML_PREFIXES):
            raise _AttemptError(
                "the server returned an HTML page instead of plain text",
                "content",
            )

    def _decode(self, chunk: bytes, final: bool) -> None:
        # The decoder keeps the bytes of an incomplete character from the
        # previous chunk, and error offsets count from the first of them.
        pending = len(self._decoder.getstate()[0])
        try:
            self._decoder.decode(chunk, final)
        except UnicodeDecodeError as exc:
            offset = self.size - pending + exc.start
            raise _AttemptError(
                "the body is not valid UTF-8 "
                f"(invalid byte at offset {offset})",
                "content",
            ) from exc


def _request_error(
    exc: requests.RequestException, timeout: float
) -> _AttemptError:
    invalid_url_errors = (
        requests.exceptions.MissingSchema,
        requests.exceptions.InvalidSchema,
        requests.exceptions.InvalidURL,
    )
    if isinstance(exc, invalid_url_errors):
        return _AttemptError(f"invalid URL ({_one_line(exc)})", "request")
    if _is_timeout(exc):
        return _AttemptError(f"timed out after {timeout:g} s", "network")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return _AttemptError(
            f"the connection broke during the transfer ({_os_reason(exc)})",
            "network",
        )
    if isinstance(exc, requests.ConnectionError):
        return _AttemptError(
            f"the connection failed ({_os_reason(exc)})", "network"
        )
    return _AttemptError(f"the request failed ({_one_line(exc)})", "request")


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and the exceptions it wraps, depth first.

    requests and urllib3 wrap the underlying error in ``args[0]``, in
    ``reason`` (``MaxRetryError``) or in ``__cause__`` and ``__context__``.
    """
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current

        wrapped = [
            current.__context__,
            current.__cause__,
            getattr(current, "reason", None),
        ]
        if current.args:
            wrapped.append(current.args[0])
        stack.extend(e for e in wrapped if isinstance(e, BaseException))


def _is_timeout(exc: requests.RequestException) -> bool:
    if isinstance(exc, requests.Timeout):
        return True
    # A read timeout while streaming the body arrives as a ConnectionError
    # that wraps urllib3's ReadTimeoutError. The check names that class
    # rather than urllib3's TimeoutError, because urllib3 2.x also derives
    # NewConnectionError (connection refused, DNS failure) from TimeoutError.
    return any(
        isinstance(wrapped, urllib3.exceptions.ReadTimeoutError)
        for wrapped in _exception_chain(exc)
    )


def _os_reason(exc: BaseException) -> str:
    """Return the innermost OS error text, such as ``Connection refused``."""
    reason = None
    for wrapped in _exception_chain(exc):
        if isinstance(wrapped, OSError) and wrapped.strerror:
            reason = wrapped.strerror
    return reason or _one_line(exc)


def _one_line(exc: BaseException, max_length: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > max_length:
        text = text[: max_length - 3] + "..."
    return text


def _failure_message(
    url: str, path: pathlib.Path, exc: _AttemptError, attempts: int
) -> str:
    fallback = (
        "Pass --text FILE to train on a local UTF-8 text file instead, "
        f"or place the file at {path}"
    )
    attempt_text = "1 attempt" if attempts == 1 else f"{attempts} attempts"
    head = f"Could not download {url}: {exc.reason}"

    if exc.kind == "network":
        return (
            f"{head} after {attempt_text}. The machine seems to be offline or "
            f"the server is unreachable. {fallback}."
        )
    if exc.kind == "server":
        return f"{head} after {attempt_text}. Try again later. {fallback}."
    if exc.kind == "client":
        return f"{head}. Check the URL. {fallback}."
    if exc.kind == "content":
        return (
            f"{head}. Check that the URL points to a plain UTF-8 text file. "
            f"{fallback}."
        )
    return f"{head}. Check the URL. {fallback}."


def _cache_folder_error(
    url: str, folder: pathlib.Path, exc: OSError
) -> DownloadError:
    reason = exc.strerror or _one_line(exc)
    return DownloadError(
        f"Could not download {url}: cannot write to the cache folder "
        f"{folder} ({reason}). Choose a writable folder with --cache-dir DIR "
        f"or the {CACHE_DIR_ENV} environment variable."
    )
