"""Ctrl-C and SIGTERM, from start-up to exit: exit status 130, finished records flushed,
and the process gone within about 2 seconds whatever its threads are doing.

Three phases. Starting (imports, settings, the resume scan): the signal raises
KeyboardInterrupt in the main thread, nothing has been written yet. Running: the run's
task is cancelled, which flushes every finished record and returns a summary. Finishing
(after the summary): exit at once. In every phase a watcher thread, woken by the signal
itself through ``signal.set_wakeup_fd`` (whichever thread the kernel delivered it to),
ends the process after ``GRACE_S`` if the orderly path has not: a worker stuck in a read
from a hung disk or a pipe must not keep a stopped run alive. A second signal ends it at
once. Only light imports here: this module is loaded before anything slow.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable

from batchtag.errors import Outcome, exit_status

EXIT_INTERRUPTED = exit_status(Outcome.INTERRUPTED)
GRACE_S = 1.5  # from the signal to a forced exit, when the orderly path is slower
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def hard_exit() -> None:
    """Leave now with 130. Records written so far are in the kernel already (each batch is
    one write); answers still waiting for the writer's 50 ms batch are asked again by the
    rerun, which costs less than waiting on a stuck thread."""
    with contextlib.suppress(OSError):
        os.write(2, b"batchtag: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def ignore_signals() -> None:
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class Interrupts:
    def __init__(self) -> None:
        self._cancel: Callable[[], None] | None = None
        self._finishing = False
        self._installed = False
        self.signalled = False

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (main thread only, once)."""
        if self._installed:
            return
        self._installed = True
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._keep = (reader, writer)  # the sockets live as long as the process
        threading.Thread(target=self._watch, args=(reader,), name="batchtag-signals", daemon=True).start()
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        for signum in SIGNALS:
            signal.signal(signum, self._handle)
        # Registered first, so it runs last: the interpreter's final clean-up puts SIG_DFL
        # back for handled signals, and a SIGTERM in that window would end the process as
        # -15 after a complete run. Ignored signals are left alone.
        atexit.register(ignore_signals)

    def running(self, cancel: Callable[[], None] | None) -> None:
        """While a run is going, a signal calls ``cancel`` (thread-safe) instead of raising."""
        self._cancel = cancel

    def finishing(self) -> None:
        """Everything is written and reported: a signal now just ends the process."""
        self._finishing = True

    def _handle(self, signum: int, frame: object) -> None:
        """The Python-level handler, in the main thread between two bytecodes."""
        if self._finishing:
            os._exit(EXIT_INTERRUPTED)
        if self._cancel is None:
            raise KeyboardInterrupt

    def _watch(self, reader: socket.socket) -> None:
        """Woken by the C-level handler: cancel the run, then enforce the deadline."""
        while reader.recv(1)[0] not in SIGNALS:
            pass  # another signal with a Python handler (none of ours today)
        self.signalled = True
        if self._finishing:
            os._exit(EXIT_INTERRUPTED)
        if self._cancel is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._cancel()
        reader.settimeout(GRACE_S)
        with contextlib.suppress(TimeoutError):
            reader.recv(1)  # a second signal: no more waiting
        hard_exit()


INTERRUPTS = Interrupts()
