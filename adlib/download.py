"""Download, verify and safely unpack the published dataset archives.

:func:`download_archive` fetches one file over HTTP(S) into ``<name>.part``, resumes
an interrupted transfer with an HTTP Range request, checks the SHA-256 and renames
the file into place only when the check passes. :func:`extract_archive` unpacks tar
(plain, gz, xz) and zip archives after rejecting members that would be written
outside the target folder. :func:`ensure_dataset` combines both for the archives
in :data:`ARCHIVES`.
"""

from __future__ import annotations

import http.client
import logging
import posixpath
import re
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Mapping
from urllib.parse import urlparse

from tqdm.auto import tqdm

from .backbones import file_sha256
from .visa import MVTEC_CATEGORIES, VISA_CATEGORIES, VISA_SPLIT_FILE

logger = logging.getLogger(__name__)

USER_AGENT = "adlib-download/0.1"
# Name prefix of the file that marks an extraction in progress, see ensure_dataset.
EXTRACTING_MARKER = ".adlib-extracting-"


class DownloadError(OSError):
    """Raised when a server cannot be reached, responds with an HTTP error or stops early."""


class ChecksumMismatchError(ValueError):
    """Raised when a file's SHA-256 differs from the expected one."""


class UnsafeArchiveError(ValueError):
    """Raised when an archive member would be written outside the target folder."""


@dataclass(frozen=True)
class ArchiveSpec:
    """A published dataset archive.

    Attributes
    ----------
    url : str
        HTTP(S) address of the archive.
    filename : str
        File name of the downloaded archive.
    sha256 : str or None
        Hex SHA-256 of the whole archive, or None where no checksum is known.
    folder : str
        Folder under ``data_root`` that the archive is extracted into.
    license : str
    """

    url: str
    filename: str
    sha256: str | None
    folder: str
    license: str


# NOTE: MVTec replaces its mydrive.ch share links from time to time, and the old ones
# then return 404. These are the newest links found in public loaders such as anomalib.
# If one fails, copy the current link from
# https://www.mvtec.com/company/research/datasets/mvtec-ad into a registry of your own.
_MVTEC_WHOLE_URL = ("https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/"
                    "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz")
_MVTEC_CATEGORY_PATHS = {
    "bottle": "150452/132a93367fb17cdf968dfb5c4013f6e7/download/420937370-1629958698",
    "cable": "150453/10f960e07fec2838b2cd512586633a32/download/420937413-1629958794",
    "capsule": "150454/e0ce6dd74eb150f46c0d98131b3703f2/download/420937454-1629958872",
    "carpet": "150455/eac7fbce84d93a5094e13f391170eca4/download/420937484-1629959013",
    "grid": "150456/bb0b2e3dc804ccb8b4485e01f8e4493b/download/420937487-1629959044",
    "hazelnut": "150457/51d49f65e84bdc100ff8035d7dd783ea/download/420937545-1629959162",
    "leather": "150458/923030ce14e10a7d147e95d0f8885f6b/download/420937607-1629959262",
    "metal_nut": "150459/c68856a21dca589b0f8ff6d4ee0f18f4/download/420937637-1629959294",
    "pill": "150460/d4f1c04da67034ccc8d8b5fa3e73f244/download/420938129-1629960351",
    "screw": "150461/242f454cc6385e5693c4fd4b94567d1e/download/420938130-1629960389",
    "tile": "150462/5479f0fdc97bc6fa16eab0cb0cf0109f/download/420938133-1629960456",
    "toothbrush": "150463/895a1a5fb84b958f07417784b060434b/download/420938134-1629960477",
    "transistor": "150464/99b8ea0332438d64fcc2475ee73f9c29/download/420938166-1629960554",
    "wood": "150465/d5b4115b720cdb54d217e75636e6e374/download/420938383-1629960649",
    "zipper": "150466/bd155b557520edaf692d9bfdb915c24a/download/420938385-1629960680",
}
_MVTEC_LICENSE = "CC BY-NC-SA 4.0, MVTec Software GmbH"

