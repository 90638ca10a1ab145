"""Tests for util/io/download.py against a local HTTP server on 127.0.0.1."""

import hashlib
import http.server
import logging
import os
import re
import threading

import pytest

from util.io import download as download_module
from util.io.download import ASSETS, DownloadError, download, main


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; supports Range, injected drops, error statuses and early resumes."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        with srv.lock:
            srv.requests.append((self.path, self.headers.get("Range")))
            drop_after = srv.drop_after.pop(self.path, None)
            queued = srv.fail_with.get(self.path)
            status = queued.pop(0) if queued else None
            early = srv.resume_early.pop(self.path, 0)
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        if status is not None:
            self.send_error(status)
            return

        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and srv.honor_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start -= early  # a server resuming before the byte asked for
            self.send_response(206)
            total = "*" if srv.total_unknown else len(data)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{total}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop_after is not None:
            # Promise the full body, send part of it, then hang up.
            self.wfile.write(body[:drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.files, srv.requests, srv.drop_after, srv.fail_with, srv.resume_early = {}, [], {}, {}, {}
    srv.honor_range = True
    srv.total_unknown = False  # Content-Range "bytes START-END/*"
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()
FAST = dict(progress=False, backoff=0.0, chunk_size=1 << 14, timeout=10)


def test_full_download_verifies(server, tmp_path):
    server.files["/w.bin"] = DATA
    dest = tmp_path / "sub" / "w.bin"
    out = download(server.base + "/w.bin", dest, sha256=SHA, size=len(DATA), **FAST)
    assert out == dest
    assert dest.read_bytes() == DATA
    assert not (tmp_path / "sub" / "w.bin.part").exists()


def test_existing_file_is_skipped(server, tmp_path):
    server.files["/w.bin"] = DATA
    dest = tmp_path / "w.bin"
    dest.write_bytes(DATA)
    download(server.base + "/w.bin", dest, sha256=SHA, **FAST)
    assert server.requests == []


def test_resume_across_calls_uses_range(server, tmp_path):
    server.files["/w.bin"] = DATA
    cut = 123_456
    server.drop_after["/w.bin"] = cut
    dest = tmp_path / "w.bin"
    part = tmp_path / "w.bin.part"
    with pytest.raises(DownloadError):
        download(server.base + "/w.bin", dest, sha256=SHA, retries=0, **FAST)
    assert not dest.exists()
    assert part.read_bytes() == DATA[:cut]

    download(server.base + "/w.bin", dest, sha256=SHA, retries=0, **FAST)
    assert server.requests[-1] == ("/w.bin", f"bytes={cut}-")
    assert dest.read_bytes() == DATA
    assert not part.exists()


def test_retry_within_one_call(server, tmp_path):
    server.files["/w.bin"] = DATA
    server.drop_after["/w.bin"] = 1000
    dest = tmp_path / "w.bin"
    download(server.base + "/w.bin", dest, sha256=SHA, retries=2, **FAST)
    assert dest.read_bytes() == DATA
    assert [r for _, r in server.requests] == [None, "bytes=1000-"]


def test_retry_on_server_error(server, tmp_path, monkeypatch):
    server.files["/w.bin"] = DATA
    server.fail_with["/w.bin"] = [503, 500]
    dest = tmp_path / "w.bin"
    waits = []
    monkeypatch.setattr(download_module.time, "sleep", waits.append)
    download(server.base + "/w.bin", dest, sha256=SHA, retries=2, **{**FAST, "backoff": 1.5})
    assert dest.read_bytes() == DATA
    assert len(server.requests) == 3
    assert waits == [1.5, 3.0]  # backoff x 2^(k - 1) before retry k


def test_server_ignoring_range_restarts(server, tmp_path):
    server.files["/w.bin"] = DATA
    server.honor_range = False
    (tmp_path / "w.bin.part").write_bytes(b"garbage" * 10)
    dest = tmp_path / "w.bin"
    download(server.base + "/w.bin", dest, sha256=SHA, retries=0, **FAST)
    assert server.requests == [("/w.bin", "bytes=70-")]
    assert dest.read_bytes() == DATA


def test_complete_part_gets_416_and_is_verified(server, tmp_path):
    server.files["/w.bin"] = DATA
    (tmp_path / "w.bin.part").write_bytes(DATA)
    dest = tmp_path / "w.bin"
    download(server.base + "/w.bin", dest, sha256=SHA, retries=0, **FAST)
    assert server.requests == [("/w.bin", f"bytes={len(DATA)}-")]
    assert dest.read_bytes() == DATA


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    server.files["/w.bin"] = DATA
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError) as info:
        download(server.base + "/w.bin", dest, sha256="0" * 64, **FAST)
    msg = str(info.value)
    assert "w.bin" in msg and "0" * 64 in msg and SHA in msg and "\n" not in msg
    assert not dest.exists()
    assert not (tmp_path / "w.bin.part").exists()


def test_size_mismatch_leaves_nothing(server, tmp_path):
    server.files["/w.bin"] = DATA
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError, match=f"expected {len(DATA) + 1} bytes, got {len(DATA)}"):
        download(server.base + "/w.bin", dest, size=len(DATA) + 1, **FAST)
    assert not dest.exists()
    assert not (tmp_path / "w.bin.part").exists()


