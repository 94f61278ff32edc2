"""Sources: turn SOURCE arguments into a stream of items, never a whole list in memory.

Directories are walked depth first in sorted order (each directory's own entries are
sorted, so the order is stable from run to run); manifests are read line by line. A bad
line or an unreadable folder becomes an item carrying its error, so it gets a record
like any other failure instead of stopping the run.

``iter_chunks`` gives the items a chunk at a time, which is how the run and the dry run
read them. A .txt manifest is read a block (1 MiB) at a time, and a block whose lines are
all http(s) URLs in ASCII comes as a ``UrlChunk``: the URLs' bytes and fingerprints, no
``Item`` each, since a resume skips most of them (``resume.ResumeFilter.fresh_in``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import numpy as np

from batchtag import codes
from batchtag.errors import SourceError
from batchtag.keyset import fingerprints_bytes
from batchtag.pipeline.excludes import LeftOut, WalkRules, not_an_image_reason
from batchtag.records import SourceKind, read_blocks

SENT_AS_IS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})  # what the API takes
CONVERTED = frozenset({".heic", ".heif", ".webp", ".tif", ".tiff"})  # made JPEG on the client
RAW = frozenset({".dng", ".nef", ".arw", ".cr2"})  # their embedded JPEG preview is sent
IMAGE_EXTENSIONS = SENT_AS_IS | CONVERTED | RAW
MANIFEST_EXTENSIONS = frozenset({".txt", ".csv", ".jsonl"})
URL_SCHEMES = ("http", "https")
STDIN = "-"
MANIFEST_BLOCK = 1 << 20  # bytes of a .txt manifest read at a time (~25,000 URLs)


@dataclass(slots=True)
class Item:
    """One thing to tag. Treated as immutable; not frozen because a frozen dataclass takes
    twice as long to build, and the walk builds one per file."""

    key: str
    kind: SourceKind
    location: str  # a filesystem path or a URL
    error_code: int | None = None  # set when the item is already known to be bad
    error: str | None = None
    size: int | None = None  # a file's stat, taken by the walker (resume compares it)
    mtime_ns: int | None = None

    @classmethod
    def failed(cls, key: str, kind: SourceKind, code: int, error: str) -> Item:
        return cls(key, kind, key, code, error)

    def with_stat(self) -> Item:
        """This file item with its size and mtime (None when it cannot be stat'ed: the read
        will say why)."""
        if self.kind != "file" or self.size is not None or self.error_code is not None:
            return self
        try:
            info = os.stat(self.location)
        except (OSError, ValueError):
            return self
        return Item(self.key, self.kind, self.location, size=info.st_size, mtime_ns=info.st_mtime_ns)


Warn = Callable[[str], None]


def _ignore(_: str) -> None:
    pass


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def file_key(path: str) -> str:
    """Keys are absolute, normalised paths: "photos/a.jpg" and "./photos/a.jpg" are one item."""
    return os.path.abspath(path)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
COMMON_URL_STARTS = ("https://", "http://")
_SCHEMELESS_URLS = ("http:", "https:", "ftp:", "file:", "data:", "javascript:", "mailto:")


def looks_like_url(text: str) -> bool:
    """URL-shaped entries are treated as URLs, so a bad scheme gets a clear URL error."""
    return bool(_SCHEME.match(text)) or text.lower().startswith(_SCHEMELESS_URLS)


def url_item(url: str) -> Item:
    return Item(url, "url", url)


# An http(s) URL whose host is plain ASCII letters, digits, dots and dashes (and perhaps a
# port), then nothing or a path, query or fragment: ``urlsplit`` finds that scheme and host
# in it, and cannot fail on it. No re.IGNORECASE: it would let the Kelvin sign match "k".
_PLAIN_URL = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(?::[0-9]*)?(?:[/?#].*)?", re.DOTALL)


def url_problem(url: str) -> str | None:
    """Why ``url`` can never be fetched, or None. The worker asks, not the walker: parsing
    a million URLs only to skip the finished ones would be most of a resume's time. The
    common URL is passed by one regular expression, a tenth of ``urlsplit``'s time (the
    dry run asks for every URL to do)."""
    if _PLAIN_URL.fullmatch(url):
        return None
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return "invalid URL: cannot be parsed"
    if parts.scheme.lower() not in URL_SCHEMES or not hostname:
        return "invalid URL: needs http:// or https:// and a host"
    return None


def path_item(path: str, base: str | None = None) -> Item:
    if base and not os.path.isabs(path):
        path = os.path.join(base, path)
    return Item(file_key(path), "file", path)


def entry_item(text: str, base: str | None) -> Item:
    """One manifest entry: a URL or a path (relative paths are relative to the manifest).
    The common http(s) URL skips the scheme regex: a million-line manifest is read whole on
    every resume."""
    if text.startswith(COMMON_URL_STARTS) or looks_like_url(text):
        return Item(text, "url", text)
    return path_item(text, base)


# --- directories ---------------------------------------------------------------------------


@dataclass
class Walk:
    """One directory walk's settings and what it left out."""

    rules: WalkRules = field(default_factory=WalkRules)
    left_out: LeftOut = field(default_factory=LeftOut)
    warn: Warn = _ignore


