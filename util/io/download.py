"""Fetch pretrained weights, FID reference statistics and ADM's reference batch.

Usage: python -m util.io.download [names...] [--dest-root DIR] [--url URL] [--list]

Downloads stream into ``<dest>.part``, resume with HTTP Range requests, retry
transient failures, and are renamed to the final name only after the size and
sha256 (when known) check out.
"""

import argparse
import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm import tqdm

logger = logging.getLogger(__name__)

USER_AGENT = "arinar-download/1.0"
ARINAR_README = "https://github.com/Qinyu-Allen-Zhao/Arinar"


class DownloadError(RuntimeError):
    """A download failed or produced a file that does not verify."""


class ManualDownloadRequired(DownloadError):
    """The asset has no known direct link; the user must fetch it by hand."""


class _Transient(Exception):
    """A failure worth retrying (dropped connection, short body, 5xx)."""


@dataclass(frozen=True)
class Asset:
    name: str
    url: Optional[str]
    relpath: str
    size: Optional[int] = None
    sha256: Optional[str] = None
    note: str = ""


def _manual_note(page: str, section: str, relpath: str) -> str:
    return f"download it from {section} at {page} and save it as {relpath}"


ASSETS = {a.name: a for a in (
    Asset(
        "kl16",
        "https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt"
        "?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=1",
        "pretrained_models/vae/kl16.ckpt",
        note="MAR's KL-16 VAE (about 254 MiB)",
    ),
    Asset(
        "adm_in256_stats",
        "https://github.com/LTH14/mar/raw/main/fid_stats/adm_in256_stats.npz",
        "fid_stats/adm_in256_stats.npz",
        note="ADM ImageNet-256 FID reference statistics (keys mu, sigma), from MAR's repo",
    ),
    Asset(
        "adm_in256_ref_batch",
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
        "VIRTUAL_imagenet256_labeled.npz",
        "fid_stats/VIRTUAL_imagenet256_labeled.npz",
        note="ADM's ImageNet-256 reference batch (arr_0 = 10,000 uint8 images, about 2 GB) from OpenAI's "
             "guided-diffusion evaluation suite: --ref_batch for precision and recall",
    ),
    # MAR's released checkpoints (MAR's README links, dl=1 for the file itself); sizes and checksums
    # are not published, so only the transfer's own length is checked
    *(
        Asset(
            f"mar_{size}",
            url,
            f"pretrained_models/mar/mar_{size}/checkpoint-last.pth",
            note=f"MAR-{size[0].upper()} with its diffusion head, about {gb} GB",
        )
        for size, gb, url in (
            ("base", 1.6, "https://www.dropbox.com/scl/fi/f6dpuyjb7fudzxcyhvrhk/checkpoint-last.pth"
                          "?rlkey=a6i4bo71vhfo4anp33n9ukujb&dl=1"),
            ("large", 3.7, "https://www.dropbox.com/scl/fi/pxacc5b2mrt3ifw4cah6k/checkpoint-last.pth"
                           "?rlkey=m48ovo6g7ivcbosrbdaz0ehqt&dl=1"),
            ("huge", 7.2, "https://www.dropbox.com/scl/fi/1qmfx6fpy3k7j9vcjjs3s/checkpoint-last.pth"
                          "?rlkey=4lae281yzxb406atp32vzc83o&dl=1"),
        )
    ),
    Asset(
        "arinar_b",
        None,
        "pretrained_models/arinar/arinar_b/checkpoint-last.pth",
        note=_manual_note(ARINAR_README, "the ARINAR release linked in the README",
                          "pretrained_models/arinar/arinar_b/checkpoint-last.pth"),
    ),
)}


def sha256sum(path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _mismatch(path: Path, size: Optional[int], sha256: Optional[str],
              chunk_size: int, name: Optional[Path] = None) -> Optional[str]:
    """One-line description of why ``path`` fails verification, or None."""
    name = name or path
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"{name}: size mismatch: expected {size} bytes, got {actual}"
    if sha256 is not None:
        digest = sha256sum(path, chunk_size)
        if digest.lower() != sha256.lower():
            return f"{name}: sha256 mismatch: expected {sha256.lower()}, got {digest}"
    return None


def _parse_content_range(value: Optional[str]):
    """(start, total) from 'bytes START-END/TOTAL' or 'bytes */TOTAL'; None where absent."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _fetch_once(url: str, part: Path, size: Optional[int], chunk_size: int,
                progress: bool, timeout: float, desc: str) -> None:
    """One attempt to bring ``part`` to the full length of the remote file."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    if size is not None and offset == size:
        return

    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and offset:
                _, total = _parse_content_range(e.headers.get("Content-Range"))
                if total is not None and total != offset:
                    # The part is longer than the remote file, so it is not a prefix of it.
                    part.unlink()
                    raise _Transient(f"partial file larger than remote ({offset} > {total})") from e
                logger.info("%s: server reports the partial file is complete", desc)
                return
            # 408/429 mean "try again later", unlike the rest of 4xx.
            if e.code >= 500 or e.code in (408, 429):
                raise _Transient(f"HTTP {e.code} {e.reason}") from e
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None

    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length is not None else None
        if offset and resp.status == 206:
            start, _ = _parse_content_range(resp.headers.get("Content-Range"))
            if start is not None and start != offset:
                part.unlink()
                raise _Transient(f"server resumed at byte {start}, asked for {offset}")
            mode = "ab"
            logger.info("%s: resuming at byte %d", desc, offset)
        else:
            if offset:
                logger.info("%s: server ignored the Range request, restarting", desc)
            mode, offset = "wb", 0
        total = offset + length if length is not None else size

        received = 0
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=desc, disable=not progress,
                                         leave=False) as bar:
            while True:
                block = resp.read(chunk_size)
                if not block:
                    break
                f.write(block)
                received += len(block)
                bar.update(len(block))
        # http.client returns a short body silently when the peer closes early.
        if length is not None and received < length:
            raise _Transient(f"connection closed after {received} of {length} bytes")


