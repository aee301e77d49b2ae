"""No silent waits: a wait that passes `after_s` says what it waits for and since when.

    waits = Waits(say, log, after_s=30)
    with waits.on("the vLLM engine to start"):
        await EnginePool.start(...)

A watchdog thread (not a task: an event loop blocked in a long call would silence an asyncio
watchdog just when it is needed) looks at the innermost open wait every POLL_S and, once it has
lasted `after_s`, and again every `after_s`, says "waiting 31 s for <what> (since 16:40:02)" on
the console (the progress line's messages) and to `log` (errors.log). `what` may be a function,
called at each report: it can say what changed meanwhile (the engine's version, samples dropped).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable

POLL_S = 1.0

Description = str | Callable[[], str]


class Waits:
    def __init__(self, say: Callable[[str], None], log: Callable[[str], None] | None = None,
                 after_s: float = 30.0) -> None:
        self.say, self.log, self.after_s = say, log, after_s
        self._open: list[list] = []  # [what, since (wall time), reports made], innermost last
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def on(self, what: Description, since: float | None = None):
        """Open a wait for `what` for the body of the `with`; `since` (a `time.time()`) dates
        it back, for a wait that spans several calls (rounds of stale rollouts)."""
        entry = [what, time.time() if since is None else since, 0]
        with self._lock:
            self._open.append(entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="parityrl-waits",
                                                daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._open = [e for e in self._open if e is not entry]

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            with self._lock:
                entry = self._open[-1] if self._open else None
                due = entry is not None and time.time() - entry[1] >= self.after_s * (entry[2] + 1)
                if due:
                    entry[2] += 1
            if due:
                self._report(entry)

    def _report(self, entry: list) -> None:
        what, since, _ = entry
        try:
            text = what() if callable(what) else what
        except Exception as e:  # noqa: BLE001 - a report must never end the run
            text = f"(its description failed: {e!r})"
        line = (f"waiting {time.time() - since:.0f} s for {text} "
                f"(since {time.strftime('%H:%M:%S', time.localtime(since))})")
        self.say(line)
        if self.log is not None:
            self.log(line)