def walk_directory(root: str, warn: Warn = _ignore, walk: Walk | None = None) -> Iterator[Item]:
    """Image files under ``root``, depth first, sorted by name at every level, each with
    its stat (one ``stat`` a file: resume compares size and mtime with the record).

    Symlinked directories are followed once: a directory already on the current path
    (a symlink loop) is skipped with a warning. An unreadable directory yields an error
    item so the run's result says something was missed. System, hidden and excluded
    entries are left out and counted (``excludes``).
    """
    walk = walk or Walk(warn=warn)
    if walk.warn is _ignore:
        walk.warn = warn
    yield from _walk(root, "", ancestors=set(), walk=walk)


def _walk(directory: str, relative_to: str, ancestors: set[tuple[int, int]], walk: Walk) -> Iterator[Item]:
    warn = walk.warn
    try:
        info = os.stat(directory)
        identity = (info.st_dev, info.st_ino)
        if identity in ancestors:
            warn(f"skipped symlink loop: {directory}")
            return
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as exc:
        yield Item.failed(
            file_key(directory),
            "file",
            codes.CLIENT_INPUT_ERROR,
            f"directory unreadable: {exc.strerror or exc}",
        )
        return
    ancestors.add(identity)
    base = file_key(directory)  # once a folder: a key is the folder's key plus the name
    rules, left_out = walk.rules, walk.left_out
    try:
        # Files are handled inline, not through a generator each: the walk runs per file.
        for entry in entries:
            name = entry.name
            relative = f"{relative_to}/{name}" if relative_to else name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if reason := rules.folder_reason(name, relative):
                    left_out.folder(reason)
                else:
                    yield from _walk(entry.path, relative, ancestors, walk)
            elif (name[0] == "." or rules.excludes) and (reason := rules.file_reason(name, relative)):
                left_out.file(reason, name)
            elif is_image_name(name):
                yield _file_item(entry, f"{base}{os.sep}{name}")
            else:
                left_out.file(not_an_image_reason(name), name)
    finally:
        ancestors.discard(identity)


def _file_item(entry: os.DirEntry[str], key: str) -> Item:
    """Broken symlinks and unreadable files still become items: their record says why."""
    try:
        info = entry.stat()
    except OSError:
        return Item(key, "file", entry.path)
    return Item(key, "file", entry.path, size=info.st_size, mtime_ns=info.st_mtime_ns)


# --- manifests -----------------------------------------------------------------------------


def read_txt(lines: Iterable[str], base: str | None, name: str) -> Iterator[Item]:
    for line in lines:
        text = line.strip()
        if text.startswith(COMMON_URL_STARTS):  # entry_item's first case, inline: most lines
            yield Item(text, "url", text)
        elif text and not text.startswith("#"):
            yield entry_item(text, base)


@dataclass
class UrlChunk:
    """Consecutive http(s) URLs of a .txt manifest, in ASCII: each URL's bytes (its key)
    and their fingerprints (``keyset.fingerprint``), without an ``Item`` each."""

    keys: list[bytes]
    fingerprints: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def items(self, indices: Iterable[int] | None = None) -> list[Item]:
        """The items of all the URLs, or of those at ``indices``."""
        keys = self.keys if indices is None else [self.keys[i] for i in indices]
        return [url_item(key.decode("ascii")) for key in keys]


Chunk = list[Item] | UrlChunk
# What str.strip() strips from an ASCII line; "\n" is the separator and "\r" is made one.
_ASCII_SPACE = b" \t\x0b\x0c\x1c\x1d\x1e\x1f"
_ASCII_SPACES = [bytes([space]) for space in _ASCII_SPACE]
_URL_STARTS = tuple(start.encode() for start in COMMON_URL_STARTS)


def read_txt_chunks(path: str, size: int = MANIFEST_BLOCK) -> Iterator[Chunk]:
    """A .txt manifest a block at a time: what ``read_txt`` gives, with each block of
    ASCII http(s) URLs as one ``UrlChunk``. Blocks end at line ends, so the UTF-8 decoding
    (with replacement) of each is that of the whole file."""
    base = os.path.dirname(os.path.abspath(path))
    name = os.path.abspath(path)
    with open(path, "rb") as handle:
        for block in read_blocks(handle, size, line_ends=b"\n\r"):  # "\r" alone ends a line too
            urls = _ascii_urls(block) if block.isascii() else None
            if urls is None:
                lines = io.StringIO(block.decode("utf-8", "replace"), newline="")
                items = list(read_txt(lines, base, name))
                if items:
                    yield items
            elif urls:
                yield UrlChunk(urls, fingerprints_bytes(urls))