# The two checksums are the ones anomalib's MVTecAD and Visa datamodules verify, and
# match the digests that independent users report for the 5,264,982,680-byte MVTec
# archive and the 1,929,840,640-byte VisA archive. No checksum is published for the
# per-category MVTec archives, so they need verify=False.
ARCHIVES: dict[str, ArchiveSpec] = {
    "mvtec_ad": ArchiveSpec(_MVTEC_WHOLE_URL, "mvtec_anomaly_detection.tar.xz",
                            "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
                            "mvtec_ad", _MVTEC_LICENSE),
    **{
        f"mvtec_ad/{category}": ArchiveSpec(
            f"https://www.mydrive.ch/shares/{path}/{category}.tar.xz", f"{category}.tar.xz",
            None, "mvtec_ad", _MVTEC_LICENSE)
        for category, path in _MVTEC_CATEGORY_PATHS.items()
    },
    "visa": ArchiveSpec("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
                        "VisA_20220922.tar",
                        "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
                        "visa", "CC BY 4.0, Amazon.com, Inc."),
}


def download_archive(url: str, destination: str | Path, *, sha256: str | None = None,
                     verify: bool = True, progress: bool = True, timeout: float = 60.0,
                     chunk_size: int = 1 << 20) -> Path:
    """Download ``url`` to ``destination``, resuming an earlier partial download.

    Bytes go to ``destination`` + ``.part`` first. If that file exists, only the
    rest is requested with an HTTP Range header, and a server that ignores the
    header makes the download start over. After the transfer the SHA-256 is
    checked, and the file is renamed to ``destination`` only if it matches. A file
    already at ``destination`` is checked and returned without downloading.

    Parameters
    ----------
    url : str
        An ``http`` or ``https`` address.
    destination : path
        Final path of the file. Missing parent folders are created.
    sha256 : str, optional
        Expected hex digest. Required unless ``verify=False``.
    verify : bool, default=True
        ``False`` skips the checksum. This is unsafe: a truncated, corrupted or
        replaced file is accepted, so use it only for archives with no known digest.
    progress : bool, default=True
        Show a tqdm progress bar.
    timeout : float, default=60.0
        Seconds to wait for the connection and for each read.
    chunk_size : int, default=1048576
        Bytes read per step.

    Raises
    ------
    ValueError
        If the URL is not HTTP(S), or ``sha256`` is missing or malformed while
        ``verify`` is True.
    DownloadError
        If the server cannot be reached, returns an HTTP error, or the transfer
        stops early. The ``.part`` file is kept, so a rerun resumes.
    ChecksumMismatchError
        If the digest differs. A downloaded ``.part`` file is deleted, and a file
        already at ``destination`` is kept for inspection.
    """
    _check_request(url, sha256, verify=verify)
    destination = Path(destination)
    if destination.exists():
        if verify:
            _verify_sha256(destination, sha256, source=url, delete=False)
        logger.info("Using %s, which is already downloaded", destination)
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    _fetch_into(url, part, progress=progress, timeout=timeout, chunk_size=chunk_size)
    if verify:
        _verify_sha256(part, sha256, source=url, delete=True)
    else:
        logger.warning("Did not verify %s (verify=False): its SHA-256 is %s", destination.name, file_sha256(part))
    part.replace(destination)
    logger.info("Downloaded %s to %s", url, destination)
    return destination


def _check_request(url: str, sha256: str | None, *, verify: bool) -> None:
    if urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"Only http and https URLs can be downloaded, got {url!r}.")
    if not verify:
        return
    if sha256 is None:
        raise ValueError(f"No SHA-256 given for {url}. Pass sha256=<hex digest>, or verify=False "
                         "to accept the file unchecked (unsafe: a corrupted or replaced file is kept).")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}.")


