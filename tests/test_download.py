"""tasks.download against a local HTTP server on 127.0.0.1 (no real network)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.download import check_md5, download_url, looks_like_html, md5sum
from tasks.errors import CorruptDatasetError, DatasetNotFoundError

GOOD = b"PK\x03\x04" + bytes(range(256)) * 40  # a few KiB, not HTML
GOOD_MD5 = hashlib.md5(GOOD).hexdigest()
HTML = b"<!DOCTYPE html>\n<html><body>404: Not Found</body></html>"

# path -> (status, content type, body)
ROUTES: dict[str, tuple[int, str, bytes]] = {
    "/good.zip": (200, "application/zip", GOOD),
    "/wrong.zip": (200, "application/zip", GOOD[:-7] + b"garbage"),
    "/truncated.zip": (200, "application/zip", GOOD[: len(GOOD) // 2]),
    "/page.zip": (200, "text/html; charset=utf-8", HTML),
    # An error page served with a binary content type: caught by its leading bytes.
    "/disguised.zip": (200, "application/octet-stream", b"\n  " + HTML),
    "/missing.zip": (404, "text/plain", b"not found"),
}


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.hits.append(self.path)
        status, ctype, body = ROUTES.get(self.path, (404, "text/plain", b"no route"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would intercept requests to the local server.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_md5sum_matches_hashlib(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(GOOD * 300)  # > 1 MiB: several chunks
    assert md5sum(f) == hashlib.md5(GOOD * 300).hexdigest()
    assert md5sum(f, chunk_size=7) == md5sum(f)


def test_check_md5_names_file_expected_actual_and_fix(tmp_path: Path) -> None:
    f = tmp_path / "data.zip"
    f.write_bytes(GOOD)
    check_md5(f, GOOD_MD5)
    check_md5(f, GOOD_MD5.upper())
    wrong = "0" * 32
    with pytest.raises(CorruptDatasetError) as e:
        check_md5(f, wrong)
    msg = str(e.value)
    assert str(f) in msg and wrong in msg and GOOD_MD5 in msg
    assert "Delete" in msg and "download" in msg
    with pytest.raises(DatasetNotFoundError):
        check_md5(tmp_path / "absent.zip", wrong)


def test_download_good_file(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "good.zip"
    assert download_url(f"{server}/good.zip", dest, GOOD_MD5) == dest
    assert dest.read_bytes() == GOOD
    assert _leftovers(dest.parent) == ["good.zip"]  # no temporary file left behind


def test_existing_good_file_is_not_downloaded_again(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "good.zip"
    dest.write_bytes(GOOD)
    _Handler.hits.clear()
    download_url(f"{server}/good.zip", dest, GOOD_MD5)
    assert _Handler.hits == []


@pytest.mark.parametrize("route", ["/wrong.zip", "/truncated.zip"])
def test_wrong_md5_is_refused_and_nothing_saved(server: str, tmp_path: Path, route: str) -> None:
    dest = tmp_path / "data.zip"
    with pytest.raises(CorruptDatasetError) as e:
        download_url(f"{server}{route}", dest, GOOD_MD5)
    assert GOOD_MD5 in str(e.value) and route in str(e.value)
    assert _leftovers(tmp_path) == []


def test_bad_download_does_not_replace_existing_file(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "data.zip"
    dest.write_bytes(b"old, wrong contents")
    with pytest.raises(CorruptDatasetError):
        download_url(f"{server}/wrong.zip", dest, GOOD_MD5)
    assert dest.read_bytes() == b"old, wrong contents"
    assert _leftovers(tmp_path) == ["data.zip"]


@pytest.mark.parametrize("route", ["/page.zip", "/disguised.zip"])
def test_html_page_is_refused(server: str, tmp_path: Path, route: str) -> None:
    dest = tmp_path / "data.zip"
    # Even with the md5 of the page itself, HTML is never accepted as data.
    html_md5 = hashlib.md5(ROUTES[route][2]).hexdigest()
    with pytest.raises(CorruptDatasetError, match="HTML"):
        download_url(f"{server}{route}", dest, html_md5)
    assert _leftovers(tmp_path) == []


def test_http_error_and_unreachable_host(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "data.zip"
    with pytest.raises(DatasetNotFoundError, match="404"):
        download_url(f"{server}/missing.zip", dest, GOOD_MD5)
    # Port 1 on localhost: connection refused, no network involved.
    with pytest.raises(DatasetNotFoundError, match="by hand"):
        download_url("http://127.0.0.1:1/x.zip", dest, GOOD_MD5, timeout=5)
    assert _leftovers(tmp_path) == []


def test_looks_like_html() -> None:
    assert looks_like_html(b"<!doctype html><html>")
    assert looks_like_html(b"\xef\xbb\xbf  <HTML lang=en>")
    assert not looks_like_html(GOOD[:512])
    assert not looks_like_html(b"\x89PNG\r\n\x1a\n")