def _ascii_urls(block: bytes) -> list[bytes] | None:
    """The entries of an ASCII block of a .txt manifest when all are http(s) URLs, as
    ``read_txt`` reads them: lines split at LF, CR LF and CR (the file is opened with
    ``newline=""``), stripped, blank and comment lines skipped. None when some other
    entry is among them."""
    if b"\r" in block:
        block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    lines = block.split(b"\n")
    if any(space in block for space in _ASCII_SPACES):
        lines = [line.strip(_ASCII_SPACE) for line in lines]
    elif b"\n\n" not in block and b"#" not in block and not block.startswith(b"\n"):
        # Lines as they are, none blank: count the URL starts instead of testing each.
        if not lines[-1]:
            lines.pop()
        starts = sum((b"\n" + block).count(b"\n" + start) for start in _URL_STARTS)
        return lines if starts == len(lines) else None
    entries = list(filter(None, lines))
    if b"#" in block:
        entries = [entry for entry in entries if not entry.startswith(b"#")]
    urls = [entry for entry in entries if entry.startswith(_URL_STARTS)]
    return urls if len(urls) == len(entries) else None


def read_csv(lines: Iterable[str], base: str | None, name: str) -> Iterator[Item]:
    reader = csv.DictReader(lines)
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    if "url" not in columns and "path" not in columns:
        raise SourceError(f"{name}: a CSV manifest needs a 'url' or 'path' column")
    reader.fieldnames = columns
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield bad_line(name, reader.line_num, f"unreadable CSV row ({exc})")
            continue
        value = (row.get("url") or row.get("path") or "").strip()
        if value:
            yield entry_item(value, base)
        elif any((v or "").strip() for v in row.values() if isinstance(v, str)):
            yield bad_line(name, reader.line_num, "no url or path in this row")


def read_jsonl(lines: Iterable[str], base: str | None, name: str) -> Iterator[Item]:
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            yield bad_line(name, number, "not valid JSON")
            continue
        value = data.get("url") or data.get("path") if isinstance(data, dict) else None
        if isinstance(value, str) and value.strip():
            yield entry_item(value.strip(), base)
        else:
            yield bad_line(name, number, "needs a string 'url' or 'path'")


def bad_line(manifest: str, line: int, why: str) -> Item:
    """A malformed manifest line gets its own key (manifest:line) and an error record."""
    return Item.failed(
        f"{manifest}:{line}", "file", codes.CLIENT_BAD_MANIFEST_LINE, f"bad manifest line: {why}"
    )


READERS = {".txt": read_txt, ".csv": read_csv, ".jsonl": read_jsonl}


def read_manifest(path: str) -> Iterator[Item]:
    reader = READERS[os.path.splitext(path)[1].lower()]
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        yield from reader(handle, base, os.path.abspath(path))


def read_stdin(stream: TextIO | None = None) -> Iterator[Item]:
    stream = stream or io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    yield from read_txt(stream, os.getcwd(), "<stdin>")


# --- SOURCE arguments ----------------------------------------------------------------------


def check_source(source: str) -> None:
    """Refuse, before any work starts, a SOURCE that can never yield items."""
    if source == STDIN:
        return
    try:
        mode = os.stat(source).st_mode
    except OSError as exc:
        raise SourceError(f"{source}: {exc.strerror or 'cannot be read'}") from None
    if stat.S_ISDIR(mode):
        return
    suffix = Path(source).suffix.lower()
    if suffix in MANIFEST_EXTENSIONS:
        if suffix == ".csv":
            _check_csv_header(source)
        return
    if suffix not in IMAGE_EXTENSIONS:
        raise SourceError(
            f"{source}: not a directory, an image ({' '.join(sorted(IMAGE_EXTENSIONS))}) "
            "or a manifest (.txt .csv .jsonl)"
        )


def _check_csv_header(path: str) -> None:
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        header = next(csv.reader(handle), [])
    if not {"url", "path"} & {c.strip().lower() for c in header}:
        raise SourceError(f"{path}: a CSV manifest needs a 'url' or 'path' column")


def iter_items(sources: Iterable[str], warn: Warn = _ignore, walk: Walk | None = None) -> Iterator[Item]:
    """Every item of every SOURCE, in argument order."""
    for chunk in iter_chunks(sources, warn, walk):
        yield from chunk.items() if isinstance(chunk, UrlChunk) else chunk


def iter_chunks(
    sources: Iterable[str], warn: Warn = _ignore, walk: Walk | None = None, size: int = 2048
) -> Iterator[Chunk]:
    """Every item of every SOURCE, in argument order, in chunks of up to ``size`` items
    (a ``UrlChunk`` holds a block of a .txt manifest, however many URLs that is)."""
    for source in sources:
        if Path(source).suffix.lower() == ".txt" and source != STDIN and not os.path.isdir(source):
            yield from read_txt_chunks(source)
            continue
        items = _source_items(source, warn, walk)
        while chunk := list(itertools.islice(items, size)):
            yield chunk


def _source_items(source: str, warn: Warn, walk: Walk | None) -> Iterator[Item]:
    if source == STDIN:
        yield from read_stdin()
    elif os.path.isdir(source):
        yield from walk_directory(source, warn, walk)
    elif Path(source).suffix.lower() in MANIFEST_EXTENSIONS:
        yield from read_manifest(source)
    else:
        yield path_item(source)
