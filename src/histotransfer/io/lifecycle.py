"""How a command starts and ends, in one place for the CLI and the KFP components: SIGTERM (what
``docker stop`` and Kubernetes send) ends it as Ctrl-C does (what finished is kept and summarised, a
rerun resumes), and the output folders it locked are released."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from histotransfer.core.errors import Terminated
from histotransfer.io.outputs import release_all


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """Run a command: SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread while it runs;
    its folder locks are released when it ends, however it ends."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        yield
    finally:
        if main:  # a handler installed outside Python reads as None: restore the default then
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        release_all()
