"""Training jobs in worker processes: ``persona-gym train --workers N``.

The jobs (one per adapter name) go into one queue; N spawned processes each set themselves up
once (load the model, the examples and the cached frozen-layer activations), then take names
from the queue until it is empty and send back each job's result as soon as it is done, so the
parent can record it (and a killed run loses no finished adapter). What a job computes does
not depend on which worker runs it or in which order: every adapter seeds its own RNGs.

Each worker runs ``threads`` torch threads (the parent's threads split over the workers), logs
through the parent's handlers (its records are relayed there), and exits when the parent dies
(a watchdog thread), so a killed run leaves no orphan training on. A worker's error is raised
again in the parent, which stops the other workers; a worker that dies without one (killed,
out of memory) fails the run with a line that says to rerun the command to resume.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from persona_gym.errors import PersonaGymError

log = logging.getLogger(__name__)

#: builds a worker's job runner from its rank (0..N-1), in the worker process; picklable
Setup = Callable[[int], Callable[[str], Any]]

_POLL_SECONDS = 0.5


class WorkerError(PersonaGymError, RuntimeError):
    """A worker process died without reporting an error (killed, out of memory)."""


def worker_threads(workers: int) -> int:
    """Torch threads per worker: the threads this process would use, split over the workers."""
    return max(1, torch.get_num_threads() // workers)


def run_in_workers(
    setup: Setup,
    names: list[str],
    workers: int,
    resume_hint: str = "",
) -> Iterator[tuple[str, Any]]:
    """Run the job of every name in ``workers`` spawned processes; yield ``(name, result)`` in
    the order the jobs finish. ``resume_hint`` ends the error line of a dead worker."""
    context = multiprocessing.get_context("spawn")  # fork is unsafe after torch started threads
    tasks: multiprocessing.Queue = context.Queue()
    results: multiprocessing.Queue = context.Queue()
    records: multiprocessing.Queue = context.Queue()
    for name in names:
        tasks.put(name)
    for _ in range(workers):
        tasks.put(None)  # one stop sign per worker
    level = logging.getLogger().getEffectiveLevel()
    threads = worker_threads(workers)
    processes = [
        context.Process(
            target=_work,
            name=f"persona-gym-train-{rank}",
            args=(setup, rank, threads, level, tasks, results, records),
        )
        for rank in range(workers)
    ]
    relay = logging.handlers.QueueListener(records, _Relay())
    relay.start()
    log.info(
        "training %d adapters in %d worker processes, %d torch threads each",
        len(names),
        workers,
        threads,
    )
    pending = set(names)
    try:
        for process in processes:
            process.start()
        while pending:
            try:
                kind, key, value = results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                failure = _failure(processes, pending, resume_hint)
                if failure is None:
                    continue
                yield from _drain(results, pending)  # what finished before the death still counts
                if pending:
                    raise failure from None
                break
            if kind == "error":
                error, trace = value
                log.debug("worker %d failed:\n%s", key, trace)
                raise error
            pending.discard(key)
            yield key, value
        for process in processes:
            process.join(timeout=30)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=30)
        relay.stop()


def _failure(processes: list, pending: set[str], resume_hint: str) -> WorkerError | None:
    """The error to raise when a worker died, or when all exited with jobs still pending."""
    dead = [(rank, p.exitcode) for rank, p in enumerate(processes) if p.exitcode not in (None, 0)]
    if not dead and any(p.exitcode is None for p in processes):
        return None
    rank, code = dead[0] if dead else (0, 0)
    return WorkerError(
        f"training worker {rank} exited with status {code} before finishing "
        f"{', '.join(sorted(pending))}" + (f"; {resume_hint}" if resume_hint else "")
    )


def _drain(results: multiprocessing.Queue, pending: set[str]) -> Iterator[tuple[str, Any]]:
    """The finished jobs still in the queue."""
    while True:
        try:
            kind, key, value = results.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            return
        if kind == "error":
            raise value[0]
        pending.discard(key)
        yield key, value


class _Relay(logging.Handler):
    """Hands a worker's log record to the parent's logger of the same name."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def _work(
    setup: Setup,
    rank: int,
    threads: int,
    level: int,
    tasks: multiprocessing.Queue,
    results: multiprocessing.Queue,
    records: multiprocessing.Queue,
) -> None:
    """A worker's main function: set up, then run jobs until the stop sign."""
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level)
    torch.set_num_threads(threads)
    try:
        run = setup(rank)
        while (name := tasks.get()) is not None:
            results.put(("done", name, run(name)))
    except BaseException as error:  # noqa: BLE001 - every failure goes to the parent
        results.put(("error", rank, (_picklable(error), traceback.format_exc())))


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - an exception that does not survive pickling
        return RuntimeError(f"{type(error).__name__}: {error}")


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)
