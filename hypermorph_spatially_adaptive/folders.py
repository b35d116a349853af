"""Output folders that are never lost, mixed or written by two processes at once.

- :class:`FolderLock`: one writer per folder. The lock is a hidden sibling file
  ``<parent>/.<name>.lock`` (a sibling, so it survives the folder being renamed or replaced),
  created with ``O_CREAT | O_EXCL`` and holding ``{"pid", "host", "started"}``. A lock whose
  process is gone (same host, pid not alive) is stale: it is taken over with a message.
- :func:`staged_folder`: a stage (identification, inference) writes into a temporary sibling
  ``<parent>/.<name>.tmp-XXXX`` that replaces ``<name>`` only when the stage succeeded; a killed
  or failed stage leaves the old complete folder (plus a hidden temp folder, removed by the next
  run) and never a mixture of old and new files. Before anything is computed,
  :func:`check_stage_folder` refuses an output it may not replace (CONVENTIONS.md, "Run folders
  and outputs"): only an absent or empty folder, or one holding exactly what the same stage wrote
  (its completion marker :data:`STAGE_MARKER` lists the entries), is replaced; never a file, a
  symbolic link, an input of the command or a folder that contains one.
- :func:`move_aside` / :func:`restore` / :func:`discard`: ``--overwrite`` renames the old run to
  ``<parent>/.<name>.old-<stamp>-<pid>`` instead of deleting it; it is deleted only once the new
  run has written its first checkpoint, and renamed back if the new attempt fails before that.
  A ``.old-*`` left by a process that died (SIGKILL, power loss) is found by the next
  :class:`FolderLock` on the folder: put back when the folder holds no newer work (the caller's
  ``replaceable`` test), else named in a message with the command that puts it back.
- Signals: while a :class:`FolderLock` is held, SIGTERM and SIGHUP raise :class:`Terminated` (a
  ``KeyboardInterrupt``), so they take the same clean-up path as Ctrl-C.
- :func:`check_output_files`: output files of a command checked before any computation
  (distinct from every input and from each other, writable folder, allowed extension).
- :func:`safe_file_names`: file names made from pair ids (no separators, no ``..``, no leading
  dot, collisions made unique).

Standard library only.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence


def _sibling(folder: str, tag: str) -> str:
    folder = os.path.abspath(folder.rstrip(os.sep) or os.sep)
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.{tag}")


def lock_path(folder: str) -> str:
    """The lock file of ``folder``: ``<parent>/.<name>.lock``."""
    return _sibling(folder, "lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLockedError(OSError):
    """Another live process writes the folder."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while a folder was being written (handled like Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


