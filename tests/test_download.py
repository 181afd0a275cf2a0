"""Tests of adlib.download against a local HTTP server on 127.0.0.1.

The server runs in a thread, binds an OS-chosen port on 127.0.0.1 only and is shut
down by its fixture. It serves in-memory files and honours ``Range: bytes=N-``,
except under ``/norange/``, which ignores the header, and ``/badrange/``, which
sends the whole file as a 206 response. Under ``/truncated/`` it sends half of
the promised bytes.
"""

from __future__ import annotations

import http.server
import logging
import re
import tarfile
import threading
from pathlib import Path

import pytest

from adlib import download
from adlib.download import (
    ArchiveSpec,
    ChecksumMismatchError,
    DownloadError,
    UnsafeArchiveError,
    download_archive,
    ensure_dataset,
    extract_archive,
    missing_dataset_parts,
)
from adlib.visa import VISA_CATEGORIES, load_visa_category
from fixtures_data import (
    link_member,
    make_mvtec_category,
    make_visa_tree,
    sha256_hex,
    tar_bytes,
    tar_with_members,
    zip_bytes,
)

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        files, requests = self.server.files, self.server.requests
        requests.append((self.path, self.headers.get("Range")))
        name = re.sub(r"^/(norange|badrange|truncated)/", "/", self.path)
        if name not in files:
            self.send_error(404)
            return
        body = files[name]
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and self.path.startswith("/badrange/"):
            self._send_range(body, 0)
            return
        if match and not self.path.startswith("/norange/"):
            self._send_range(body, int(match.group(1)))
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.path.startswith("/truncated/") else body)

    def _send_range(self, body: bytes, start: int):
        if start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, format, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server(monkeypatch):
    """A running local server. Put files in ``server.files`` ({"/name": bytes})."""
    # Requests to the test server must never go through a proxy configured on the machine.
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests = {}, []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def good_archive(tmp_path) -> bytes:
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("alpha")
    (source / "sub" / "b.txt").write_text("beta")
    return tar_bytes(source, mode="w:xz")


# --- download_archive ---------------------------------------------------------

def test_download_verifies_and_renames(server, tmp_path):
    server.files["/file.bin"] = PAYLOAD
    destination = tmp_path / "out" / "file.bin"
    result = download_archive(f"{server.url}/file.bin", destination, sha256=sha256_hex(PAYLOAD), progress=False)
    assert result == destination
    assert destination.read_bytes() == PAYLOAD
    assert not (tmp_path / "out" / "file.bin.part").exists()


def test_download_rejects_corrupted_file(server, tmp_path):
    server.files["/file.bin"] = PAYLOAD
    destination = tmp_path / "file.bin"
    with pytest.raises(ChecksumMismatchError, match="Deleted .*file.bin.part"):
        download_archive(f"{server.url}/file.bin", destination, sha256=sha256_hex(b"other"), progress=False)
    assert not destination.exists()
    assert not (tmp_path / "file.bin.part").exists()


def test_download_resumes_from_part(server, tmp_path):
    server.files["/file.bin"] = PAYLOAD
    half = len(PAYLOAD) // 2
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:half])
    download_archive(f"{server.url}/file.bin", tmp_path / "file.bin", sha256=sha256_hex(PAYLOAD), progress=False)
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD
    assert server.requests == [("/file.bin", f"bytes={half}-")]


def test_download_restarts_when_range_ignored(server, tmp_path):
    server.files["/file.bin"] = PAYLOAD
    (tmp_path / "file.bin.part").write_bytes(b"stale bytes")
    download_archive(f"{server.url}/norange/file.bin", tmp_path / "file.bin",
                     sha256=sha256_hex(PAYLOAD), progress=False)
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD


def test_download_wrong_content_range(server, tmp_path):
    server.files["/file.bin"] = PAYLOAD
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:100])
    with pytest.raises(DownloadError, match="responded to a Range request from byte 100 with Content-Range "
                                            "'bytes 0-10239/10240'"):
        download_archive(f"{server.url}/badrange/file.bin", tmp_path / "file.bin", verify=False, progress=False)
    assert (tmp_path / "file.bin.part").read_bytes() == PAYLOAD[:100]


