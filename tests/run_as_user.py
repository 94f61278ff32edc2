"""`python -m tests.run_as_user UID GID ARGS...`: `batchtag ARGS` as another user.

The interpreter lives under /root (pyenv), which other users cannot enter, so it cannot be
started as them: this starts as root, imports what the export and report commands use,
then drops to the user (groups, gid, uid: no way back) before running the command. Tests
use it where root would hide a failure (permissions), as ``os.setuid`` in a subprocess.
"""

from __future__ import annotations

import os
import sys

import batchtag.cli
import batchtag.commands.export
import batchtag.commands.report
import batchtag.config
import batchtag.export.common
import batchtag.export.report
import batchtag.export.sidecar_io
import batchtag.export.table
import batchtag.export.xmp
import batchtag.taggers.rules


def drop_to(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.geteuid() != uid or os.getuid() != uid:
        raise SystemExit("could not drop to the user")


def main() -> int:
    uid, gid, *argv = sys.argv[1:]
    batchtag.taggers.rules.parent_categories()  # its data files are read once, cached
    batchtag.cli.make_parser()  # imports what every subcommand's parser needs (config, ...)
    drop_to(int(uid), int(gid))
    return batchtag.cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
