import sys

# Ctrl-C and SIGTERM mean exit 130 from the first moment on: before the slow imports.
from batchtag.interrupts import EXIT_INTERRUPTED, INTERRUPTS

try:
    INTERRUPTS.install()
    from batchtag.cli import main
except KeyboardInterrupt:
    sys.exit(EXIT_INTERRUPTED)

sys.exit(main())