def test_download_complete_part_gets_416(server, tmp_path):
    server.files["/file.bin"] = PAYLOAD
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD)
    download_archive(f"{server.url}/file.bin", tmp_path / "file.bin", sha256=sha256_hex(PAYLOAD), progress=False)
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD
    assert server.requests == [("/file.bin", f"bytes={len(PAYLOAD)}-")]


def test_download_oversized_part_starts_over(server, tmp_path):
    server.files["/file.bin"] = PAYLOAD
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD + b"extra")
    download_archive(f"{server.url}/file.bin", tmp_path / "file.bin", sha256=sha256_hex(PAYLOAD), progress=False)
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/file.bin", None)


def test_download_truncated_then_resumed(server, tmp_path):
    server.files["/file.bin"] = PAYLOAD
    destination = tmp_path / "file.bin"
    with pytest.raises(DownloadError, match="stopped after 5120 of 10240 bytes; rerun to resume"):
        download_archive(f"{server.url}/truncated/file.bin", destination,
                         sha256=sha256_hex(PAYLOAD), progress=False)
    assert (tmp_path / "file.bin.part").read_bytes() == PAYLOAD[:5120]
    download_archive(f"{server.url}/file.bin", destination, sha256=sha256_hex(PAYLOAD), progress=False)
    assert destination.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/file.bin", "bytes=5120-")