def test_404_fails_without_retry(server, tmp_path):
    dest = tmp_path / "missing.bin"
    url = server.base + "/missing.bin"
    with pytest.raises(DownloadError, match="404") as info:
        download(url, dest, retries=3, **FAST)
    assert url in str(info.value)
    assert len(server.requests) == 1
    assert not dest.exists()


def test_cli_url_override(server, tmp_path):
    server.files["/kl16.ckpt"] = DATA
    rc = main(["kl16", "--url", server.base + "/kl16.ckpt", "--dest-root", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    assert (tmp_path / ASSETS["kl16"].relpath).read_bytes() == DATA
    assert ASSETS["kl16"].relpath == "pretrained_models/vae/kl16.ckpt"


def test_cli_manual_asset_exits_2(tmp_path, caplog):
    assert ASSETS["arinar_b"].url is None
    with caplog.at_level(logging.INFO, logger="util.download"):
        rc = main(["arinar_b", "--dest-root", str(tmp_path)])
    assert rc == 2
    expected = tmp_path / "pretrained_models" / "arinar" / "arinar_b" / "checkpoint-last.pth"
    assert str(expected) in caplog.text
    assert "github.com/Qinyu-Allen-Zhao/Arinar" in caplog.text
    assert not expected.exists()


def test_mar_release_links():
    links = {"base": "f6dpuyjb7fudzxcyhvrhk/checkpoint-last.pth?rlkey=a6i4bo71vhfo4anp33n9ukujb",
             "large": "pxacc5b2mrt3ifw4cah6k/checkpoint-last.pth?rlkey=m48ovo6g7ivcbosrbdaz0ehqt",
             "huge": "1qmfx6fpy3k7j9vcjjs3s/checkpoint-last.pth?rlkey=4lae281yzxb406atp32vzc83o"}
    for size, link in links.items():
        asset = ASSETS[f"mar_{size}"]
        assert asset.url == f"https://www.dropbox.com/scl/fi/{link}&dl=1"
        assert asset.relpath == f"pretrained_models/mar/mar_{size}/checkpoint-last.pth"


def test_complete_part_of_known_size_needs_no_request(server, tmp_path):
    """Bug: `offset >= size` for `>`: a complete part of the known size deleted and fetched again."""
    server.files["/w.bin"] = DATA
    (tmp_path / "w.bin.part").write_bytes(DATA)
    dest = tmp_path / "w.bin"
    download(server.base + "/w.bin", dest, sha256=SHA, size=len(DATA), retries=0, **FAST)
    assert server.requests == []
    assert dest.read_bytes() == DATA


@pytest.mark.parametrize("total_unknown", [False, True])
def test_resume_at_an_earlier_byte_restarts(server, tmp_path, total_unknown):
    """Bug: only a later resume point refused; a 206 starting before the part's end would duplicate bytes
    (no size or checksum is published for MAR's checkpoints, so nothing else would notice). Content-Range may
    give the total as "*" (RFC 9110); its start is still checked (bug: a pattern for a numeric total only)."""
    server.files["/w.bin"] = DATA
    server.total_unknown = total_unknown
    server.resume_early["/w.bin"] = 100
    (tmp_path / "w.bin.part").write_bytes(DATA[:5000])
    dest = tmp_path / "w.bin"
    download(server.base + "/w.bin", dest, retries=1, **FAST)
    assert dest.read_bytes() == DATA
    assert server.requests == [("/w.bin", "bytes=5000-"), ("/w.bin", None)]


@pytest.mark.parametrize("tail", [b"stale tail", b"x"])
def test_part_longer_than_the_remote_file_restarts(server, tmp_path, tail):
    """Bug: a 416 taken as 'already complete' although Content-Range says the file is shorter than the part.
    The total must equal the part's length exactly: one stray byte too many is not a complete file (nothing
    else checks MAR's checkpoints; bug: an off-by-one comparison keeping DATA + 1 byte)."""
    server.files["/w.bin"] = DATA
    (tmp_path / "w.bin.part").write_bytes(DATA + tail)
    dest = tmp_path / "w.bin"
    download(server.base + "/w.bin", dest, retries=1, **FAST)
    assert dest.read_bytes() == DATA
    assert server.requests == [("/w.bin", f"bytes={len(DATA) + len(tail)}-"), ("/w.bin", None)]


@pytest.mark.parametrize("status", [408, 429])
def test_retry_on_a_request_timeout_or_too_many_requests(server, tmp_path, status):
    """Bug: 408 Request Timeout or 429 Too Many Requests treated as a permanent 4xx failure."""
    server.files["/w.bin"] = DATA
    server.fail_with["/w.bin"] = [status]
    dest = tmp_path / "w.bin"
    download(server.base + "/w.bin", dest, sha256=SHA, retries=1, **FAST)
    assert dest.read_bytes() == DATA
    assert len(server.requests) == 2


def test_existing_file_with_the_wrong_checksum_is_fetched_again(server, tmp_path):
    """Bug: an existing file checked by size only: same-size corrupt bytes kept as verified."""
    server.files["/w.bin"] = DATA
    dest = tmp_path / "w.bin"
    dest.write_bytes(bytes(len(DATA)))
    download(server.base + "/w.bin", dest, sha256=SHA, size=len(DATA), retries=0, **FAST)
    assert dest.read_bytes() == DATA
    assert server.requests == [("/w.bin", None)]


def test_a_checksum_in_upper_case_verifies(server, tmp_path):
    """A published digest may be written in capitals. Bug: the digests compared as written (a good file
    refused and deleted)."""
    server.files["/w.bin"] = DATA
    dest = tmp_path / "w.bin"
    download(server.base + "/w.bin", dest, sha256=SHA.upper(), retries=0, **FAST)
    assert dest.read_bytes() == DATA
    download(server.base + "/w.bin", dest, sha256=SHA.upper(), retries=0, **FAST)  # present: verified, kept
    assert len(server.requests) == 1


def test_a_file_longer_than_its_known_size_is_refused(server, tmp_path):
    """Bug: the size checked as a lower bound only (trailing bytes kept as verified)."""
    server.files["/w.bin"] = DATA
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError, match=f"expected {len(DATA) - 1} bytes, got {len(DATA)}"):
        download(server.base + "/w.bin", dest, size=len(DATA) - 1, retries=0, **FAST)
    assert not dest.exists() and not (tmp_path / "w.bin.part").exists()


def test_a_manual_asset_already_in_place_is_kept(tmp_path):
    """An asset without a link that the user has put in place: found, exit 0. Bug: the presence check
    dropped (asked for by hand again, exit 2)."""
    dest = tmp_path / ASSETS["arinar_b"].relpath
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"weights")
    assert download_module.fetch_asset("arinar_b", tmp_path) == dest
    assert main(["arinar_b", "--dest-root", str(tmp_path), "--no-progress"]) == 0
    assert dest.read_bytes() == b"weights"


