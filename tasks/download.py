"""Verified downloads: a dataset file is either complete and md5-checked at its path, or absent.

The rule (docs/data-formats.md): a download, where a public URL exists, verifies an md5 and never
saves an HTML error page as data. :func:`download_url` streams into a temporary file beside the
destination, refuses HTML (by content-type and by the leading bytes, since some hosts serve error
pages as ``application/octet-stream``), checks the md5, and only then renames the file into place
with :func:`os.replace`, which is atomic on one filesystem, so an interrupted or refused download
never leaves a partial or wrong file at ``dest``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tasks.errors import CorruptDatasetError, DatasetNotFoundError

_CHUNK = 1 << 20
# Leading bytes (after whitespace, lower-cased) that mark an HTML or XML page, not a data file.
_HTML_PREFIXES = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml", b"<!--")


def md5sum(path: str | os.PathLike[str], chunk_size: int = _CHUNK) -> str:
    """Hex md5 digest of the file at ``path``, read in chunks (constant memory)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def check_md5(path: str | os.PathLike[str], md5: str) -> None:
    """Raise :class:`CorruptDatasetError` unless the file at ``path`` has md5 ``md5``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"cannot check the md5 of {path}: no such file")
    actual = md5sum(path)
    if actual != md5.lower():
        raise CorruptDatasetError(
            f"{path} is corrupt or a different version: md5 {actual}, expected {md5.lower()}. "
            "Delete the file and download it again (download=True re-fetches missing files)."
        )


def looks_like_html(head: bytes) -> bool:
    """Whether the leading bytes of a download are an HTML/XML page (for example an error page)."""
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(_HTML_PREFIXES)


def download_url(
    url: str,
    dest: str | os.PathLike[str],
    md5: str,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` and verify its md5; return ``dest``.

    If ``dest`` already exists with the right md5 nothing is downloaded. The download goes to a
    temporary file in ``dest``'s folder and replaces ``dest`` atomically once it has passed every
    check. Raises :class:`DatasetNotFoundError` when the URL cannot be fetched (offline, HTTP
    error) and :class:`CorruptDatasetError` when the server sends an HTML page or bytes whose md5
    differs from ``md5``; in both cases ``dest`` is left untouched and the temporary file removed.
    """
    dest = Path(dest)
    md5 = md5.lower()
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    manual = f"download it by hand from {url} to {dest} (md5 {md5})"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except (urllib.error.URLError, OSError) as e:  # HTTPError is a URLError
                raise DatasetNotFoundError(
                    f"could not download {url}: {e}. Check the network connection, or {manual}"
                ) from e
            with response:
                ctype = (response.headers.get("Content-Type") or "").lower()
                if ctype.startswith(("text/html", "application/xhtml")):
                    raise CorruptDatasetError(
                        f"{url} returned an HTML page (Content-Type {ctype!r}), not the data "
                        f"file; the URL may have moved. Nothing was saved; {manual}"
                    )
                h = hashlib.md5()
                first = True
                try:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        if first and looks_like_html(chunk[:512]):
                            raise CorruptDatasetError(
                                f"{url} returned an HTML page, not the data file; the URL may "
                                f"have moved. Nothing was saved; {manual}"
                            )
                        first = False
                        h.update(chunk)
                        out.write(chunk)
                except OSError as e:  # connection reset, timeout mid-transfer
                    raise DatasetNotFoundError(
                        f"download of {url} was interrupted: {e}. Retry, or {manual}"
                    ) from e
        actual = h.hexdigest()
        if actual != md5:
            raise CorruptDatasetError(
                f"{url} downloaded with md5 {actual}, expected {md5}: the file is truncated, "
                f"corrupt or a different version. Nothing was saved; retry, or {manual}"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
