"""A bounded-concurrency priority queue for judge requests (evaluation and older groups first).

KLong's judge sits behind a priority queue so evaluation grading and older rollout groups finish
before newer ones. Jobs with a smaller priority tuple run first; at most `max_concurrency` run at
once; FIFO among equal priorities.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

EVAL_PRIORITY = 0
TRAIN_PRIORITY = 1


class JudgeQueue:
  """Runs submitted callables on `max_concurrency` daemon threads, lowest priority first."""

  def __init__(self, max_concurrency: int = 8):
    if max_concurrency < 1:
      raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    self.max_concurrency = max_concurrency
    self._q: queue.PriorityQueue = queue.PriorityQueue()
    self._seq = itertools.count()
    self._threads: list[threading.Thread] = []
    self._lock = threading.Lock()
    self._closed = False

  def _worker(self) -> None:
    while True:
      _, _, item = self._q.get()
      if item is None:
        return
      fn, fut = item
      if not fut.set_running_or_notify_cancel():
        continue
      try:
        fut.set_result(fn())
      except BaseException as e:  # noqa: BLE001 - delivered to the waiter
        fut.set_exception(e)

  def submit(self, fn: Callable[[], Any], priority: tuple | int = TRAIN_PRIORITY
             ) -> concurrent.futures.Future:
    """Queues `fn()`; `priority` is e.g. (EVAL_PRIORITY,) or (TRAIN_PRIORITY, group_index)."""
    with self._lock:
      if self._closed:
        raise RuntimeError("JudgeQueue is closed")
      if len(self._threads) < self.max_concurrency:
        t = threading.Thread(target=self._worker, daemon=True, name="judge-queue")
        t.start()
        self._threads.append(t)
    fut: concurrent.futures.Future = concurrent.futures.Future()
    key = priority if isinstance(priority, tuple) else (priority,)
    self._q.put((key, next(self._seq), (fn, fut)))
    return fut

  def close(self) -> None:
    """Stops the workers after the queued jobs finish."""
    with self._lock:
      self._closed = True
      threads = list(self._threads)
    for _ in threads:
      self._q.put(((float("inf"),), next(self._seq), None))
    for t in threads:
      t.join()
