"""Child processes (jobs.py: run_pipeline.py --jobs, the study's run_child) and the per-stage time table
(timing.py)."""
import csv
import subprocess
import sys
import time

import pytest

from hypermorph_spatially_adaptive import jobs, timing


def _py(code: str) -> list:
    return [sys.executable, "-c", code]


def test_jobs_run_in_parallel_up_to_the_limit_with_prefixed_output(tmp_path):
    # each job records its start and end time; with parallel=2 at most two intervals overlap
    code = ("import os, sys, time; t0 = time.time(); time.sleep(0.6); print('threads', "
            "os.environ['TF_NUM_INTRAOP_THREADS']); open(sys.argv[1], 'w').write(f'{t0} {time.time()}')")
    work = [jobs.Job(f"j{i}", [sys.executable, "-c", code, str(tmp_path / f"j{i}.txt")]) for i in range(4)]
    lines = []
    t0 = time.time()
    seconds = jobs.run_jobs(work, parallel=2, threads=3, write=lines.append)
    wall = time.time() - t0
    spans = [tuple(map(float, (tmp_path / f"j{i}.txt").read_text().split())) for i in range(4)]
    for t in [s for s, _ in spans] + [e - 1e-3 for _, e in spans]:
        assert sum(s <= t < e for s, e in spans) <= 2
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) == 2  # really side by side
    assert wall < 4 * 0.6 + 2.0  # not one after the other (4 x 0.6 s plus start-up)
    assert sorted(lines) == [f"[j{i}] threads 3" for i in range(4)]
    assert set(seconds) == {"j0", "j1", "j2", "j3"} and all(s >= 0.6 for s in seconds.values())


def test_a_failing_job_stops_the_others_and_names_itself(tmp_path):
    marker = tmp_path / "interrupted"
    slow = ("import sys, time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n"
            f"    open({str(marker)!r}, 'w').write('saved'); sys.exit(130)")
    work = [jobs.Job("slow", _py(slow), weight=2.0),
            jobs.Job("bad", _py("import sys, time; time.sleep(0.5); print('error: no such file x.nii.gz'); "
                                "sys.exit(1)"))]
    t0 = time.time()
    with pytest.raises(jobs.JobFailed) as info:
        jobs.run_jobs(work, parallel=2, write=lambda s: None)
    assert time.time() - t0 < 15  # the slow job did not run its 30 s
    assert info.value.name == "bad" and info.value.returncode == 1
    assert info.value.message == "no such file x.nii.gz"
    assert marker.read_text() == "saved"  # stopped with SIGINT, the way Ctrl-C stops a training


def test_job_counts_follow_the_cores():
    assert jobs.default_jobs(4, cores=2) == 2 and jobs.threads_per_job(2, cores=2) == 1
    assert jobs.default_jobs(4, cores=8) == 4 and jobs.threads_per_job(4, cores=8) == 2
    assert jobs.default_jobs(1, cores=8) == 1 and jobs.threads_per_job(1, cores=1) == 1
    with pytest.raises(ValueError, match=">= 1"):
        jobs.run_jobs([], parallel=0)


def test_run_child_writes_its_log_and_returns_the_exit_status(tmp_path):
    log_path = tmp_path / "child.log"
    with open(log_path, "w") as log:
        rc = jobs.run_child(_py("import sys; print('working'); print('error: bad seed', file=sys.stderr); "
                                "sys.exit(3)"), stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path))
    assert rc == 3
    assert log_path.read_text().splitlines() == ["working", "error: bad seed"]
    assert jobs.last_error_line(str(log_path)) == "error: bad seed"
    assert jobs.run_child(_py("pass"), stdout=subprocess.DEVNULL) == 0


_PARENT = r"""
import sys, time
sys.path.insert(0, {root!r})
from hypermorph_spatially_adaptive import folders, jobs
slow = ("import os, sys, time\nprint(os.getpid(), flush=True)\ntry:\n    time.sleep(60)\n"
        "except KeyboardInterrupt:\n    open({marker!r}, 'w').write('saved'); sys.exit(130)")
try:
    jobs.run_jobs([jobs.Job("slow", [sys.executable, "-c", slow])], parallel=1)
except folders.Terminated as exc:
    print("raised", type(exc).__name__, exc.signum, flush=True)
"""


def test_sigterm_to_run_jobs_stops_the_children_like_ctrl_c_and_raises_terminated(tmp_path):
    """One supervisor for both helpers: SIGTERM to the parent stops each job with SIGINT (so a
    training saves its state), then raises folders.Terminated (a KeyboardInterrupt)."""
    import os
    import signal

    marker = tmp_path / "interrupted"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", _PARENT.format(root=root, marker=str(marker))],
                              stdout=subprocess.PIPE, text=True)
    first = parent.stdout.readline()
    assert first.startswith("[slow] "), first
    parent.send_signal(signal.SIGTERM)
    out, _ = parent.communicate(timeout=60)
    assert marker.read_text() == "saved"
    assert out.strip().splitlines()[-1] == f"raised Terminated {int(signal.SIGTERM)}"


def test_stage_timer_rows_add_up(tmp_path):
    timer = timing.StageTimer()
    with timer.stage("a"):
        time.sleep(0.05)
    timer.record("b", 1.5)
    timer.record("  b detail", 1.0, counted=False)
    path = tmp_path / "stage_times.csv"
    timer.write_csv(str(path))
    rows = list(csv.DictReader(open(path)))
    assert [r["stage"] for r in rows] == ["a", "b", "b detail", "total"]
    assert 0.05 <= float(rows[0]["seconds"]) < 1.0 and float(rows[1]["seconds"]) == 1.5
    assert [r["counted_in_total"] for r in rows[:3]] == ["1", "1", "0"]
    table = timer.table()
    assert table.splitlines()[0].split() == ["stage", "min", "share"] and "total" in table.splitlines()[-1]


@pytest.mark.slow
def test_parallel_training_gives_the_same_weights(tmp_path):
    """--jobs 2 (child processes, one TensorFlow thread each) trains bit-identical models."""
    import run_pipeline
    from conftest import _quick_argv

    run_pipeline.main(_quick_argv(tmp_path / "one", "--panels", "0", "--gradient-steps", "0", "--refine", "0"))
    run_pipeline.main(_quick_argv(tmp_path / "two", "--panels", "0", "--gradient-steps", "0", "--refine", "0",
                                  "--jobs", "2"))
    for p in run_pipeline.PRESETS:
        assert (tmp_path / "one/runs" / p / "weights.h5").read_bytes() == \
            (tmp_path / "two/runs" / p / "weights.h5").read_bytes(), p
    assert (tmp_path / "one/results/table1.md").read_text() == (tmp_path / "two/results/table1.md").read_text()


def test_a_child_stops_on_sigint_even_if_its_parent_ignores_sigint(tmp_path):
    """A pipeline started with SIGINT ignored (nohup, a background job) still stops its children with
    SIGINT: child_preexec gives them SIGINT's default back, so Python raises KeyboardInterrupt there."""
    import signal

    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with open(tmp_path / "plain.log", "w") as log:  # what a child inherits without child_preexec
            subprocess.call([sys.executable, "-c", probe], stdout=log)
        with open(tmp_path / "supervised.log", "w") as log:
            assert jobs.run_child([sys.executable, "-c", probe], stdout=log) == 0
    finally:
        signal.signal(signal.SIGINT, old)
    assert (tmp_path / "plain.log").read_text().strip() == "False"
    assert (tmp_path / "supervised.log").read_text().strip() == "True"
