"""Steps that must not be cut in half: Ctrl-C is held back until they are done.

Python raises KeyboardInterrupt between any two bytecodes of the main thread. The few steps that
move a parameter between its dense and its managed state (a handful of assignments) and the
whole of a restore run with SIGINT deferred: a Ctrl-C in the middle is remembered and raised as
soon as the step is complete, so a parameter is always wholly dense or wholly managed.
"""
from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_interrupts():
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are delivered to the main thread only
        return
    try:
        old = signal.getsignal(signal.SIGINT)
    except (ValueError, TypeError):  # pragma: no cover - an embedded interpreter
        yield
        return
    if old is None or old is signal.SIG_IGN or old is signal.SIG_DFL:
        yield  # Python does not own SIGINT here: nothing raises between our bytecodes
        return
    caught = []

    def hold(signum, frame):
        caught.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught and callable(old):
            old(*caught[0])  # the default handler raises KeyboardInterrupt now
