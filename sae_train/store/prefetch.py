"""Run an iterator in a background thread, a few items ahead of its consumer.

Torch and numpy release the GIL in the heavy work (gathers, copies, conversions), so the
next batches get ready while the trainer computes. The thread stops when the consumer
closes or drops the generator, and at interpreter exit: a daemon thread still inside torch
while Python shuts down aborts the process ("terminate called without an active exception").
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")
_RUNNING: set[tuple[threading.Event, threading.Thread]] = set()


@atexit.register
def _stop_all() -> None:
    running = list(_RUNNING)
    for stop, _ in running:
        stop.set()
    for _, thread in running:
        thread.join()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def prefetched(items: Generator[T, None, None], depth: int) -> Generator[T, None, None]:
    """Yield what `items` yields, computed in a daemon thread up to `depth` items ahead.

    An exception in the thread is raised here, in the consumer, with its traceback.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)  # wakes up now and then to notice `stop`
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failed(e))
        finally:
            items.close()

    thread = threading.Thread(target=produce, name="store-prefetch", daemon=True)
    entry = (stop, thread)
    _RUNNING.add(entry)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
        _RUNNING.discard(entry)
