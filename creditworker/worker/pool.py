"""Celery's prefork pool, with threads that stop at once.

billiard's `TimeoutHandler` checks time limits once a second with `time.sleep(1.0)` and its
`Supervisor` checks the processes every 0.8 s the same way, and the pool joins both when it
stops: an idle worker waited for those sleeps to end. These wait on an event that closing
the pool sets.
Set as `worker_pool` (worker/app.py): `--pool=prefork` on the command line then picks it, so
the command lines stay Celery's own (tests/e2e/test_quiet_up.py times the stop).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from billiard.common import TERM_SIGNAL, restart_state
from billiard.exceptions import RestartFreqExceeded
from billiard.pool import DEATH, EX_FAILURE, EX_OK, RUN, CoroStop, Supervisor, TimeoutHandler
from billiard.pool import Pool as BlockingPool
from billiard.pool import Worker as BlockingWorker
from celery.concurrency.asynpool import AsynPool
from celery.concurrency.asynpool import Worker as AsynPoolWorker
from celery.concurrency.prefork import TaskPool as PreforkTaskPool
from celery.utils import timer2

CHECK_SECONDS = 1.0
"""How often the time limits are checked (billiard's own period)."""


class PromptTimeoutHandler(TimeoutHandler):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._woken = threading.Event()
        super().__init__(*args, **kwargs)

    def body(self) -> None:
        while self._state == RUN:
            try:
                for _ in self.handle_timeouts():
                    self._woken.wait(CHECK_SECONDS)
            except CoroStop:
                break

    def terminate(self) -> None:
        super().terminate()
        self._woken.set()


class PromptSupervisor(Supervisor):  # type: ignore[misc]
    """billiard's, whose 0.8 s pauses between pool checks end when the pool closes (the
    pool's `close` joins this thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._woken = threading.Event()
        super().__init__(*args, **kwargs)

    def body(self) -> None:
        pool = self.pool
        self._woken.wait(0.8)
        try:
            previous = pool.restart_state
            pool.restart_state = restart_state(10 * pool._processes, 1)
            for _ in range(10):
                if self._state == RUN and pool._state == RUN:
                    pool._maintain_pool()
                    self._woken.wait(0.1)
            pool.restart_state = previous
            while self._state == RUN and pool._state == RUN:
                pool._maintain_pool()
                self._woken.wait(0.8)
        except RestartFreqExceeded:
            pool.close()
            pool.join()
            raise

    def close(self) -> None:
        super().close()
        self._woken.set()

    def terminate(self) -> None:
        super().terminate()
        self._woken.set()


class _PromptExit:
    """A pool process that exits as soon as its parent can know: billiard's `_do_exit` sends
    its DEATH message, then sleeps a whole second before `os._exit`, and the worker's stop
    waits for that second. The message is in the pipe once `put` returned; a moment's
    pause is left for the parent to read it."""

    on_exit: Any
    outq: Any

    def _do_exit(self, pid: int, exitcode: int | None, exc: BaseException | None = None) -> None:
        if exitcode is None:
            exitcode = EX_FAILURE if exc else EX_OK
        if self.on_exit is not None:
            self.on_exit(pid, exitcode)
        try:
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {TERM_SIGNAL})
            try:
                self.outq.put((DEATH, (pid, exitcode)))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            time.sleep(EXIT_PAUSE_SECONDS)
        finally:
            os._exit(exitcode)


class PromptBlockingWorker(_PromptExit, BlockingWorker):  # type: ignore[misc]
    pass


class PromptAsynWorker(_PromptExit, AsynPoolWorker):  # type: ignore[misc]
    pass


class PromptTimer(timer2.Timer):  # type: ignore[misc]
    """Celery's timer thread (the worker's, where the transport has no event loop) waits up to
    a second for its next entry, and a stopping worker waits for it: stopping wakes it."""

    def stop(self) -> None:
        self._Timer__is_shutdown.set()  # timer2.Timer's own flag, set first by its `stop` too
        with self.not_empty:
            self.not_empty.notify_all()
        super().stop()


EXIT_PAUSE_SECONDS = 0.1
"""billiard pauses 1 s; a tenth is ample for the parent to read the DEATH message."""


class PromptBlockingPool(BlockingPool):  # type: ignore[misc]
    TimeoutHandler = PromptTimeoutHandler
    Supervisor = PromptSupervisor
    Worker = PromptBlockingWorker


class PromptAsynPool(AsynPool):  # type: ignore[misc]
    TimeoutHandler = PromptTimeoutHandler
    Supervisor = PromptSupervisor
    Worker = PromptAsynWorker


class TaskPool(PreforkTaskPool):  # type: ignore[misc]
    Pool = PromptAsynPool
    BlockingPool = PromptBlockingPool
    Timer = PromptTimer
