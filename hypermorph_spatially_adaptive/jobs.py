"""Child processes: the one implementation behind the pipeline's parallel ``--jobs``
(:func:`run_jobs`) and the study's one-child-with-a-log runs (:func:`run_child`).

Why parallel jobs: small 2D networks do not keep many cores busy, so models trained side by side,
each with its share of the cores, finish sooner than one after the other with all of them. On 2
cores the gain is small: measured alone on this project's 2-core machine (elastic global + SA,
400 steps), one training with 2 TensorFlow threads ran at 0.073 s/step, two side by side with one
thread each at 0.126 s/step each (1.15x the steps per second), and the wall time of the pair was
the same (96.8 vs 95.5 s, start-up included). With op determinism on (the trainer's default) the
weights do not depend on the thread count (bit-identical), so ``--jobs`` changes the wall time,
never the results.

One supervisor (:func:`supervise`) runs every child, whichever helper started it:

- each child runs under :func:`child_preexec`: SIGINT at its default (so the stop signal works even
  if this process was started with SIGINT ignored) and :func:`die_with_parent` (Linux): the kernel
  sends it SIGTERM if this process is killed outright (SIGKILL), so children never outlive the
  command that started them;
- a SIGINT, SIGTERM or SIGHUP to this process (main thread) stops every running child with the
  helper's stop signal, waits up to its grace time (then SIGKILL), and raises: SIGTERM and SIGHUP
  as :class:`.folders.Terminated`, SIGINT as ``KeyboardInterrupt`` (both take the clean-up path of
  Ctrl-C, CONVENTIONS.md "Run folders and outputs" rule 3);
- a child's output is either passed through line by line, prefixed with its name unless the line
  already starts with ``[`` (:class:`Job` without ``popen_kw``), or goes where ``popen_kw`` sends it
  (a log file);
- exit codes are recorded per job; with ``stop_on_failure`` the first failed job stops the others.

:func:`run_jobs`: ``[python, script, *argv]`` jobs, at most ``parallel`` at a time, each with
``TF_NUM_INTRAOP_THREADS`` set to its share of the cores; stopped with SIGINT (a training saves its
state the way Ctrl-C does, grace 120 s); a failed job raises :class:`JobFailed` with its last
``error:`` line. :func:`run_child`: one command, output where ``popen_kw`` says, stopped with SIGTERM
(grace 10 s); returns the exit status; :func:`last_error_line` reads the reason from its log.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from .folders import Terminated

__all__ = ["Job", "JobFailed", "child_preexec", "default_jobs", "die_with_parent", "last_error_line", "run_child", "run_jobs",
           "script_job", "supervise", "threads_per_job"]

#: signals that stop the children and then this process
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class JobFailed(RuntimeError):
    """A child job exited with a non-zero status; ``message`` is its last ``error:`` line."""

    def __init__(self, name: str, returncode: int, message: str):
        self.name, self.returncode, self.message = name, returncode, message
        super().__init__(f"{name}: {message}" if message else f"{name} failed with exit status {returncode}")


@dataclass
class Job:
    """One child process: ``name`` (for the output prefix and errors), ``command`` (argv of the
    child, e.g. ``[sys.executable, "train_hypermorph_elastic_sa.py", ...]``), a ``weight``
    (expected relative cost: heavier jobs start first) and ``popen_kw`` (``subprocess.Popen``
    keywords such as ``stdout=log, stderr=subprocess.STDOUT, cwd=...``; None: the output is piped
    and passed through with the name as prefix). :func:`supervise` fills in ``returncode``
    (None while not finished), ``seconds`` (wall time) and ``tail`` (the last 50 piped lines)."""

    name: str
    command: List[str]
    weight: float = 1.0
    popen_kw: Optional[Dict] = None
    seconds: float = field(default=0.0, init=False)
    returncode: Optional[int] = field(default=None, init=False)
    tail: List[str] = field(default_factory=list, init=False, repr=False)  # last 50 piped lines


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


def die_with_parent() -> None:
    """``preexec_fn`` of a child process: the kernel sends it SIGTERM when its parent dies, even by
    SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``; a no-op elsewhere). Runs between fork and exec."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_preexec() -> None:
    """``preexec_fn`` of every supervised child: SIGINT back to its default disposition, so the
    child's Python turns the supervisor's SIGINT into KeyboardInterrupt even when this process was
    started with SIGINT ignored (a background job of a non-interactive shell, ``nohup``, a test
    worker), which a child would otherwise inherit; then :func:`die_with_parent`."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        die_with_parent()


def _last_error(lines: Sequence[str]) -> Optional[str]:
    """The last of ``lines`` that starts with ``error:`` (None if there is none)."""
    return next((line for line in reversed(lines) if line.startswith("error:")), None)


def last_error_line(log_path: str, limit: int = 300) -> str:
    """The last ``error:`` line of a log file (or its last non-empty line; '' if unreadable), at
    most ``limit`` characters: the reason a child command gave for failing."""
    try:
        with open(log_path, errors="replace") as fh:
            lines = [ln.strip() for ln in fh if ln.strip()]
    except OSError:
        return ""
    return (_last_error(lines) or (lines or [""])[-1])[:limit]


def _failure_message(tail: Sequence[str]) -> str:
    """What a piped job said about its failure: its last ``error:`` line without the prefix, else
    its last 10 lines."""
    line = _last_error(tail)
    return line[len("error:"):].strip() if line is not None else "\n".join(tail[-10:])


def _pump(job: Job, stream, lock: threading.Lock, tail: List[str], write: Callable[[str], None]) -> None:
    for raw in iter(stream.readline, ""):
        line = raw.rstrip("\n")
        tail.append(line)
        del tail[:-50]
        with lock:
            write(line if line.startswith("[") else f"[{job.name}] {line}")
    stream.close()


@contextlib.contextmanager
def _signals_noted() -> Iterator[Dict]:
    """While inside, :data:`STOP_SIGNALS` only note themselves in the yielded dict (``signal``),
    so the supervisor stops its children before anything raises (main thread only; the previous
    handlers are put back on exit)."""
    caught: Dict = {"signal": None}

    def note(signum, _frame):
        caught["signal"] = signum

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, note) for s in STOP_SIGNALS} if in_main else {}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


class _Running:
    """A started :class:`Job`: its process and the reader of its piped output."""

    def __init__(self, job: Job, env: Optional[Dict[str, str]], lock: threading.Lock, write: Callable[[str], None]):
        self.job, self.reader, self.t0 = job, None, time.time()
        kw = dict(job.popen_kw) if job.popen_kw is not None else \
            dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        if env is not None:
            kw.setdefault("env", env)
        if os.name == "posix":
            kw.setdefault("preexec_fn", child_preexec)
        self.proc = subprocess.Popen(list(job.command), **kw)
        if job.popen_kw is None:
            self.reader = threading.Thread(target=_pump, args=(job, self.proc.stdout, lock, job.tail, write),
                                           daemon=True)
            self.reader.start()

    def done(self) -> bool:
        return self.proc.poll() is not None

    def finish(self) -> None:
        """After the process ended: join the reader, record exit status and wall time."""
        if self.reader is not None:
            self.reader.join()
        self.job.returncode = self.proc.returncode
        self.job.seconds = time.time() - self.t0


def _stop(running: Sequence[_Running], stop_signal: int, grace: float) -> None:
    """Send ``stop_signal`` to every child still running, wait up to ``grace`` seconds for each,
    then SIGKILL."""
    for r in running:
        if not r.done():
            r.proc.send_signal(stop_signal)
    for r in running:
        try:
            r.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()
        r.finish()


def supervise(jobs: Sequence[Job], parallel: int = 1, env: Optional[Dict[str, str]] = None, *,
              stop_signal: int = signal.SIGTERM, grace: float = 10.0, stop_on_failure: bool = True,
              write: Callable[[str], None] = lambda s: print(s, flush=True)) -> Optional[Job]:
    """Run ``jobs`` as child processes, at most ``parallel`` at a time (heaviest first; module
    docstring for signals and output). ``env``: the children's environment (None: this
    process's, or a job's ``popen_kw["env"]``); ``stop_signal`` and ``grace`` (seconds): how
    running children are stopped; ``write``: where prefixed output lines go.

    Returns the first job that exited with a non-zero status (None if all succeeded); with
    ``stop_on_failure`` the others are stopped then and the rest of the queue is not started.
    Each job's ``returncode`` and ``seconds`` are filled in (``returncode`` None for a job never
    started). Raises :class:`.folders.Terminated` (SIGTERM, SIGHUP) or ``KeyboardInterrupt``
    (SIGINT) after stopping the children."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    queue = sorted(jobs, key=lambda j: -j.weight)
    running: List[_Running] = []
    lock = threading.Lock()
    failure: Optional[Job] = None
    with _signals_noted() as caught:
        try:
            while (queue or running) and not (failure and stop_on_failure) and caught["signal"] is None:
                while queue and len(running) < parallel and caught["signal"] is None:
                    running.append(_Running(queue.pop(0), env, lock, write))
                if running:
                    _wait_briefly(running[0].proc, 0.2)  # returns early when it ends
                for r in [r for r in running if r.done()]:
                    r.finish()
                    running.remove(r)
                    if r.job.returncode != 0 and failure is None:
                        failure = r.job
        finally:
            _stop(running, stop_signal, grace)
    signum = caught["signal"]
    if signum is not None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt(f"signal {signum}: stopped {len(running)} running job(s)")
        raise Terminated(signum)
    return failure


