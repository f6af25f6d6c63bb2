"""Server-side batching: concurrent Predict calls on one model version, signature and output
filter are concatenated into one model call, then the outputs are split back per request.

A batch closes when it reaches ``max_batch_size`` rows or when its oldest request has waited
``batch_timeout_micros``; ``num_batch_threads`` threads run closed batches; a batch is padded up
to the next ``allowed_batch_sizes`` entry by repeating its first row; at most
``max_enqueued_batches`` batches wait per queue, beyond that a request fails with UNAVAILABLE
(as TF Serving's shared batch scheduler does).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from serving.server.errors import ServingError, invalid
from serving.server.options import Batching
from serving.server.servable import Servable


@dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    rows: int
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, np.ndarray] | None = None
    error: BaseException | None = None


@dataclass
class _Batch:
    servable: Servable
    signature: str
    output_filter: tuple[str, ...]
    opened: float
    tasks: list[_Task] = field(default_factory=list)
    rows: int = 0


@dataclass
class _Queue:
    open: _Batch | None = None
    closed: deque[_Batch] = field(default_factory=deque)


class Batcher:
    def __init__(self, params: Batching):
        self.params = params
        self._queues: dict[Any, _Queue] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
            for i in range(max(1, params.num_batch_threads))
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def submit(
        self,
        servable: Servable,
        signature: str,
        inputs: dict[str, np.ndarray],
        output_filter: tuple[str, ...],
    ) -> dict[str, np.ndarray]:
        """Run ``inputs`` as part of a batch; block until its share of the outputs is ready."""
        rows = {v.shape[0] for v in inputs.values() if v.ndim}
        if len(rows) != 1:
            # Scalars or ragged batch sizes cannot be concatenated: run on their own.
            return servable.run_checked(signature, inputs, output_filter)
        n = rows.pop()
        if n > self.params.max_batch_size:
            raise invalid(
                f"Task size {n} is larger than maximum input batch size "
                f"{self.params.max_batch_size}"
            )
        key = (
            id(servable),
            signature,
            output_filter,
            tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in inputs.items())),
        )
        task = _Task(inputs, n)
        with self._cond:
            queue = self._queues.setdefault(key, _Queue())
            if queue.open is not None and queue.open.rows + n > self.params.max_batch_size:
                self._close(queue)
            if queue.open is None:
                if len(queue.closed) >= self.params.max_enqueued_batches:
                    raise ServingError(
                        grpc.StatusCode.UNAVAILABLE,
                        "The batch scheduling queue to which this task was submitted is full",
                    )
                queue.open = _Batch(servable, signature, output_filter, time.monotonic())
            queue.open.tasks.append(task)
            queue.open.rows += n
            if queue.open.rows >= self.params.max_batch_size:
                self._close(queue)
            self._cond.notify()
        task.done.wait()
        if task.error is not None:
            raise task.error
        assert task.result is not None
        return task.result

    def _close(self, queue: _Queue) -> None:
        assert queue.open is not None
        queue.closed.append(queue.open)
        queue.open = None

    def _next_batch(self) -> _Batch | None:
        timeout = self.params.batch_timeout_micros / 1e6
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                wait = None
                for queue in self._queues.values():
                    if queue.closed:
                        return queue.closed.popleft()
                    if queue.open is not None:
                        due = queue.open.opened + timeout
                        if due <= now:
                            batch = queue.open
                            queue.open = None
                            return batch
                        wait = due - now if wait is None else min(wait, due - now)
                self._cond.wait(wait)
        return None

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: _Batch) -> None:
        try:
            inputs = {
                k: np.concatenate([t.inputs[k] for t in batch.tasks]) for k in batch.tasks[0].inputs
            }
            target = next(
                (s for s in self.params.allowed_batch_sizes if s >= batch.rows), batch.rows
            )
            if target > batch.rows:
                inputs = {
                    k: np.concatenate([v, np.repeat(v[:1], target - batch.rows, axis=0)])
                    for k, v in inputs.items()
                }
            outputs = batch.servable.run_checked(batch.signature, inputs, batch.output_filter)
            start = 0
            for task in batch.tasks:
                end = start + task.rows
                task.result = {
                    k: (v[start:end] if v.ndim and v.shape[0] == target else v)
                    for k, v in outputs.items()
                }
                start = end
        except BaseException as e:  # noqa: BLE001 - every waiting request gets the error
            for task in batch.tasks:
                task.error = e
        finally:
            for task in batch.tasks:
                task.done.set()