_RETRYABLE = (_Transient, urllib.error.URLError, http.client.HTTPException,
              ConnectionError, TimeoutError, socket.timeout)


def download(url: str, dest_path, sha256: Optional[str] = None, size: Optional[int] = None,
             retries: int = 3, chunk_size: int = 1 << 20, progress: bool = True,
             backoff: float = 1.0, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest_path``, resuming and verifying; returns the final path.

    ``retries`` is the number of extra attempts after the first; the wait before
    retry k (k = 1, 2, ...) is ``backoff * 2**(k - 1)`` seconds: 1, 2, 4 s by default.
    """
    dest = Path(dest_path)
    if dest.exists():
        problem = _mismatch(dest, size, sha256, chunk_size)
        if problem is None:
            logger.info("%s already present, skipping", dest)
            return dest
        logger.warning("%s; downloading again", problem)
        dest.unlink()

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    logger.info("downloading %s -> %s", url, dest)

    last_error = None
    for attempt in range(retries + 1):
        if attempt:
            delay = backoff * 2 ** (attempt - 1)
            logger.warning("%s: %s; retry %d/%d in %.1fs", dest.name, last_error, attempt,
                           retries, delay)
            time.sleep(delay)
        try:
            _fetch_once(url, part, size, chunk_size, progress, timeout, dest.name)
            break
        except DownloadError:
            raise
        except _RETRYABLE as e:
            last_error = e
    else:
        raise DownloadError(f"{url}: failed after {retries + 1} attempt(s): {last_error}")

    if not part.exists():
        raise DownloadError(f"{url}: nothing was downloaded")
    problem = _mismatch(part, size, sha256, chunk_size, name=dest)
    if problem is not None:
        part.unlink()
        raise DownloadError(problem)
    os.replace(part, dest)
    logger.info("saved %s (%d bytes)", dest, dest.stat().st_size)
    return dest


def fetch_asset(name: str, root=".", url: Optional[str] = None, **kwargs) -> Path:
    """Download registered asset ``name`` under ``root``; ``url`` overrides its source.

    Raises ManualDownloadRequired when the asset has no link and is not already present.
    """
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    dest = Path(root) / asset.relpath
    src = url or asset.url
    if src is None:
        if dest.exists():
            logger.info("%s already present at %s", name, dest)
            return dest
        raise ManualDownloadRequired(
            f"{name}: no direct download link; {asset.note}. Destination: {dest}")
    return download(src, dest, sha256=asset.sha256, size=asset.size, **kwargs)


def main(argv=None) -> int:
    """CLI entry point; returns 0 on success, 1 on a failed download, 2 if manual steps remain."""
    parser = argparse.ArgumentParser(description="Download ARINAR/MAR assets.")
    parser.add_argument("names", nargs="*", help="asset names (see --list)")
    parser.add_argument("--dest-root", default=".", help="directory the asset paths are relative to")
    parser.add_argument("--url", default=None, help="override the source URL of a single asset")
    parser.add_argument("--list", action="store_true", help="list known assets and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    if args.list:
        width = max(len(n) for n in ASSETS)
        for a in ASSETS.values():
            print(f"{a.name:<{width}}  {a.relpath}\n{'':<{width}}  {a.url or 'manual: ' + a.note}")
        return 0
    if not args.names:
        parser.error("name at least one asset (see --list)")
    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(ASSETS)}")
    if args.url and len(args.names) != 1:
        parser.error("--url needs exactly one asset name")

    failed = manual = False
    for name in args.names:
        try:
            fetch_asset(name, args.dest_root, url=args.url, progress=not args.no_progress)
        except ManualDownloadRequired as e:
            logger.error("%s", e)
            manual = True
        except DownloadError as e:
            logger.error("%s", e)
            failed = True
    return 1 if failed else 2 if manual else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