def _wait_briefly(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


def run_jobs(jobs: Sequence[Job], parallel: int, threads: int = 1,
             write: Callable[[str], None] = lambda s: print(s, flush=True)) -> Dict[str, float]:
    """Run ``jobs`` with at most ``parallel`` at a time (heaviest first); returns the wall
    seconds of each job by name. Every child gets ``TF_NUM_INTRAOP_THREADS=threads`` (and one
    inter-op thread); output lines pass through ``write`` prefixed with the job's name. Raises
    :class:`JobFailed` for the first job that fails, after stopping the others with SIGINT (grace
    120 s); re-raises a SIGINT/SIGTERM/SIGHUP as in :func:`supervise`."""
    if parallel < 1 or threads < 1:
        raise ValueError(f"parallel and threads must be >= 1, got {parallel} and {threads}")
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS="1",
               PYTHONUNBUFFERED="1")
    failed = supervise(jobs, parallel, env, stop_signal=signal.SIGINT, grace=120.0, write=write)
    if failed is not None:
        raise JobFailed(failed.name, failed.returncode, _failure_message(failed.tail))
    return {j.name: j.seconds for j in jobs}


def run_child(cmd: Sequence[str], grace: float = 10.0, **popen_kw) -> int:
    """``subprocess.call(cmd, **popen_kw)`` whose child never outlives this process: SIGTERM and
    SIGHUP (as :class:`.folders.Terminated`) and Ctrl-C stop it (SIGTERM, then SIGKILL after
    ``grace`` seconds) before the exception propagates, and on Linux the kernel sends it SIGTERM
    if this process dies without cleaning up (SIGKILL). Output goes where ``popen_kw`` sends it
    (default: this process's stdout). Returns the exit status."""
    job = Job(os.path.basename(str(cmd[0])), list(cmd), popen_kw=popen_kw)
    supervise([job], 1, stop_signal=signal.SIGTERM, grace=grace)
    return job.returncode


def script_job(name: str, script: str, argv: Sequence[str], weight: float = 1.0) -> Job:
    """A job that runs the project script ``script`` (a file name at the repository root, e.g.
    ``train_hypermorph_elastic_sa.py``) with ``argv`` under this interpreter."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return Job(name, [sys.executable, os.path.join(root, script), *argv], weight)
