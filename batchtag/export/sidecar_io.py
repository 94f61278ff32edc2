"""Files beside someone's images, written so that a crafted OUT or a planted link cannot
steer the write somewhere else.

An export runs over an OUT it did not necessarily make, often as a user (or root) with
more rights than whoever made the folders. So, for each sidecar:

- the key must be an absolute, normalised path (what ``run`` writes); ``..``, ``.`` or
  ``//`` in a key is refused, never resolved, so a key cannot point anywhere its text does
  not plainly say;
- the image's folder is opened once and everything after goes through that directory
  descriptor (``openat``): the image is checked to be a regular file that is an image by its
  bytes, the sidecar is read with ``O_NOFOLLOW`` (a symlink at its name is refused, dangling
  or not), and the new version is written to an ``O_EXCL`` temp file in the same folder and
  renamed over the name. ``rename`` replaces a link planted between the check and the
  rename, never what it points to;
- a new sidecar written as root belongs to the image's owner (someone's photos stay theirs,
  with no root-owned files in their folders); a replaced one keeps its mode and owner.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from batchtag.export.common import current_umask
from batchtag.pipeline.formats import SNIFF_BYTES, sniff_image

MAX_SIDECAR_BYTES = 16 * 1024 * 1024  # XMP sidecars are kilobytes; darktable's with history, hundreds


class Unsafe(Exception):
    """A sidecar that is not written: the key, the image or the name is not what it must be."""


def key_problem(key: str) -> str | None:
    """Why a file key is not one an export writes beside, or None. ``run`` writes absolute,
    normalised paths; anything else came from somewhere else and is not interpreted."""
    if "\x00" in key:
        return "key holds a NUL byte"
    if not os.path.isabs(key):
        return "key is not an absolute path (run writes absolute ones)"
    if os.path.normpath(key) != key or key.startswith("//"):
        return "key is not a normalised path (.., . or // in it); not resolved"
    return None


@dataclass(frozen=True)
class ImageFacts:
    """The image a sidecar describes, as found: its owner (for a new sidecar made as root)."""

    format: str
    uid: int
    gid: int


class Folder:
    """An image's folder, held open: every name below is looked up in it, not by path."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def image(self, name: str) -> ImageFacts:
        """The image named ``name`` (FileNotFoundError when gone); Unsafe when it is not a
        regular file whose bytes are an image. Opened without blocking: a FIFO never hangs."""
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise Unsafe("the image is not a regular file")
            kind = sniff_image(os.pread(fd, SNIFF_BYTES, 0))
        finally:
            os.close(fd)
        if kind is None:
            raise Unsafe("the file is not an image by its bytes; no sidecar beside it")
        return ImageFacts(kind, info.st_uid, info.st_gid)

    def read(self, name: str) -> tuple[bytes, os.stat_result] | None:
        """The bytes and stat of the file at ``name``, or None when there is none. Never
        follows a symlink there (Unsafe), never reads what is not a regular file."""
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=self.fd
            )
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Unsafe("is a symbolic link; sidecars are never written through links") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise Unsafe("is not a regular file")
            if info.st_size > MAX_SIDECAR_BYTES:
                raise Unsafe(f"is {info.st_size:,} bytes, too large for a sidecar")
            return read_all(fd, info.st_size), info
        finally:
            os.close(fd)

    def replace(
        self, name: str, data: bytes, previous: os.stat_result | None, owner: ImageFacts | None
    ) -> None:
        """``name`` holds ``data`` afterwards, atomically (temp file, fsync, rename in this
        folder). Unsafe if a symlink took the name since it was read."""
        temp = f".{name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd
        )
        try:
            try:
                write_all(fd, data)
                set_mode_and_owner(fd, previous, owner)
                os.fsync(fd)
            finally:
                os.close(fd)
            if is_link(name, self.fd):
                raise Unsafe("became a symbolic link while it was written; left alone")
            os.rename(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            os.unlink(temp, dir_fd=self.fd)
            raise


@contextmanager
def open_folder(path: str) -> Iterator[Folder]:
    """The folder at ``path`` (a symlinked folder is followed: that is where the user keeps
    the photos; it is the names in it that are never followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield Folder(fd, path)
    finally:
        os.close(fd)


def is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def set_mode_and_owner(fd: int, previous: os.stat_result | None, owner: ImageFacts | None) -> None:
    """A replaced file keeps its mode (and owner when we are root); a new one gets the
    umask's mode and, made by root, the image's owner."""
    if previous is not None:
        os.fchmod(fd, previous.st_mode & 0o7777)
        uid, gid = previous.st_uid, previous.st_gid
    else:
        os.fchmod(fd, 0o666 & ~current_umask())
        uid, gid = (owner.uid, owner.gid) if owner is not None else (0, 0)
    if os.geteuid() == 0 and (uid, gid) != (0, 0):
        os.fchown(fd, uid, gid)


def read_all(fd: int, size: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, max(size, 65536)):
        chunks.append(chunk)
        if sum(map(len, chunks)) > MAX_SIDECAR_BYTES:
            raise Unsafe("grew too large for a sidecar while it was read")
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