_TERM_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))
_signal_depth = [0, {}]  # nesting count, previous handlers


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _catch_signals() -> None:
    """SIGTERM/SIGHUP raise :class:`Terminated` until the matching :func:`_release_signals`
    (main thread only; nested calls are counted)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _signal_depth[0] == 0:
        for sig in _TERM_SIGNALS:
            _signal_depth[1][sig] = signal.signal(sig, _raise_terminated)
    _signal_depth[0] += 1


def _release_signals() -> None:
    if threading.current_thread() is not threading.main_thread() or _signal_depth[0] == 0:
        return
    _signal_depth[0] -= 1
    if _signal_depth[0] == 0:
        for sig, old in _signal_depth[1].items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        _signal_depth[1].clear()


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Defer SIGINT/SIGTERM/SIGHUP for the few renames that must not be cut in half."""
    sigs = {signal.SIGINT, *_TERM_SIGNALS}
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs) if main else None
    try:
        yield
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class FolderLock:
    """Exclusive writer lock of one folder (a context manager; see the module docstring).

    ``FolderLock(folder, what="run folder").acquire()`` raises :class:`FolderLockedError` naming
    the lock file and its holder (pid, host, start time) if a live process holds it; a stale
    lock (dead pid on this host) is taken over and ``log`` says so. ``release()`` removes the
    file if it is still ours. While held, SIGTERM/SIGHUP raise :class:`Terminated`. Once taken,
    ``.old-*`` siblings left by a dead ``--overwrite`` are recovered (:func:`recover_asides`, with
    ``replaceable(folder) -> bool`` saying whether the folder's current content may be dropped
    for the old run; default: only an absent or empty folder).
    """

    def __init__(self, folder: str, what: str = "folder", log=print,
                 replaceable: Optional[Callable[[str], bool]] = None):
        self.folder, self.what, self.log = folder, what, log
        self.path = lock_path(folder)
        self.held = False
        self._token = ""
        self.replaceable = replaceable

    def _create(self) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "folder": os.path.abspath(self.folder)}
        self._token = json.dumps(info, sort_keys=True)
        with os.fdopen(fd, "w") as fh:
            fh.write(self._token + "\n")
        return True

    def _holder(self) -> Optional[Dict]:
        try:
            with open(self.path) as fh:
                info = json.load(fh)
            return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> "FolderLock":
        for _ in range(3):
            if self._create():
                self.held = True
                _catch_signals()
                try:
                    recover_asides(self.folder, self.replaceable, self.log)
                except BaseException:
                    self.release()
                    raise
                return self
            info = self._holder()
            if info is None:
                raise FolderLockedError(
                    f"{self.folder}: {self.what} is locked by {self.path}, which is unreadable; if no process "
                    f"writes {self.folder}, delete {self.path} and retry")
            here = info.get("host") == socket.gethostname()
            pid = int(info.get("pid", -1))
            if here and not _pid_alive(pid):
                self.log(f"[lock] {self.path}: stale lock of process {pid} (started {info.get('started')}, no longer "
                         f"running) taken over")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            raise FolderLockedError(
                f"{self.folder}: {self.what} is being written by process {pid} on host {info.get('host')} "
                f"(started {info.get('started')}; lock {self.path}); wait for it to finish or choose another "
                f"--out (if that process is not writing here, e.g. its pid was reused, delete {self.path})")
        raise FolderLockedError(f"{self.folder}: could not take the lock {self.path}; retry")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _release_signals()
        try:
            with open(self.path) as fh:
                mine = fh.read().strip() == self._token
        except OSError:
            return
        if mine:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- staged stage outputs ------------------------------------------------------------------
#: completion marker of a stage output folder: ``{"stage", "entries", "completed"}``, written last
#: into the staging folder, so a folder carrying it is complete and was written by that stage
STAGE_MARKER = "stage_complete.json"