def test_cli_a_failed_download_exits_1_even_when_a_manual_step_remains(server, tmp_path, monkeypatch):
    """Exit 1 (a download failed) outranks exit 2 (fetch something by hand). Bug: the order swapped, so a
    script that retries on 1 and reports on 2 never retried."""
    import dataclasses
    monkeypatch.setitem(ASSETS, "kl16", dataclasses.replace(ASSETS["kl16"], url=server.base + "/gone"))
    assert main(["kl16", "arinar_b", "--dest-root", str(tmp_path), "--no-progress"]) == 1
    assert main(["arinar_b", "--dest-root", str(tmp_path), "--no-progress"]) == 2


def test_cli_url_with_two_assets_is_a_usage_error(server, tmp_path):
    """--url names one source: with two asset names it is refused before anything is fetched. Bug: the
    check let two names through (both written from the one URL)."""
    server.files["/x.bin"] = DATA
    with pytest.raises(SystemExit) as info:
        main(["kl16", "adm_in256_stats", "--url", server.base + "/x.bin", "--dest-root", str(tmp_path)])
    assert info.value.code == 2
    assert server.requests == [] and list(tmp_path.iterdir()) == []


def test_416_to_a_request_without_range_is_a_plain_http_error(server, tmp_path):
    """416 means "the part is complete" only in answer to a Range request; to a fresh GET it is the server's
    error, reported as such, without retries. Bug: every 416 taken as a complete part ("nothing was downloaded")."""
    server.files["/w.bin"] = DATA
    server.fail_with["/w.bin"] = [416, 416]
    with pytest.raises(DownloadError, match="HTTP 416"):
        download(server.base + "/w.bin", tmp_path / "w.bin", retries=1, **FAST)
    assert server.requests == [("/w.bin", None)]


def test_a_file_that_fails_verification_is_removed_even_when_the_new_download_fails(server, tmp_path):
    """An existing file with the wrong checksum is deleted before fetching again, so a failed fetch leaves no
    corrupt file for --vae_path / --resume to read. Bug: the unlink dropped (the rename would replace it only
    on success)."""
    dest = tmp_path / "w.bin"
    dest.write_bytes(b"corrupt")
    with pytest.raises(DownloadError, match="404"):
        download(server.base + "/w.bin", dest, sha256=SHA, retries=0, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_416_without_content_range_to_a_range_request_keeps_the_part(server, tmp_path):
    """A 416 that gives no total (Content-Range is optional) answers the Range request: the part is taken as
    complete and verified, not thrown away. Bug: a missing total read as "longer than the remote file"."""
    server.files["/w.bin"] = DATA
    server.fail_with["/w.bin"] = [416]  # send_error: no Content-Range header
    (tmp_path / "w.bin.part").write_bytes(DATA)
    dest = tmp_path / "w.bin"
    download(server.base + "/w.bin", dest, sha256=SHA, retries=1, **FAST)
    assert dest.read_bytes() == DATA
    assert server.requests == [("/w.bin", f"bytes={len(DATA)}-")]
