"""How a command stops on Ctrl-C (SIGINT) or SIGTERM: one line on stderr and exit 130 or 143, from
the first moment of its process to the last, however many signals come.

A command's entry point (``train.py``, ``python -m normstudy.study``) calls :func:`install` before
its imports (importing torch takes seconds): a signal while the command starts ends it at once,
nothing having been written. While the command works (:func:`handled`, which
:func:`normstudy.cli.exit_code` holds around it), the first signal unwinds it: ``KeyboardInterrupt``
(SIGINT) or ``SystemExit(143)`` (SIGTERM), raised in the main thread, so that every run stops as on
an error (temporary files removed, the last complete epoch in its checkpoint; runs in other threads
stop after their current epoch) and the command says its line. Any later signal, and any signal once
the work is done, quits now: the line is said (unless it was), files that other threads are writing
are completed (a few seconds at most), and the process ends with ``os._exit``. Ending it the usual
way would shut the interpreter down under worker threads still in the middle of an epoch, which
aborts in C++ (``terminate called without an active exception``, exit 134).

Called in-process (tests, a notebook calling a command's ``main``), :func:`handled` installs the
handlers for the command's duration only and never ends the process: every signal raises.

This module imports nothing heavy: it is the first thing an entry point imports.
"""
import contextlib
import gc
import os
import signal
import sys
import threading
import time

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
CODES = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_TERMINATED}
WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
WRITE_GRACE_SECONDS = 10  # quitting waits this long at most for files other threads are writing


class _State:
    prog = "normstudy"
    kept = ""  # what is saved and how to go on: the end of the line
    phase = None  # None (not handled), "starting", "working", "done"
    owns_process = False  # installed by an entry point: a later signal may end the process
    first = None  # the signal that unwound the command
    said = saying = quitting = False
    pending = None  # a signal that came while the line was being said


_state = _State()


def install(prog):
    """From now on, handle SIGINT and SIGTERM for the command ``prog``, which owns this process: its
    entry point calls this first, before the imports (see the module docstring)."""
    _reset(prog, kept="", phase="starting", owns_process=True)
    for signum in CODES:
        signal.signal(signum, _on_signal)


@contextlib.contextmanager
def handled(prog, kept):
    """While the command ``prog`` works: the first signal raises (``KeyboardInterrupt``, or
    ``SystemExit(143)``), later ones quit now; ``kept`` ends the line (what is saved and how to go
    on). Where no entry point installed the handlers (the command called in-process), they are
    installed for this while only, the previous ones restored after, and every signal raises."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    owned = _state.owns_process
    previous = None if owned else {signum: signal.getsignal(signum) for signum in CODES}
    _reset(prog, kept=kept, phase="working", owns_process=owned)
    if not owned:
        for signum in CODES:
            signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        if owned:
            _state.phase = "done"
        else:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            _state.phase = None


def work_done():
    """The command's work has ended (returned or raised): from now on a signal quits at once rather
    than raise into the lines that report how it ended.

    A command that owns its process is about to exit, so every object it holds is also moved out
    of the garbage collector's reach (``gc.freeze``): the interpreter's last collection then skips
    the million-odd objects that torch and the run left, and the process ends in 0.23-0.27 s
    instead of 0.71-0.89 s (``python -c "import torch"``, 2-core CPU). Only the collection of
    cycles is skipped; atexit handlers, flushes and files are as before, and every file a command
    writes is whole and synced when written (``checkpoints.atomic_write``)."""
    if _state.owns_process and _state.phase == "working":
        _state.phase = "done"
        gc.freeze()


def say(signum):
    """The command's one line for ``signum`` on stderr (once): ``PROG: interrupted; KEPT``."""
    if _state.said or _state.saying:
        return
    _state.saying = True  # a signal meanwhile waits for the line (see _on_signal)
    try:
        what = WORDS[signum] + (" before it started; nothing was written" if _state.phase == "starting"
                                else f"; {_state.kept}" if _state.kept else "")
        print(f"{_state.prog}: {what}", file=sys.stderr, flush=True)
        _state.said = True
    finally:
        _state.saying = False
    if _state.pending is not None:
        quit_now(_state.pending)


def quit_now(signum):
    """End the process at once (see the module docstring), with the first signal's exit code."""
    if _state.quitting:
        return
    _state.quitting = True
    signum = _state.first or signum
    try:
        say(signum)
        _finish_writes()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    finally:  # whatever happens above, the process ends here
        os._exit(CODES[signum])


def _reset(prog, *, kept, phase, owns_process):
    _state.prog, _state.kept, _state.phase, _state.owns_process = prog, kept, phase, owns_process
    _state.first = _state.pending = None
    _state.said = _state.saying = _state.quitting = False


def _on_signal(signum, frame):
    if not _state.owns_process:  # in-process: raise every time, as Python's own handler would
        _state.first = _state.first or signum
        _raise(signum)
    if _state.saying:
        _state.pending = signum
        return
    if _state.phase == "working" and _state.first is None:
        _state.first = signum
        _raise(signum)
    quit_now(signum)


def _raise(signum):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(EXIT_TERMINATED)


def _finish_writes():
    """Let the files other threads are writing (a checkpoint, a record) be completed, then remove
    the temporary files of the writes that will not be: this thread's, interrupted by the signal,
    and any other still unfinished after :data:`WRITE_GRACE_SECONDS`."""
    # Not imported yet (or half imported, the signal coming meanwhile): nothing is being written.
    writing = getattr(sys.modules.get("normstudy.checkpoints"), "WRITING", {})
    me = threading.get_ident()
    deadline = time.monotonic() + WRITE_GRACE_SECONDS
    while any(thread != me for thread in list(writing)) and time.monotonic() < deadline:
        time.sleep(0.01)
    for path in list(writing.values()):
        with contextlib.suppress(OSError):
            os.unlink(path)
