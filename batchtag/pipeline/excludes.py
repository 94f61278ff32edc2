"""What the directory walk leaves out, and the count of it for the summary.

NAS and desktop systems fill photo folders with their own thumbnails and metadata
(Synology's ``@eaDir``, freedesktop's ``.thumbnails``, macOS's ``.AppleDouble`` and
``__MACOSX``); tagging them spends quota on pictures of pictures already tagged. They are
skipped by default along with every hidden (dot) file and folder; ``--include-hidden``
walks them all, ``--exclude GLOB`` leaves out more.
"""

from __future__ import annotations

import fnmatch
import os
import threading
from collections import Counter
from dataclasses import dataclass, field

SYSTEM_FOLDERS = frozenset({"@eaDir", ".thumbnails", ".AppleDouble", "__MACOSX"})

SYSTEM, HIDDEN, EXCLUDED, UNSUPPORTED = "system folder", "hidden", "excluded", "unsupported format"
# Files beside photos that are not photos, counted under names a person knows them by:
# metadata sidecars (ours from `export --format xmp` among them) and the files desktop
# systems leave in every folder (macOS, Windows; ``._*`` are AppleDouble resource forks).
SIDECARS, SYSTEM_FILES = "sidecars", "system files"
SIDECAR_EXTENSIONS = frozenset({".xmp", ".aae", ".thm"})
SYSTEM_FILE_NAMES = frozenset(
    {".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", ".picasa.ini", ".localized"}
)


def is_system_file(name: str) -> bool:
    return name.lower() in SYSTEM_FILE_NAMES or name.startswith("._")


def not_an_image_reason(name: str) -> str:
    """Why a file that is not an image is left out: a sidecar, a system file, or its format."""
    if is_system_file(name):
        return SYSTEM_FILES
    return SIDECARS if os.path.splitext(name)[1].lower() in SIDECAR_EXTENSIONS else UNSUPPORTED


@dataclass
class LeftOut:
    """Counts of what the walk did not turn into items, safe to update from the walker thread."""

    files: Counter[tuple[str, str]] = field(default_factory=Counter)  # (reason, extension)
    folders: Counter[str] = field(default_factory=Counter)  # reason
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def file(self, reason: str, name: str) -> None:
        extension = os.path.splitext(name)[1].lower() or "(none)"
        with self._lock:
            self.files[(reason, extension)] += 1

    def folder(self, reason: str) -> None:
        with self._lock:
            self.folders[reason] += 1

    def by_reason(self) -> Counter[str]:
        reasons: Counter[str] = Counter()
        for (reason, _), n in self.files.items():
            reasons[reason] += n
        return reasons

    def to_dict(self) -> dict[str, object]:
        files: dict[str, dict[str, int]] = {}
        for (reason, extension), n in sorted(self.files.items()):
            files.setdefault(reason, {})[extension] = n
        return {"files": files, "folders": dict(sorted(self.folders.items()))}


@dataclass(frozen=True)
class WalkRules:
    excludes: tuple[str, ...] = ()
    include_hidden: bool = False

    def folder_reason(self, name: str, relative: str) -> str | None:
        """Why the folder at ``relative`` (to the SOURCE root) is not walked, or None."""
        if not self.include_hidden:
            if name in SYSTEM_FOLDERS:
                return SYSTEM
            if name.startswith("."):
                return HIDDEN
        return EXCLUDED if self.excluded(name, relative) else None

    def file_reason(self, name: str, relative: str) -> str | None:
        if name.startswith(".") and is_system_file(name):
            return SYSTEM_FILES  # never a photo, hidden or not
        if not self.include_hidden and name.startswith("."):
            return HIDDEN
        return EXCLUDED if self.excluded(name, relative) else None

    def excluded(self, name: str, relative: str) -> bool:
        """A glob matches the name alone or the path relative to the SOURCE root
        (``*.png``, ``tmp``, ``2019/drafts/*``)."""
        return any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(relative, g) for g in self.excludes)
