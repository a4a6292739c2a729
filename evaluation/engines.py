"""Where the images are evaluated: worker processes on this machine, or Ray actors on a cluster.

Both engines take the same tasks and hand each ``Outcome`` to ``on_outcome`` as soon as it arrives, so the
caller stores it at once: an interruption loses at most the images in flight.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from .worker import Evaluator, Outcome, Setup, Task

OnOutcome = Callable[[Outcome], None]
RAY_CONNECT_TIMEOUT = 15.0  # seconds to reach a --ray-address before giving up
RAY_POLL = 5.0  # seconds between checks while waiting for results
RAY_DEFAULT_THREADS = 4  # per actor: a full-resolution image takes GBs, so not one actor per core by default


class EngineError(RuntimeError):
    pass


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- local

_evaluator: Evaluator | None = None


def _init_worker(setup: Setup) -> None:
    global _evaluator
    _evaluator = Evaluator(setup)


def _run_task(task: Task) -> Outcome:
    assert _evaluator is not None
    return _evaluator(task)


def local_setup(setup: Setup, workers: int) -> Setup:
    """``setup`` with each worker's share of the machine's threads."""
    threads = setup.execution.threads or max(1, cpu_count() // workers)
    return replace(setup, execution=replace(setup.execution, threads=threads))


def run_local(
    tasks: Iterable[Task], setup: Setup, workers: int, on_outcome: OnOutcome, evaluator: Evaluator | None = None
) -> None:
    """``workers`` processes (one: this process, with ``evaluator`` when given), each with its share of the
    machine's threads (``local_setup``)."""
    if workers == 1:
        evaluator = evaluator or Evaluator(setup)
        for task in tasks:
            on_outcome(evaluator(task))
        return
    # spawn, not fork: a forked child inherits torch's thread pools in an unusable state
    context = multiprocessing.get_context("spawn")
    queue = deque(tasks)
    with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(setup,)) as pool:
        pending: set[futures.Future] = set()
        try:
            while queue or pending:
                while queue and len(pending) < 2 * workers:  # a few queued per worker, never the whole dataset
                    pending.add(pool.submit(_run_task, queue.popleft()))
                done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for future in done:
                    on_outcome(future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# ---------------------------------------------------------------- Ray


class RayWorker:
    """A Ray actor: one model, loaded once, evaluating task after task."""

    def __init__(self, setup: Setup) -> None:
        self.evaluator = Evaluator(setup)

    def evaluate(self, task: Task) -> Outcome:
        return self.evaluator(task)


def _check_reachable(address: str) -> None:
    """Fail fast (and clearly) when a host:port address does not answer; ray.init could wait long."""
    if address in ("auto", "local") or ":" not in address:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT):
            pass
    except (OSError, ValueError) as e:
        raise EngineError(f"--ray-address {address}: cannot reach the cluster ({e})") from None


def run_ray(
    tasks: Iterable[Task],
    setup: Setup,
    workers: int | None,
    address: str | None,
    on_outcome: OnOutcome,
) -> dict:
    """Ray actors (the model loaded once in each); results stored as they arrive. Returns the cluster's shape.

    Without ``address`` a local Ray instance is started and stopped here. Images and the weight file travel
    through Ray's object store, so the workers need no shared filesystem.
    """
    try:
        import ray
    except ImportError:
        raise EngineError("--engine ray needs Ray: pip install 'mantranet-torch[ray]'") from None
    threads = setup.execution.threads
    if address:
        _check_reachable(address)
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        threads = threads or min(RAY_DEFAULT_THREADS, cpu_count())
        ray.init(
            num_cpus=(workers or max(1, cpu_count() // threads)) * threads,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
    try:
        node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        threads, workers = _ray_shape(node_cpus, threads, workers)
        cpus, nodes = sum(node_cpus), len(node_cpus)
        data = Path(setup.weights).read_bytes()
        remote_setup = replace(setup, weights_data=data, execution=replace(setup.execution, threads=threads))
        setup_ref = ray.put(remote_setup)
        actor_class = ray.remote(num_cpus=threads)(RayWorker)
        actors = [actor_class.remote(setup_ref) for _ in range(workers)]
        queue = deque(tasks)
        pending = {}

        def submit(actor) -> None:
            if queue:
                task = _with_data(queue.popleft())
                pending[actor.evaluate.remote(task)] = actor

        for actor in actors:
            submit(actor)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=RAY_POLL)
            for ref in done:
                actor = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise EngineError(f"a Ray worker failed ({type(e).__name__}: {e}); a rerun resumes") from None
                on_outcome(outcome)
                submit(actor)
        for actor in actors:
            ray.kill(actor)
        return {"ray_nodes": nodes, "ray_cpus": cpus, "workers": workers, "threads_per_worker": threads}
    finally:
        ray.shutdown()


def _ray_shape(node_cpus: list[int], threads: int | None, workers: int | None) -> tuple[int, int]:
    """(threads per actor, actors) that the cluster can place; an impossible request is an error, not a hang
    (an actor that fits no node would wait for one for ever)."""
    largest = max(node_cpus, default=0)
    if largest < 1:
        raise EngineError("the Ray cluster has no CPUs")
    threads = threads or min(RAY_DEFAULT_THREADS, largest)
    if threads > largest:
        raise EngineError(f"--threads {threads}: the largest Ray node has {largest} CPUs")
    capacity = sum(c // threads for c in node_cpus)
    if workers is not None and workers > capacity:
        raise EngineError(
            f"--workers {workers} with --threads {threads}: the Ray cluster ({', '.join(map(str, node_cpus))} CPUs "
            f"per node) holds at most {capacity} such workers"
        )
    return threads, workers or capacity


def _with_data(task: Task) -> Task:
    """The task with its files' bytes, read here, for a worker that may not see this filesystem."""
    image = Path(task.image).read_bytes()
    mask = Path(task.mask).read_bytes() if task.mask else None
    return replace(task, image_data=image, mask_data=mask)