def test_download_http_error(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_archive(f"{server.url}/missing.bin", tmp_path / "x", sha256="0" * 64, progress=False)


def test_download_unreachable_server(server, tmp_path):
    url = f"{server.url}/file.bin"
    server.shutdown()
    server.server_close()
    with pytest.raises(DownloadError, match="Connection to .* failed"):
        download_archive(url, tmp_path / "x", sha256="0" * 64, progress=False, timeout=5)


def test_download_requires_checksum(tmp_path):
    with pytest.raises(ValueError, match="No SHA-256 given .* verify=False"):
        download_archive("https://example.invalid/a.tar", tmp_path / "a.tar")
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        download_archive("https://example.invalid/a.tar", tmp_path / "a.tar", sha256="abc")


def test_download_rejects_other_schemes(tmp_path):
    with pytest.raises(ValueError, match="Only http and https"):
        download_archive("file:///etc/hostname", tmp_path / "x", sha256="0" * 64)


def test_download_without_verify_warns(server, tmp_path, caplog):
    server.files["/file.bin"] = PAYLOAD
    with caplog.at_level(logging.WARNING, logger="adlib.download"):
        download_archive(f"{server.url}/file.bin", tmp_path / "file.bin", verify=False, progress=False)
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD
    assert "Did not verify file.bin" in caplog.text


def test_download_existing_file_checked(server, tmp_path):
    existing = tmp_path / "file.bin"
    existing.write_bytes(PAYLOAD)
    result = download_archive(f"{server.url}/file.bin", existing, sha256=sha256_hex(PAYLOAD), progress=False)
    assert result == existing
    assert server.requests == []
    with pytest.raises(ChecksumMismatchError, match="Delete the file and rerun"):
        download_archive(f"{server.url}/file.bin", existing, sha256=sha256_hex(b"other"), progress=False)
    assert existing.exists()


# --- extract_archive ------------------------------------------------------------

def test_extract_good_tar_xz(tmp_path, good_archive):
    archive = tmp_path / "good.tar.xz"
    archive.write_bytes(good_archive)
    extract_archive(archive, tmp_path / "target")
    assert (tmp_path / "target" / "a.txt").read_text() == "alpha"
    assert (tmp_path / "target" / "sub" / "b.txt").read_text() == "beta"


def test_extract_good_zip(tmp_path):
    archive = tmp_path / "good.zip"
    archive.write_bytes(zip_bytes({"dir/c.txt": b"gamma"}, symlinks={"dir/inside": "c.txt"}))
    extract_archive(archive, tmp_path / "target")
    assert (tmp_path / "target" / "dir" / "c.txt").read_bytes() == b"gamma"
    assert not (tmp_path / "target" / "dir" / "inside").is_symlink()


UNSAFE_TAR_MEMBERS = {
    "traversal": ([tarfile.TarInfo("../evil.txt")], r"'\.\./evil\.txt' .* contains a '\.\.' component"),
    "inner traversal": ([tarfile.TarInfo("a/../../evil.txt")], r"'a/\.\./\.\./evil\.txt'"),
    "absolute": ([tarfile.TarInfo("/tmp/evil.txt")], r"'/tmp/evil\.txt' .* absolute path"),
    "symlink outside": ([link_member("sub/link", "../../outside")], r"'sub/link' .* symlink to '\.\./\.\./outside'"),
    "absolute symlink": ([link_member("link", "/etc/passwd")], r"'link' .* symlink to '/etc/passwd'"),
    "hard link outside": ([link_member("hard", "../outside", hard=True)], r"'hard' .* hard link"),
    "file under link": ([link_member("up", "sub"), tarfile.TarInfo("up/file.txt")],
                        r"'up/file\.txt' .* stored under the link 'up'"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_TAR_MEMBERS))
def test_extract_rejects_unsafe_tar(tmp_path, case):
    members, message = UNSAFE_TAR_MEMBERS[case]
    archive = tmp_path / "bad.tar"
    archive.write_bytes(tar_with_members([tarfile.TarInfo("harmless.txt"), *members]))
    with pytest.raises(UnsafeArchiveError, match=message):
        extract_archive(archive, tmp_path / "target")
    assert not (tmp_path / "target" / "harmless.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_extract_rejects_device(tmp_path):
    member = tarfile.TarInfo("device")
    member.type = tarfile.CHRTYPE
    archive = tmp_path / "bad.tar"
    archive.write_bytes(tar_with_members([member]))
    with pytest.raises(UnsafeArchiveError, match="'device' .* device or FIFO"):
        extract_archive(archive, tmp_path / "target")


def test_extract_accepts_inside_symlink(tmp_path):
    archive = tmp_path / "ok.tar"
    archive.write_bytes(tar_with_members([tarfile.TarInfo("sub/real.txt"), link_member("sub/link", "real.txt")]))
    extract_archive(archive, tmp_path / "target")
    assert (tmp_path / "target" / "sub" / "link").read_bytes() == b"data"


@pytest.mark.parametrize("files, symlinks, message", [
    ({"../evil.txt": b"x"}, None, r"'\.\./evil\.txt' .* '\.\.' component"),
    ({"/abs.txt": b"x"}, None, r"'/abs\.txt' .* absolute path"),
    ({"ok.txt": b"x"}, {"link": "../../outside"}, r"'link' .* symlink to '\.\./\.\./outside'"),
])
def test_extract_rejects_unsafe_zip(tmp_path, files, symlinks, message):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(zip_bytes(files, symlinks=symlinks))
    with pytest.raises(UnsafeArchiveError, match=message):
        extract_archive(archive, tmp_path / "target")


def test_extract_rejects_other_files(tmp_path):
    archive = tmp_path / "notes.txt"
    archive.write_text("not an archive")
    with pytest.raises(ValueError, match="neither a tar nor a zip"):
        extract_archive(archive, tmp_path / "target")


def test_download_then_reject_malicious_archive(server, tmp_path):
    content = tar_with_members([tarfile.TarInfo("../evil.txt"), link_member("link", "../../outside")])
    server.files["/bad.tar"] = content
    archive = download_archive(f"{server.url}/bad.tar", tmp_path / "bad.tar", sha256=sha256_hex(content),
                               progress=False)
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./evil\.txt'"):
        extract_archive(archive, tmp_path / "target")
    assert not (tmp_path / "evil.txt").exists()


# --- ensure_dataset ---------------------------------------------------------------

@pytest.fixture
def visa_registry(server, tmp_path) -> dict[str, ArchiveSpec]:
    source = make_visa_tree(tmp_path / "visa_source", VISA_CATEGORIES, n_train=1, n_test_normal=1, n_anomalous=1)
    content = tar_bytes(source, mode="w")
    server.files["/VisA_20220922.tar"] = content
    spec = ArchiveSpec(f"{server.url}/VisA_20220922.tar", "VisA_20220922.tar", sha256_hex(content), "visa", "CC BY 4.0")
    return {"visa": spec}


def test_ensure_downloads_and_extracts(tmp_path, visa_registry):
    data_root = tmp_path / "data"
    root = ensure_dataset("visa", data_root, download=True, progress=False, registry=visa_registry)
    assert root == data_root / "visa"
    assert load_visa_category(root, "candle").train_ids == ("candle/Data/Images/Normal/0000.JPG",)
    assert not (data_root / "downloads" / "VisA_20220922.tar").exists()
    assert not list(root.glob(download.EXTRACTING_MARKER + "*"))


def test_ensure_keeps_archive_on_request(tmp_path, visa_registry):
    ensure_dataset("visa", tmp_path, download=True, progress=False, keep_archive=True, registry=visa_registry)
    assert (tmp_path / "downloads" / "VisA_20220922.tar").is_file()


def test_ensure_present_copy_needs_no_server(tmp_path):
    make_visa_tree(tmp_path / "visa", VISA_CATEGORIES, n_train=1, n_test_normal=1, n_anomalous=1)
    assert ensure_dataset("visa", tmp_path, download=False) == tmp_path / "visa"


def test_ensure_missing_without_download(tmp_path):
    expected = re.escape(str(tmp_path / "visa"))
    with pytest.raises(FileNotFoundError, match=f"visa is missing or incomplete in {expected}"):
        ensure_dataset("visa", tmp_path, download=False)


def test_ensure_names_missing_category_folder(tmp_path):
    make_visa_tree(tmp_path / "visa", ("candle",))
    with pytest.raises(FileNotFoundError, match="no capsules/Data/Images"):
        ensure_dataset("visa", tmp_path, download=False)


def test_ensure_reports_interrupted_extraction(tmp_path):
    make_mvtec_category(tmp_path / "mvtec_ad", "bottle")
    (tmp_path / "mvtec_ad" / (download.EXTRACTING_MARKER + "mvtec_ad")).write_text("")
    with pytest.raises(FileNotFoundError, match="interrupted extraction"):
        ensure_dataset("mvtec_ad/bottle", tmp_path, download=False)


def test_ensure_mvtec_category_from_local_server(server, tmp_path):
    source = tmp_path / "source"
    make_mvtec_category(source, "bottle")
    content = tar_bytes(source, mode="w:xz")
    server.files["/bottle.tar.xz"] = content
    registry = {"mvtec_ad/bottle": ArchiveSpec(f"{server.url}/bottle.tar.xz", "bottle.tar.xz", None,
                                               "mvtec_ad", "CC BY-NC-SA 4.0")}
    with pytest.raises(ValueError, match="No SHA-256 is known for the mvtec_ad/bottle archive"):
        ensure_dataset("mvtec_ad/bottle", tmp_path / "data", download=True, registry=registry)
    root = ensure_dataset("mvtec_ad/bottle", tmp_path / "data", download=True, verify=False,
                          progress=False, registry=registry)
    assert root == tmp_path / "data" / "mvtec_ad"
    assert missing_dataset_parts("mvtec_ad/bottle", root) == []


def test_ensure_archive_with_wrong_layout(server, tmp_path):
    source = tmp_path / "source"
    (source / "unrelated").mkdir(parents=True)
    (source / "unrelated" / "file.txt").write_text("x")
    content = tar_bytes(source)
    server.files["/visa.tar.gz"] = content
    registry = {"visa": ArchiveSpec(f"{server.url}/visa.tar.gz", "visa.tar.gz", sha256_hex(content), "visa", "")}
    with pytest.raises(FileNotFoundError, match="does not have the expected layout"):
        ensure_dataset("visa", tmp_path / "data", download=True, progress=False, registry=registry)


def test_ensure_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset archive 'mvtec_ad/widget'"):
        ensure_dataset("mvtec_ad/widget", tmp_path, download=False)


@pytest.mark.parametrize("name", ["btad", "bottle", "mvtec_ad/widget"])
def test_missing_parts_rejects_unknown_layout(tmp_path, name):
    with pytest.raises(ValueError, match=f"No layout is known for '{name}'"):
        missing_dataset_parts(name, tmp_path)


def test_registry_lists_every_archive():
    assert sorted(download.ARCHIVES) == sorted(["mvtec_ad", "visa", *(f"mvtec_ad/{c}" for c in download.MVTEC_CATEGORIES)])
    for name, spec in download.ARCHIVES.items():
        assert spec.url.startswith("https://"), name
        assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256), name
    assert download.ARCHIVES["mvtec_ad/pill"].url.endswith("/pill.tar.xz")

