"""Run independent stage commands as parallel child processes (the pipeline's ``--jobs``).

Why: small 2D networks do not keep many cores busy, so models trained side by side, each with
its share of the cores, finish sooner than one after the other with all of them. On 2 cores the
gain is small: measured alone on this project's 2-core machine (elastic global + SA, 400 steps),
one training with 2 TensorFlow threads ran at 0.073 s/step, two side by side with one thread each
at 0.126 s/step each (1.15x the steps per second), and the wall time of the pair was the same
(96.8 vs 95.5 s, start-up included). With op determinism on (the trainer's default) the weights
do not depend on the thread count (bit-identical), so ``--jobs`` changes the wall time, never the
results.

Each job is ``[python, script, *argv]`` in a child process with ``TF_NUM_INTRAOP_THREADS`` set to
its share of the cores. Output lines are passed through as they come, prefixed with the job's name
unless the line already starts with ``[``. A failed job stops the others (SIGINT, so each saves its
state the way Ctrl-C does) and raises :class:`JobFailed` with the job's last ``error:`` line. A
SIGINT, SIGTERM or SIGHUP to this process is forwarded the same way, and on Linux the kernel stops
the children if this process is killed outright (:func:`.folders.die_with_parent`): children never
outlive the command that started them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from .folders import die_with_parent

__all__ = ["Job", "JobFailed", "default_jobs", "run_jobs", "threads_per_job"]


class JobFailed(RuntimeError):
    """A child job exited with a non-zero status; ``message`` is its last ``error:`` line."""

    def __init__(self, name: str, returncode: int, message: str):
        self.name, self.returncode, self.message = name, returncode, message
        super().__init__(f"{name}: {message}" if message else f"{name} failed with exit status {returncode}")


@dataclass
class Job:
    """One child process: ``name`` (for the output prefix and errors), ``command`` (argv of the
    child, e.g. ``[sys.executable, "train_hypermorph_elastic_sa.py", ...]``) and a ``weight``
    (expected relative cost: heavier jobs start first)."""

    name: str
    command: List[str]
    weight: float = 1.0
    seconds: float = field(default=0.0, init=False)


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_jobs(n_jobs: int, cores: Optional[int] = None) -> int:
    """Parallel jobs for ``n_jobs`` independent jobs: one per core, at most ``n_jobs``."""
    cores = usable_cores() if cores is None else cores
    return max(1, min(n_jobs, cores))


def threads_per_job(jobs: int, cores: Optional[int] = None) -> int:
    """TensorFlow intra-op threads for each of ``jobs`` parallel jobs: the cores shared evenly."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, jobs))


def _pump(job: Job, stream, lock: threading.Lock, tail: List[str], write: Callable[[str], None]) -> None:
    for raw in iter(stream.readline, ""):
        line = raw.rstrip("\n")
        tail.append(line)
        del tail[:-50]
        with lock:
            write(line if line.startswith("[") else f"[{job.name}] {line}")
    stream.close()


def _last_error(tail: Sequence[str]) -> str:
    for line in reversed(tail):
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    return "\n".join(tail[-10:])


def run_jobs(jobs: Sequence[Job], parallel: int, threads: int = 1,
             write: Callable[[str], None] = lambda s: print(s, flush=True)) -> Dict[str, float]:
    """Run ``jobs`` with at most ``parallel`` at a time (heaviest first); returns the wall
    seconds of each job by name. Every child gets ``TF_NUM_INTRAOP_THREADS=threads`` (and one
    inter-op thread). Raises :class:`JobFailed` for the first job that fails, after stopping
    the others; re-raises ``KeyboardInterrupt`` after a forwarded SIGINT/SIGTERM/SIGHUP."""
    if parallel < 1 or threads < 1:
        raise ValueError(f"parallel and threads must be >= 1, got {parallel} and {threads}")
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS="1",
               PYTHONUNBUFFERED="1")
    queue = sorted(jobs, key=lambda j: -j.weight)
    running: Dict[str, tuple] = {}  # name -> (job, process, reader thread, tail, start time)
    lock = threading.Lock()
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    handled = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in handled} if in_main else {}
    failure: Optional[JobFailed] = None
    try:
        while (queue or running) and failure is None and stop["signal"] is None:
            while queue and len(running) < parallel:
                job = queue.pop(0)
                proc = subprocess.Popen(job.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1,
                                        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
                tail: List[str] = []
                reader = threading.Thread(target=_pump, args=(job, proc.stdout, lock, tail, write), daemon=True)
                reader.start()
                running[job.name] = (job, proc, reader, tail, time.time())
            time.sleep(0.2)
            for name, (job, proc, reader, tail, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                reader.join()
                job.seconds = time.time() - t0
                del running[name]
                if proc.returncode != 0:
                    failure = JobFailed(name, proc.returncode, _last_error(tail))
    finally:
        for job, proc, reader, _tail, t0 in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the trainer saves and unlocks on Ctrl-C
        for job, proc, reader, _tail, t0 in running.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            reader.join()
            job.seconds = time.time() - t0
        for s, h in previous.items():
            signal.signal(s, h)
    if stop["signal"] is not None:
        raise KeyboardInterrupt(f"signal {stop['signal']}: stopped {len(running)} running job(s)")
    if failure is not None:
        raise failure
    return {j.name: j.seconds for j in jobs}


def script_job(name: str, script: str, argv: Sequence[str], weight: float = 1.0) -> Job:
    """A job that runs the project script ``script`` (a file name at the repository root, e.g.
    ``train_hypermorph_elastic_sa.py``) with ``argv`` under this interpreter."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return Job(name, [sys.executable, os.path.join(root, script), *argv], weight)