def _fetch_into(url: str, part: Path, *, progress: bool, timeout: float, chunk_size: int) -> None:
    offset = part.stat().st_size if part.exists() else 0
    response, total = _open(url, offset, timeout)
    if response is None:
        if total == offset:
            logger.info("%s already contains all %d bytes of %s", part, offset, url)
            return
        logger.warning("%s contains %d bytes, but the file at %s has %s; downloading it from the start",
                       part, offset, url, total)
        offset = 0
        response, _ = _open(url, offset, timeout)
    with response:
        content_range = response.headers.get("Content-Range", "")
        if offset and response.status != 206:
            logger.warning("%s ignored the Range request; downloading from the start", url)
            offset = 0
        elif offset and not content_range.startswith(f"bytes {offset}-"):
            raise DownloadError(f"{url} responded to a Range request from byte {offset} with Content-Range "
                                f"{content_range!r}; delete {part} and rerun to download from the start.")
        elif offset:
            logger.info("Resuming %s at byte %d", url, offset)
        _write_response(response, part, offset, url=url, progress=progress, chunk_size=chunk_size)


def _open(url: str, offset: int, timeout: float) -> tuple[http.client.HTTPResponse | None, int | None]:
    """Request ``url`` from byte ``offset`` on.

    Returns the response and None, or, when the server responds to a Range request
    with 416 (range not satisfiable), None and the file size it reports.
    """
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout), None
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            return None, _content_range_total(error.headers.get("Content-Range", ""))
        raise DownloadError(f"Download of {url} failed: HTTP {error.code} {error.reason}.") from error
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(f"Connection to {url} failed: {error}. Check the network and the URL.") from error