class RefusedOutputError(ValueError):
    """An output path that the command may not write or replace (nothing was computed)."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies under it (real paths)."""
    path, folder = _real(path), _real(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def read_marker(folder: str) -> Optional[Dict]:
    """The completion marker of ``folder`` as a dict, or ``None`` (missing or unreadable)."""
    try:
        with open(os.path.join(folder, STAGE_MARKER), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _listing(entries: Sequence[str]) -> str:
    entries = sorted(entries)
    return ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")


def check_stage_folder(folder: str, stage: str, inputs: Iterable[Optional[str]] = (),
                       legacy_meta: Optional[str] = None) -> None:
    """Refuse (``RefusedOutputError``) an output folder the stage ``stage`` may not replace.

    Replaced may be: an absent path, an empty folder, or a folder whose :data:`STAGE_MARKER`
    names ``stage`` and lists every entry it holds (a folder written before the marker existed
    is accepted when it holds ``legacy_meta``, the stage's own record, as a JSON object). Refused:
    a regular file or symbolic link, anything else in the folder (named), an input of the same
    command (``inputs``, compared by real path) or a folder that contains one.
    """
    folder_abs = os.path.abspath(folder)
    for inp in inputs:
        if inp and os.path.exists(inp) and _inside(inp, folder_abs):
            same = _real(inp) == _real(folder_abs)
            raise RefusedOutputError(
                f"--out {folder} {'is' if same else 'contains'} an input of this command ({inp}); replacing it "
                f"would delete that input: choose another --out")
    if os.path.islink(folder_abs):
        raise RefusedOutputError(f"--out {folder} is a symbolic link (to {os.readlink(folder_abs)}); the {stage} "
                                 "replaces its output folder whole: give a real folder path")
    if os.path.lexists(folder_abs) and not os.path.isdir(folder_abs):
        raise RefusedOutputError(f"--out {folder} is a file, not a folder; the {stage} writes a folder: "
                                 "choose another --out")
    if not os.path.isdir(folder_abs):
        return
    entries = os.listdir(folder_abs)
    if not entries:
        return
    marker = read_marker(folder_abs)
    if marker is not None:
        if marker.get("stage") != stage:
            raise RefusedOutputError(
                f"--out {folder} holds the output of another stage ({marker.get('stage')!r}, "
                f"{os.path.join(folder, STAGE_MARKER)}), not of the {stage}; refusing to replace it: "
                "choose another --out")
        known = set(marker.get("entries") or []) | {STAGE_MARKER}
        extra = [e for e in entries if e not in known]
        if extra:
            raise RefusedOutputError(
                f"--out {folder} holds {_listing(extra)} besides the {stage} written there "
                f"({os.path.join(folder, STAGE_MARKER)}); refusing to replace it (that would delete them): move "
                "them out or choose another --out")
        return
    if legacy_meta and os.path.isfile(os.path.join(folder_abs, legacy_meta)):
        try:
            with open(os.path.join(folder_abs, legacy_meta), encoding="utf-8") as fh:
                if isinstance(json.load(fh), dict):
                    return
        except (OSError, ValueError):
            pass
    raise RefusedOutputError(
        f"--out {folder} is not empty ({_listing(entries)}) and holds no complete {stage} (no "
        f"{STAGE_MARKER}); refusing to replace it (that would delete them): choose another --out or an empty folder")


def remove_stale_temps(folder: str) -> None:
    """Delete ``.<name>.tmp-*`` and ``.<name>.trash-*`` siblings left by killed runs (call while
    holding the lock)."""
    folder = os.path.abspath(folder)
    parent, name = os.path.dirname(folder), os.path.basename(folder)
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            if entry.startswith((f".{name}.tmp-", f".{name}.trash-")):
                path = os.path.join(parent, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(path)


def replace_folder(tmp: str, folder: str) -> None:
    """Put the complete folder ``tmp`` at ``folder``; the old ``folder`` (if any) is deleted.

    Between the two renames ``folder`` is briefly absent, never a mixture of old and new files.
    """
    old = None
    with _signals_blocked():
        if os.path.lexists(folder):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(folder))}.tmp-",
                                   dir=os.path.dirname(os.path.abspath(folder)))
            os.rmdir(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_marker(folder: str, stage: str) -> None:
    """Write :data:`STAGE_MARKER` into ``folder`` listing its current entries (call last)."""
    entries = sorted(e for e in os.listdir(folder) if e != STAGE_MARKER)
    info = {"stage": stage, "entries": entries, "pid": os.getpid(),
            "completed": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    with open(os.path.join(folder, STAGE_MARKER), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=1)
        fh.write("\n")


@contextlib.contextmanager
def staged_folder(folder: str, what: str = "output folder", log=print, inputs: Iterable[Optional[str]] = (),
                  legacy_meta: Optional[str] = None) -> Iterator[str]:
    """Lock ``folder``, check that it may be replaced (:func:`check_stage_folder` with the stage
    ``what`` and the command's ``inputs``), yield a fresh temporary sibling to write into, and on
    success write the completion marker and replace ``folder`` by it (files of an earlier run
    never survive); on any error (or a kill) the old ``folder`` stays as it was and the temporary
    folder is removed (or, after a kill, removed by the next run). File permissions follow the
    umask (the folder itself: 0o777 & ~umask)."""
    inputs = list(inputs)
    check_stage_folder(folder, what, inputs, legacy_meta)  # before the lock: nothing created for a refusal
    folder = os.path.abspath(folder)
    with FolderLock(folder, what, log):
        remove_stale_temps(folder)
        check_stage_folder(folder, what, inputs, legacy_meta)  # again, under the lock
        parent = os.path.dirname(folder)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        try:
            yield tmp
            write_marker(tmp, what)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_folder(tmp, folder)


# ---- output files of one command -----------------------------------------------------------------
def check_output_files(outputs: Dict[str, Optional[str]], inputs: Dict[str, Optional[str]],
                       extensions: Optional[Dict[str, Sequence[str]]] = None) -> None:
    """Refuse (``RefusedOutputError``) output files before any computation.

    ``outputs``/``inputs``: ``{option name: path or None}``. Every output must differ from every
    input and from every other output (real paths, so ``./a`` and ``a`` or a symbolic link to an
    input count as the same file), must not be a folder, must end with one of
    ``extensions[option]`` (if given), and its folder must exist or be creatable and be writable.
    """
    seen: Dict[str, str] = {}
    ins = {opt: _real(p) for opt, p in inputs.items() if p}
    for opt, path in outputs.items():
        if not path:
            continue
        real = _real(path)
        for iopt, ireal in ins.items():
            if real == ireal or (os.path.exists(path) and os.path.exists(inputs[iopt])
                                 and os.path.samefile(path, inputs[iopt])):
                raise RefusedOutputError(f"{opt} {path} is the input {iopt} {inputs[iopt]}; writing it would "
                                         f"overwrite the input: choose another output path")
        if real in seen:
            raise RefusedOutputError(f"{opt} and {seen[real]} are the same file {path}; each output needs its "
                                     "own path")
        seen[real] = opt
        if os.path.isdir(path):
            raise RefusedOutputError(f"{opt} {path} is a folder; give a file path")
        allowed = (extensions or {}).get(opt)
        if allowed and not any(path.lower().endswith(e) for e in allowed):
            raise RefusedOutputError(f"{opt} {path}: expected a file ending in {' or '.join(allowed)}")
        parent = os.path.dirname(os.path.abspath(path))
        probe = parent
        while not os.path.isdir(probe):
            if os.path.lexists(probe):
                raise RefusedOutputError(f"{opt} {path}: {probe} is a file, not a folder")
            probe = os.path.dirname(probe)
        if not os.access(probe, os.W_OK | os.X_OK):
            raise RefusedOutputError(f"{opt} {path}: the folder {probe} is not writable")
        if os.path.exists(path) and not os.access(path, os.W_OK) and not os.access(parent, os.W_OK):
            raise RefusedOutputError(f"{opt} {path}: the file is read-only and its folder not writable")


# ---- --overwrite: move the old run aside -------------------------------------------------------
_ASIDE = re.compile(r"old-(\d{8}-\d{6})-(\d+)$")


def move_aside(folder: str, record: Optional[Dict] = None) -> str:
    """Rename ``folder`` to a hidden sibling ``.<name>.old-<stamp>-<pid>`` and return its path.

    With ``record`` (a dict), ``record["aside"]`` is set before signals are let through again, so a
    signal arriving right after the rename still finds what to restore."""
    folder = os.path.abspath(folder)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = _sibling(folder, f"old-{stamp}-{os.getpid()}")
    with _signals_blocked():
        os.replace(folder, aside)
        if record is not None:
            record["aside"] = aside
    return aside


def restore(aside: str, folder: str) -> None:
    """Undo :func:`move_aside`: whatever a failed attempt left in ``folder`` is deleted first."""
    folder = os.path.abspath(folder)
    with _signals_blocked():
        if os.path.lexists(folder):
            if os.path.isdir(folder) and not os.path.islink(folder):
                trash = _sibling(folder, f"trash-{os.getpid()}-{id(folder)}")
                os.replace(folder, trash)
                os.replace(aside, folder)
                shutil.rmtree(trash, ignore_errors=True)
                return
            os.remove(folder)
        os.replace(aside, folder)


def discard(aside: str) -> None:
    """Delete a moved-aside run for good: renamed to ``.<name>.trash-*`` first (one atomic step),
    so a kill during the deletion never leaves a half-deleted ``.old-*`` that looks restorable."""
    base = os.path.basename(aside)
    trash = os.path.join(os.path.dirname(aside), base.split(".old-")[0] + f".trash-{base.rsplit('.old-', 1)[-1]}")
    with _signals_blocked():
        os.replace(aside, trash)
    shutil.rmtree(trash, ignore_errors=True)


def find_asides(folder: str) -> List[str]:
    """The ``.<name>.old-<stamp>-<pid>`` siblings of ``folder``, newest first."""
    folder = os.path.abspath(folder)
    parent, prefix = os.path.dirname(folder), f".{os.path.basename(folder)}."
    if not os.path.isdir(parent):
        return []
    found = [e for e in os.listdir(parent) if e.startswith(prefix) and _ASIDE.search(e[len(prefix):])]
    return [os.path.join(parent, e) for e in sorted(found, reverse=True)]


def recover_asides(folder: str, replaceable: Optional[Callable[[str], bool]] = None, log=print) -> None:
    """Put back a run that a dead process moved aside (call while holding the folder's lock: the
    process that made a ``.old-*`` held it, so that process is gone).

    The newest ``.old-*`` is restored when ``folder`` is absent, empty or ``replaceable(folder)``
    (e.g. a stub without a checkpoint); otherwise ``log`` names it and the commands that put it
    back. Older ``.old-*`` siblings are only named.
    """
    folder = os.path.abspath(folder)
    parent, name = os.path.dirname(folder), os.path.basename(folder)
    if os.path.isdir(parent):  # half-deleted runs of a killed discard/restore: never restorable, finish the job
        for entry in os.listdir(parent):
            if entry.startswith(f".{name}.trash-"):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    asides = find_asides(folder)
    if not asides:
        return
    newest, rest = asides[0], asides[1:]
    absent = not os.path.lexists(folder)
    empty = os.path.isdir(folder) and not os.path.islink(folder) and not os.listdir(folder)
    if absent or empty or (replaceable is not None and os.path.isdir(folder) and replaceable(folder)):
        restore(newest, folder)
        log(f"[recover] {folder}: a process killed during --overwrite (pid {_ASIDE.search(newest).group(2)}) had "
            f"moved the old run aside to {newest}" + ("" if absent or empty else
                                                     " and left an attempt without a checkpoint in its place")
            + "; the old run is back in place")
    else:
        rest = asides
    for other in rest:
        log(f"[recover] {other}: a run moved aside by a killed --overwrite; {folder} holds newer work, so it is "
            f"kept as is. To get the old run back: rm -r '{folder}' && mv '{other}' '{folder}' (or delete "
            f"'{other}' if it is not needed)")


# ---- file names from pair ids -------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_file_name(text: str) -> str:
    """``text`` made into one file-name component: runs of characters outside ``[A-Za-z0-9._+-]``
    (path separators included) become ``_``, ``..`` becomes ``_``, leading dots are dropped,
    at most 100 characters; never empty."""
    name = _UNSAFE.sub("_", str(text)).replace("..", "_").lstrip(".")
    return name[:100] or "_"


def safe_file_names(ids: Sequence[str]) -> Dict[str, str]:
    """``{id: file-name component}`` for every id; ids that collide after :func:`safe_file_name`
    (e.g. ``a/b`` and ``a_b``) get ``-<8 hex digits of sha1(id)>`` appended, so names stay unique."""
    base = {i: safe_file_name(i) for i in ids}
    counts: Dict[str, int] = {}
    for name in base.values():
        key = name.lower()  # case-insensitive file systems
        counts[key] = counts.get(key, 0) + 1
    out = {}
    for i, name in base.items():
        if counts[name.lower()] > 1:
            name = f"{name}-{hashlib.sha1(str(i).encode()).hexdigest()[:8]}"
        out[i] = name
    return out
