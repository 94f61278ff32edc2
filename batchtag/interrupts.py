"""Ctrl-C and SIGTERM, from start-up to exit: exit status 130 and no traceback, finished
records flushed, and the process gone within about 2 seconds whatever its threads are doing.

The handler never raises where the main thread happens to be (an exception from a signal
handler can land in importlib, a finaliser or the interpreter's shutdown, and come out as
a traceback or a bare -2). What a signal does depends on the phase the main thread has
declared:

- ``IDLE`` (start-up: imports, settings; and after a run returned its summary): nothing
  is being written, so the process leaves at once with 130.
- ``RUNNING``: the run's cancel hook is called (thread-safe), which flushes every finished
  record and returns a summary; ``cli`` then exits 130.
- ``RAISING`` (export and report, which write through temp files that an exception
  removes): KeyboardInterrupt in the main thread, as Python does by default.
- ``FINISHING`` (everything written and reported): leave at once with 130.

In every phase a watcher thread, woken by the signal itself through
``signal.set_wakeup_fd`` (whichever thread the kernel delivered it to), ends the process
after ``GRACE_S`` if the orderly path has not: a worker stuck in a read from a hung disk or
a pipe must not keep a stopped run alive. A second signal ends it at once.

What remains: a signal before ``install`` runs (the interpreter's own start-up and the
import of this module, tens of milliseconds) gets Python's default: SIGTERM ends the
process as -15, SIGINT raises KeyboardInterrupt (-2 with a traceback); nothing has been
read or written then. After the interpreter's exit clean-up begins the signals are ignored
(the exit status the run chose stands). Only light imports here: this module is loaded
before anything slow.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import os
import signal
from collections.abc import Callable

TYPE_CHECKING = False  # typing, socket and threading load after the handlers are in
if TYPE_CHECKING:
    import socket

# The exit status of an interrupted run. errors.EXIT_STATUS reads it from here, so that
# this module, the first one loaded, needs nothing from the package (codes, typing).
EXIT_INTERRUPTED = 130
GRACE_S = 1.5  # from the signal to a forced exit, when the orderly path is slower
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Phase(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    RAISING = "raising"
    FINISHING = "finishing"


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
        self._phase = Phase.IDLE
        self._installed = False
        self.signalled = False

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (main thread only, once). The Python handlers go
        first: from then on a signal is 130, even before the watcher runs."""
        if self._installed:
            return
        self._installed = True
        for signum in SIGNALS:
            signal.signal(signum, self._handle)
        import socket  # only now: every import before the handlers is a window of Python's default
        import threading

        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._keep = (reader, writer)  # the sockets live as long as the process
        threading.Thread(target=self._watch, args=(reader,), name="batchtag-signals", daemon=True).start()
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        # Registered first, so it runs last: the interpreter's final clean-up puts SIG_DFL
        # back for handled signals, and a SIGTERM in that window would end the process as
        # -15 after a complete run. Ignored signals are left alone.
        atexit.register(ignore_signals)

    def running(self, cancel: Callable[[], None] | None) -> None:
        """While a run is going, a signal calls ``cancel`` (thread-safe); ``None`` when it
        has returned. A signal the watcher saw just before the hook was set still cancels:
        the watcher sets ``signalled`` before it reads the hook, this reads it after."""
        self._cancel = cancel
        self._phase = Phase.IDLE if cancel is None else Phase.RUNNING
        if cancel is not None and self.signalled:
            cancel()

    def raising(self) -> None:
        """From now on a signal raises KeyboardInterrupt in the main thread, so that the
        command's own clean-up (temp files) runs before the exit."""
        self._phase = Phase.RAISING

    def finishing(self) -> None:
        """Everything is written and reported: a signal now just ends the process."""
        self._phase = Phase.FINISHING

    def _handle(self, signum: int, frame: object) -> None:
        """The Python-level handler, in the main thread between two bytecodes: it sees the
        phase the main thread is in, with no race."""
        self.signalled = True
        if self._phase is Phase.RAISING:
            raise KeyboardInterrupt
        if self._phase is Phase.FINISHING:
            os._exit(EXIT_INTERRUPTED)
        if self._phase is Phase.IDLE:
            hard_exit()
        # RUNNING: the watcher cancels the run

    def _watch(self, reader: socket.socket) -> None:
        """Woken by the C-level handler: cancel the run, then enforce the deadline."""
        while reader.recv(1)[0] not in SIGNALS:
            pass  # another signal with a Python handler (none of ours today)
        self.signalled = True
        if self._phase is Phase.FINISHING:
            os._exit(EXIT_INTERRUPTED)
        cancel = self._cancel
        if cancel is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                cancel()
        reader.settimeout(GRACE_S)
        with contextlib.suppress(TimeoutError):
            reader.recv(1)  # a second signal: no more waiting
        hard_exit()


INTERRUPTS = Interrupts()
