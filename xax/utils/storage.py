"""Where a run's files live: a local folder, or an object store reached by URL (``gs://``, ``s3://``).

Paths are ``etils.epath`` paths (as orbax's), so one code path reads and writes either. The
filesystem of a URL comes from fsspec (``gcsfs``, ``s3fs``); the arrays of a checkpoint are written
by TensorStore, which reaches local folders, Google Cloud Storage and S3 (or an S3-compatible server).
"""

import logging
import re
import threading
from pathlib import Path
from typing import Any

from etils import epath

from xax.core.errors import ConfigError
from xax.utils.env import user_cache_dir

logger = logging.getLogger(__name__)

# Each supported URL scheme, and the package that gives fsspec (and so epath) its filesystem.
REMOTE_SCHEMES: dict[str, str] = {"gs": "gcsfs", "s3": "s3fs"}

_SCHEME_RE = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")


def url_scheme(location: str) -> str | None:
    """The scheme of a URL (``"s3"`` for ``s3://bucket/key``), or None for a plain path.

    Examples:
        >>> url_scheme("s3://bucket/runs"), url_scheme("runs/mnist"), url_scheme("file:///tmp/runs")
        ('s3', None, 'file')
    """
    match = _SCHEME_RE.match(location)
    return match.group(1).lower() if match else None


def is_remote(location: str | epath.PathLike) -> bool:
    """Whether ``location`` names an object store (``gs://``, ``s3://``) rather than a local folder."""
    return url_scheme(str(location)) in REMOTE_SCHEMES


def storage_path(location: str | epath.PathLike) -> epath.Path:
    """``location`` as a path that reads and writes where it points: a URL of an object store as
    itself, a local path (or ``file://`` URL) made absolute with ``~`` expanded.

    Examples:
        >>> str(storage_path("s3://bucket/runs/exp"))
        's3://bucket/runs/exp'
        >>> storage_path("file:///tmp/runs") == storage_path("/tmp/runs")
        True
    """
    text = str(location)
    if is_remote(text):
        return epath.Path(text)
    if url_scheme(text) == "file":
        text = text.removeprefix("file://")
    return epath.Path(Path(text).expanduser().absolute())


def check_location(location: str, key: str) -> None:
    """Raises ``ConfigError`` naming ``key`` unless ``location`` is a local path or a URL of a
    supported object store whose filesystem is installed, with a bucket.

    Examples:
        >>> check_location("runs/mnist", "artifacts.runs_root")
        >>> try:
        ...     check_location("ftp://host/runs", "artifacts.runs_root")
        ... except ConfigError as error:
        ...     print(error)
        artifacts.runs_root=ftp://host/runs: ftp:// is not supported; use a local folder, gs://... or s3://...
    """
    scheme = url_scheme(location)
    if scheme is None or scheme == "file":
        return
    if scheme not in REMOTE_SCHEMES:
        raise ConfigError(f"{key}={location}: {scheme}:// is not supported; use a local folder, gs://... or s3://...")
    package = REMOTE_SCHEMES[scheme]
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except ImportError:
        raise ConfigError(
            f"{key}={location}: no filesystem for {scheme}:// is installed; pip install {package}"
        ) from None
    if not location[len(scheme) + 3 :].split("/", 1)[0]:
        raise ConfigError(f"{key}={location} names no bucket; write {scheme}://<bucket>/<folder>")


def filesystem(location: str | epath.PathLike) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the path inside it (``(S3FileSystem, "bucket/key")``).

    It is the very instance ``etils.epath`` (and so orbax) uses, so that what one changes, the
    other's cached listings show.
    """
    from etils.epath import backend

    fs = backend.fsspec_backend.fs(str(location))
    return fs, fs._strip_protocol(str(location))


def forget_listings(location: str | epath.PathLike) -> None:
    """Drops the cached listings of ``location`` and below, for a URL (fsspec keeps a folder's
    listing for the life of the process: another process's writes would stay unseen)."""
    if is_remote(location):
        fs, key = filesystem(location)
        fs.invalidate_cache(key)


def local_mirror(location: epath.Path) -> Path:
    """The local folder that holds the files of a run stored at a URL until they are uploaded:
    ``<user cache>/remote/<scheme>/<bucket>/<key>``.

    Examples:
        >>> local_mirror(epath.Path("s3://bucket/exp")).parts[-4:]
        ('remote', 's3', 'bucket', 'exp')
    """
    text = str(location)
    scheme = url_scheme(text)
    if scheme is None:
        raise ValueError(f"{text} is not a URL")
    return user_cache_dir() / "remote" / scheme / text[len(scheme) + 3 :].strip("/")


class Mirror:
    """Uploads the files of a local folder into a folder of an object store, in a background
    thread: every ``every_s`` seconds, when asked (``request``), and once more on ``close``. A file
    is uploaded again only when its size or modification time changed; nothing remote is deleted.

    Args:
        local: The folder written to.
        remote: Where its files go (a ``gs://`` or ``s3://`` URL).
        every_s: Seconds between uploads.
        skip: Names (at any depth) never uploaded.
    """

    def __init__(self, local: Path, remote: epath.Path, every_s: float, skip: frozenset[str] = frozenset()) -> None:
        self.local, self.remote, self.every_s, self.skip = local, remote, every_s, skip
        self._fs, self._key = filesystem(remote)
        self._uploaded: dict[Path, tuple[int, int]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._warned = False

    def pull(self) -> list[str]:
        """Downloads the remote folder's top-level files that are missing here or longer there (the
        logs a run appends to, left by an earlier attempt elsewhere); returns their names."""
        try:
            entries = self._fs.ls(self._key, detail=True)
        except FileNotFoundError:
            return []
        pulled = []
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            local = self.local / name
            if entry.get("type") != "file" or name in self.skip:
                continue
            if local.exists() and local.stat().st_size >= int(entry.get("size") or 0):
                continue
            self.local.mkdir(parents=True, exist_ok=True)
            self._fs.get_file(entry["name"], str(local))
            stat = local.stat()
            self._uploaded[local] = (stat.st_size, stat.st_mtime_ns)
            pulled.append(name)
        return pulled

    def sync(self) -> None:
        """Uploads every file changed since its last upload (blocking).

        Raises:
            OSError: When an upload fails (the files stay in ``local``).
        """
        with self._lock:
            for path in sorted(self.local.rglob("*")):
                if not path.is_file() or self.skip.intersection(path.relative_to(self.local).parts):
                    continue
                stat = path.stat()
                signature = (stat.st_size, stat.st_mtime_ns)
                if self._uploaded.get(path) == signature:
                    continue
                self._fs.put_file(str(path), f"{self._key.rstrip('/')}/{path.relative_to(self.local).as_posix()}")
                self._uploaded[path] = signature

    def start(self) -> None:
        """Starts uploading in the background."""
        self._thread = threading.Thread(target=self._run, name="xax-upload", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Asks the background thread to upload now (returns at once)."""
        self._wake.set()

    def close(self) -> None:
        """Stops the background thread and uploads what is left.

        Raises:
            OSError: When the last upload fails (the files stay in ``local``).
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sync()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.every_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.sync()
            except Exception as error:  # an outage must not stop training: the next upload retries
                if not self._warned:
                    logger.warning("uploading %s to %s failed (%s); retrying", self.local, self.remote, error)
                    self._warned = True
