"""``python -m batchtag`` and the ``batchtag`` command: the signal handlers go in before
anything slow is imported, so Ctrl-C and SIGTERM mean 130 from the first moment on
(interrupts.py says what is left before that)."""

import sys

from batchtag.interrupts import INTERRUPTS


def main() -> int:
    INTERRUPTS.install()
    from batchtag.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
