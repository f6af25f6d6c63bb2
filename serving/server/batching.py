"""Server-side batching on the server's event loop: concurrent Predict calls on one model version,
signature and output filter are concatenated into one model call, then the outputs are split
back per request.

A batch closes when it reaches ``max_batch_size`` rows or when its oldest request has waited
``batch_timeout_micros``; closed batches run on ``num_batch_threads`` threads (the model runs
off the loop, TensorFlow releases the GIL), except those of a model that answers in under
``servable.INLINE_RUN_SECONDS``: they run right on the loop, where the hand-off to a thread
and back would cost more than the call (as unbatched calls do, see ``Core.run``). A batch is
padded up to the next ``allowed_batch_sizes`` entry by repeating its first row; at most
``max_enqueued_batches`` batches wait per queue beyond those running, and a request that
would need another fails with UNAVAILABLE (as TF Serving's shared batch scheduler does).

Everything but the model call runs on the loop thread, so the queues need no locks.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from serving.server.errors import ServingError, invalid
from serving.server.options import Batching
from serving.server.servable import Servable


@dataclass
class _Batch:
    servable: Servable
    signature: str
    output_filter: tuple[str, ...]
    inputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    waiters: list[asyncio.Future[dict[str, np.ndarray]]] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Queue:
    open: _Batch | None = None
    in_flight: int = 0  # closed batches waiting for a thread or running


class Batcher:
    def __init__(self, params: Batching):
        self.params = params
        self._queues: dict[Any, _Queue] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, params.num_batch_threads), thread_name_prefix="batch"
        )
        # Closed batches per queue: those running plus max_enqueued_batches waiting.
        self._limit = max(1, params.num_batch_threads) + max(0, params.max_enqueued_batches)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def submit(
        self,
        servable: Servable,
        signature: str,
        inputs: dict[str, np.ndarray],
        output_filter: tuple[str, ...],
    ) -> dict[str, np.ndarray]:
        """Run ``inputs`` as part of a batch; return its share of the outputs."""
        loop = asyncio.get_running_loop()
        n = -1
        layout = []  # what a batch's requests must share besides their rows
        for alias, value in inputs.items():
            shape = value.shape
            if not shape or (n >= 0 and shape[0] != n):
                n = -1
                break
            n = shape[0]
            layout.append((alias, shape[1:], value.dtype.str))
        if n < 0:
            # No inputs, scalars or ragged batch sizes cannot be concatenated: run alone.
            return await loop.run_in_executor(
                self._pool, servable.run_checked, signature, inputs, output_filter
            )
        if n > self.params.max_batch_size:
            raise invalid(
                f"Task size {n} is larger than maximum input batch size "
                f"{self.params.max_batch_size}"
            )
        key = (id(servable), signature, output_filter, tuple(sorted(layout)))
        queue = self._queues.setdefault(key, _Queue())
        if queue.open is not None and queue.open.rows + n > self.params.max_batch_size:
            self._close(key, queue)
        if queue.open is None:
            if queue.in_flight >= self._limit:
                raise ServingError(
                    grpc.StatusCode.UNAVAILABLE,
                    "The batch scheduling queue to which this task was submitted is full",
                )
            batch = queue.open = _Batch(servable, signature, output_filter)
            batch.timer = loop.call_later(
                self.params.batch_timeout_micros / 1e6, self._timeout, key, batch
            )
        batch = queue.open
        waiter: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        batch.inputs.append(inputs)
        batch.sizes.append(n)
        batch.waiters.append(waiter)
        batch.rows += n
        if batch.rows >= self.params.max_batch_size:
            self._close(key, queue)
        return await waiter

    def _timeout(self, key: Any, batch: _Batch) -> None:
        queue = self._queues.get(key)
        if queue is not None and queue.open is batch:
            self._close(key, queue)

    def _close(self, key: Any, queue: _Queue) -> None:
        batch = queue.open
        assert batch is not None
        queue.open = None
        if batch.timer is not None:
            batch.timer.cancel()
        queue.in_flight += 1
        if batch.servable.runs_inline:
            try:
                results = self._run(batch)
            except Exception as e:  # noqa: BLE001 - every waiter gets the model's error
                self._finish(key, queue, batch, None, e)
            else:
                self._finish(key, queue, batch, results, None)
            return
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._run, batch)
        future.add_done_callback(lambda f: self._finish_future(key, queue, batch, f))

    def _finish_future(
        self, key: Any, queue: _Queue, batch: _Batch, done: asyncio.Future[Any]
    ) -> None:
        if done.cancelled():
            self._finish(key, queue, batch, None, asyncio.CancelledError())
        elif done.exception() is not None:
            self._finish(key, queue, batch, None, done.exception())
        else:
            self._finish(key, queue, batch, done.result(), None)

    def _finish(
        self,
        key: Any,
        queue: _Queue,
        batch: _Batch,
        results: list[dict[str, np.ndarray]] | None,
        error: BaseException | None,
    ) -> None:
        queue.in_flight -= 1
        if queue.open is None and not queue.in_flight:
            self._queues.pop(key, None)
        for i, waiter in enumerate(batch.waiters):
            if waiter.done():
                continue  # the caller went away (cancelled RPC)
            if results is None:
                waiter.set_exception(error or asyncio.CancelledError())
            else:
                waiter.set_result(results[i])

    def _run(self, batch: _Batch) -> list[dict[str, np.ndarray]]:
        """Concatenate, pad, run once, split (on a batch thread, or on the loop)."""
        first = batch.inputs[0]
        inputs = {k: np.concatenate([task[k] for task in batch.inputs]) for k in first}
        target = next((s for s in self.params.allowed_batch_sizes if s >= batch.rows), batch.rows)
        if target > batch.rows:
            inputs = {
                k: np.concatenate([v, np.repeat(v[:1], target - batch.rows, axis=0)])
                for k, v in inputs.items()
            }
        outputs = batch.servable.run_checked(batch.signature, inputs, batch.output_filter)
        results = []
        start = 0
        for size in batch.sizes:
            end = start + size
            results.append(
                {
                    k: (v[start:end] if v.ndim and v.shape[0] == target else v)
                    for k, v in outputs.items()
                }
            )
            start = end
        return results