def _content_range_total(header: str) -> int | None:
    """Return the total size from a ``Content-Range`` header such as ``bytes 0-9/10``."""
    match = re.fullmatch(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", header.strip())
    return int(match.group(1)) if match else None


def _write_response(response, part: Path, offset: int, *, url: str, progress: bool, chunk_size: int) -> None:
    length = response.headers.get("Content-Length")
    expected = offset + int(length) if length is not None else None
    written = offset
    try:
        with open(part, "ab" if offset else "wb") as handle, tqdm(
            total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name, disable=not progress,
        ) as bar:
            while chunk := response.read(chunk_size):
                handle.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as error:
        raise DownloadError(f"Download of {url} stopped after {written} bytes ({error}); "
                            f"rerun to resume from {part}.") from error
    if expected is not None and written < expected:
        raise DownloadError(f"Download of {url} stopped after {written} of {expected} bytes; "
                            f"rerun to resume from {part}.")


def _verify_sha256(path: Path, expected: str, *, source: str, delete: bool) -> None:
    actual = file_sha256(path)
    if actual == expected.lower():
        return
    if delete:
        path.unlink()
        raise ChecksumMismatchError(f"SHA-256 of the file downloaded from {source} is {actual}, expected "
                                    f"{expected.lower()}. Deleted {path}. The transfer was corrupted or the "
                                    "server's file changed: rerun, or check the expected checksum.")
    raise ChecksumMismatchError(f"SHA-256 of {path} is {actual}, expected {expected.lower()}. Delete the "
                                "file and rerun to download it again.")


def extract_archive(archive: str | Path, target_dir: str | Path, *, progress: bool = False) -> Path:
    """Unpack a tar (plain, gz, bz2, xz) or zip archive into ``target_dir``.

    Every member is checked before anything is written. Absolute paths, ``..``
    components, links that point outside ``target_dir``, members stored under a
    link, and device or FIFO members are rejected. Tar members are also extracted
    with Python's ``"data"`` extraction filter. Zip symlink entries that point
    inside are written as plain files that contain the link target, as
    :mod:`zipfile` does.

    Returns
    -------
    Path
        ``target_dir``.

    Raises
    ------
    UnsafeArchiveError
        If a member is rejected. The message names the member.
    ValueError
        If ``archive`` is neither a tar nor a zip archive.
    """
    archive, target_dir = Path(archive), Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            _check_tar_members(members, archive)
            tar.extractall(target_dir, members=tqdm(members, desc=archive.name, disable=not progress),
                           filter="data")
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zip_file:
            _check_zip_members(zip_file, archive)
            for info in tqdm(zip_file.infolist(), desc=archive.name, disable=not progress):
                zip_file.extract(info, target_dir)
    else:
        raise ValueError(f"{archive} is neither a tar nor a zip archive.")
    logger.info("Extracted %s into %s", archive, target_dir)
    return target_dir


def _check_tar_members(members: list[tarfile.TarInfo], archive: Path) -> None:
    link_names = {posixpath.normpath(m.name) for m in members if m.issym() or m.islnk()}
    for member in members:
        problem = _path_problem(member.name) or _under_link_problem(member.name, link_names)
        if problem is None and member.issym():
            # A symlink target is relative to the folder that contains the link.
            problem = _link_problem(posixpath.join(posixpath.dirname(member.name), member.linkname),
                                    member.linkname, "symlink")
        elif problem is None and member.islnk():
            # A hard-link target is relative to the archive root.
            problem = _link_problem(member.linkname, member.linkname, "hard link")
        elif problem is None and (member.ischr() or member.isblk() or member.isfifo()):
            problem = "is a device or FIFO"
        if problem:
            raise UnsafeArchiveError(f"Archive member {member.name!r} in {archive} {problem}; "
                                     "nothing was extracted.")


def _check_zip_members(zip_file: zipfile.ZipFile, archive: Path) -> None:
    for info in zip_file.infolist():
        problem = _path_problem(info.filename)
        if problem is None and stat.S_ISLNK(info.external_attr >> 16):
            link_target = zip_file.read(info).decode("utf-8", errors="replace")
            problem = _link_problem(posixpath.join(posixpath.dirname(info.filename), link_target),
                                    link_target, "symlink")
        if problem:
            raise UnsafeArchiveError(f"Archive member {info.filename!r} in {archive} {problem}; "
                                     "nothing was extracted.")


def _path_problem(name: str) -> str | None:
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "has an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "contains a '..' component"
    return None


def _under_link_problem(name: str, link_names: set[str]) -> str | None:
    parts = posixpath.normpath(name).split("/")
    for depth in range(1, len(parts)):
        prefix = "/".join(parts[:depth])
        if prefix in link_names:
            return f"is stored under the link {prefix!r}"
    return None


def _link_problem(joined: str, link_target: str, kind: str) -> str | None:
    resolved = posixpath.normpath(joined)
    if link_target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        return f"is a {kind} to {link_target!r}, outside the target folder"
    return None


def ensure_dataset(name: str, data_root: str | Path, *, download: bool, verify: bool = True,
                   progress: bool = True, keep_archive: bool = False,
                   registry: Mapping[str, ArchiveSpec] = ARCHIVES) -> Path:
    """Return the folder of a dataset, downloading and extracting it if allowed.

    Parameters
    ----------
    name : str
        A key of ``registry``: ``"mvtec_ad"`` (all 15 categories),
        ``"mvtec_ad/<category>"`` (one category) or ``"visa"``.
    data_root : path
        Folder that contains one folder per dataset, for example ``data_root/mvtec_ad``.
    download : bool
        Download and extract the archive when the copy is missing or incomplete.
    verify : bool, default=True
        Check the archive's SHA-256. ``False`` is unsafe (see :func:`download_archive`)
        and is needed for archives without a known checksum.
    progress : bool, default=True
        Show progress bars.
    keep_archive : bool, default=False
        Keep the archive in ``data_root/downloads`` after extraction.
    registry : mapping, default=ARCHIVES
        Archive descriptions by name, for mirrors or tests.

    Returns
    -------
    Path
        ``data_root / registry[name].folder``, the folder that
        :func:`adlib.data.load_mvtec_category` or
        :func:`adlib.visa.load_visa_category` reads.

    Raises
    ------
    ValueError
        If ``name`` is unknown, or the archive has no known checksum and ``verify``
        is True.
    FileNotFoundError
        If the copy is missing or incomplete and ``download`` is False, or the
        extracted archive lacks the expected files. The message names the folder.
    """
    if name not in registry:
        raise ValueError(f"Unknown dataset archive {name!r}; expected one of {', '.join(sorted(registry))}.")
    spec = registry[name]
    dataset_root = Path(data_root) / spec.folder
    missing = missing_dataset_parts(name, dataset_root)
    if not missing:
        return dataset_root
    if not download:
        listed = ", ".join(missing[:3])
        raise FileNotFoundError(f"{name} is missing or incomplete in {dataset_root}: no {listed}. "
                                f"Place the data there, or pass download=True to fetch {spec.url}.")
    if verify and spec.sha256 is None:
        raise ValueError(f"No SHA-256 is known for the {name} archive. Pass verify=False to download it "
                         "unchecked (unsafe), or download the whole 'mvtec_ad' archive, which is verified.")
    archive = download_archive(spec.url, Path(data_root) / "downloads" / spec.filename,
                               sha256=spec.sha256, verify=verify, progress=progress)
    _extract_with_marker(archive, dataset_root, name, progress=progress)
    missing = missing_dataset_parts(name, dataset_root)
    if missing:
        listed = ", ".join(missing[:3])
        raise FileNotFoundError(f"{dataset_root} still has no {listed} after extracting "
                                f"{archive}; the archive does not have the expected layout.")
    if not keep_archive:
        archive.unlink()
    return dataset_root


def _extract_with_marker(archive: Path, dataset_root: Path, name: str, *, progress: bool) -> None:
    # The marker stays behind if extraction is interrupted, so the partial copy
    # is reported as incomplete instead of being used.
    dataset_root.mkdir(parents=True, exist_ok=True)
    marker = dataset_root / (EXTRACTING_MARKER + name.replace("/", "-"))
    marker.write_text(f"Extraction of {archive} started; delete this folder's partial data and rerun.\n")
    extract_archive(archive, dataset_root, progress=progress)
    marker.unlink()


def missing_dataset_parts(name: str, dataset_root: str | Path) -> list[str]:
    """List what a copy of dataset ``name`` in ``dataset_root`` lacks; empty when complete.

    An MVTec-AD category needs images in ``train/good`` and at least one folder
    in ``test``. Masks are checked by the readers, not here. VisA needs
    ``split_csv/1cls.csv`` and a ``<category>/Data/Images`` folder per category.
    A leftover marker of an interrupted extraction makes any copy incomplete.

    Raises
    ------
    ValueError
        If ``name`` is not ``"mvtec_ad"``, ``"mvtec_ad/<category>"`` or ``"visa"``.
    """
    is_category = name.startswith("mvtec_ad/") and name.removeprefix("mvtec_ad/") in MVTEC_CATEGORIES
    if name not in ("mvtec_ad", "visa") and not is_category:
        raise ValueError(f"No layout is known for {name!r}; expected 'mvtec_ad', 'mvtec_ad/<category>' or 'visa'.")
    dataset_root = Path(dataset_root)
    if not dataset_root.is_dir():
        return [f"folder {dataset_root}"]
    markers = sorted(dataset_root.glob(EXTRACTING_MARKER + "*"))
    missing = [f"interrupted extraction (marker {marker.name})" for marker in markers]
    if name == "visa":
        if not (dataset_root / VISA_SPLIT_FILE).is_file():
            missing.append(str(VISA_SPLIT_FILE))
        missing += [f"{category}/Data/Images" for category in VISA_CATEGORIES
                    if not (dataset_root / category / "Data" / "Images").is_dir()]
        return missing
    categories = MVTEC_CATEGORIES if name == "mvtec_ad" else (name.removeprefix("mvtec_ad/"),)
    for category in categories:
        missing += _missing_mvtec_parts(dataset_root / category, category)
    return missing


def _missing_mvtec_parts(category_dir: Path, category: str) -> list[str]:
    train_dir = category_dir / "train" / "good"
    test_dir = category_dir / "test"
    missing = []
    if not train_dir.is_dir() or not any(p.is_file() for p in train_dir.iterdir()):
        missing.append(f"{category}/train/good images")
    if not test_dir.is_dir() or not any(p.is_dir() for p in test_dir.iterdir()):
        missing.append(f"{category}/test folders")
    return missing
