"""Write-behind: a thread that writes a run's merged tensors while the next unit is computed.

Why: writing (and fsyncing) a unit's bytes takes disk time during which the CPU would idle; on its own
thread it overlaps the next unit's merge. The ShardWriter's rules are unchanged: tensors are written
in layout order, and at the end of each unit one commit() makes its bytes durable before they are
journaled, then the unit's `after` callback runs (e.g. its solve records, appended only once the
tensors they describe are journaled, as a single-threaded run does). Memory stays bounded because
the producer waits (wait_pending) until at most `max_units` units are queued or being written.
An error on the thread (a full disk) is re-raised in the producer at its next call.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from bmmstream.output.writer import ShardWriter

_STOP = object()
_UNIT = object()


class WriteBehind:
    def __init__(self, writer: ShardWriter, on_written: Callable[[str], None] | None = None):
        self.writer = writer
        self._on_written = on_written
        self._q: queue.Queue = queue.Queue()
        self._cv = threading.Condition()
        self._queued_units = 0  # units handed over (end_unit) ...
        self._done_units = 0  # ... and units committed
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bmm-write-behind", daemon=True)
        self._thread.start()

    # -- producer side ----------------------------------------------------------------------
    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Queue `name` (the next tensor of the layout, in its output dtype on the CPU)."""
        self._raise()
        self._q.put((name, tensor))

    def end_unit(self, after: Callable[[], None] | None = None) -> None:
        """The unit's tensors are all queued: commit them, then run `after` on the writer thread."""
        self._raise()
        with self._cv:
            self._queued_units += 1
        self._q.put((_UNIT, after))

    @property
    def queued_units(self) -> int:
        return self._queued_units

    @property
    def done_units(self) -> int:
        with self._cv:
            return self._done_units

    def wait_pending(self, max_units: int) -> None:
        """Block until at most `max_units` handed-over units are not committed yet."""
        with self._cv:
            while self._error is None and self._queued_units - self._done_units > max_units:
                self._cv.wait()
        self._raise()

    def close(self) -> None:
        """Write what is queued, stop the thread; re-raise its error if it had one."""
        self._stop()
        self._raise()

    def abort(self) -> None:
        """Stop after writing what is queued (the producer failed); the thread's own error is dropped."""
        self._stop()

    # -- internals ----------------------------------------------------------------------------
    def _stop(self) -> None:
        if self._thread.is_alive():
            self._q.put((_STOP, None))
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            name, item = self._q.get()
            if name is _STOP:
                return
            if self._error is not None:
                continue  # drain: nothing after a failed write may be written
            try:
                if name is _UNIT:
                    self.writer.commit()
                    if item is not None:
                        item()
                    with self._cv:
                        self._done_units += 1
                        self._cv.notify_all()
                else:
                    self.writer.write(name, item, commit=False)
                    del item
                    if self._on_written is not None:
                        self._on_written(name)
            except BaseException as e:  # handed to the producer
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
