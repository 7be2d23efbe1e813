"""moeut.sweep local launches resume a sweep: finished jobs are skipped (their run dirs untouched),
interrupted ones continue from their checkpoint to the same numbers as an uninterrupted run."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeut import sweep as sw

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, records, tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_job_finished_by_hand(tmp_path):
    d = tmp_path / "run"
    assert not sw.job_finished(d, 10)  # no metrics.jsonl
    _write(d / "metrics.jsonl", [{"step": 5, "train/loss": 3.0}, {"step": 10, "train/loss": 2.0}])
    assert not sw.job_finished(d, 10)  # the final validation never came (killed during it)
    assert sw.job_finished(d, 10, final_eval=False)  # no final validation asked for
    assert not sw.job_finished(d, None)  # unknown schedule length: run it (train.py decides)
    _write(d / "metrics.jsonl", [{"step": 5, "train/loss": 3.0}, {"step": 10, "train/loss": 2.0},
                                 {"step": 10, "validation/val/perplexity": 7.0}], tail='{"step": 11, "tr')
    assert sw.job_finished(d, 10)  # a cut last line (a later crash) does not hide the finished run
    assert not sw.job_finished(d, 20)  # a longer schedule than the one that finished
    (d / "metrics.jsonl").write_text('{"step": 10, "validation/val/perplexity": 7.0}\nnot json\n{"step": 1}\n')
    assert not sw.job_finished(d, 10)  # unreadable history: not taken as finished


SWEEP = """name: resume_me
expected_jobs: 2
common:
  - experiment=cpu_tiny
  - train.steps=6
  - train.log_interval=1
  - train.threads=1
grids:
  - overrides:
      - optim.lr=3e-3,1e-3
"""


def _launch(tmp_path: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MOEUT_CACHE=str(tmp_path / "cache"), WANDB_MODE="disabled", PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1")
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    r = subprocess.run([sys.executable, "-m", "moeut.sweep", "action=launch", f"sweep={tmp_path / 'resume_me.yaml'}",
                        "local=true", f"root={root}", *extra], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _losses(run_dir: Path):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}


@pytest.mark.slow
def test_relaunch_skips_finished_and_resumes_interrupted_jobs(tmp_path):
    (tmp_path / "resume_me.yaml").write_text(SWEEP)
    root, ref = tmp_path / "sweeps", tmp_path / "reference"
    _launch(tmp_path, ref)  # uninterrupted
    names = ["optim.lr=0.001", "optim.lr=0.003"]
    assert sorted(p.name for p in (ref / "resume_me").iterdir() if p.is_dir()) == names

    _launch(tmp_path, root, 'set=["train.stop_at=3"]')  # both jobs interrupted at step 3 (checkpoint saved)
    for n in names:
        assert max(_losses(root / "resume_me" / n)) == 3
    r = _launch(tmp_path, root)  # the same launch again: both resume from step 3
    assert "skipped" not in r.stdout
    for n in names:
        run = root / "resume_me" / n
        assert "resumed from" in (run / "train.log").read_text()
        assert _losses(run) == _losses(ref / "resume_me" / n)  # exactly the uninterrupted run's numbers
    before = {n: (root / "resume_me" / n / "metrics.jsonl").read_bytes() for n in names}
    r = _launch(tmp_path, root)  # everything finished: nothing runs, nothing is rewritten
    assert r.stdout.count("skipped: finished") == 2 and "$ " not in r.stdout
    for n in names:
        assert (root / "resume_me" / n / "metrics.jsonl").read_bytes() == before[n]


def test_a_second_local_launch_of_the_same_sweep_is_refused(tmp_path):
    (tmp_path / "resume_me.yaml").write_text(SWEEP)
    sweep = sw.load_sweep(tmp_path / "resume_me.yaml")
    sweep_dir = tmp_path / "sweeps" / "resume_me"
    sweep_dir.mkdir(parents=True)
    with sw.local_launch_lock(sweep_dir):  # a launch in progress
        with pytest.raises(ValueError, match=r"another local launch of this sweep, or a job it started, is running \(launch pid %d" % os.getpid()):
            sw.launch(sweep, root=str(tmp_path / "sweeps"), local=True)
    assert [p.name for p in sweep_dir.iterdir()] == [".local_launch.lock"]  # nothing written, no job started
    with sw.local_launch_lock(sweep_dir):  # released: the next launch takes it
        pass


# A fake job: marks itself started, then waits (up to FAKE_WAIT s, default 30) until every name in
# `wait_for` has started, then writes its run dir's metrics.jsonl (finished) unless told to stop early;
# on SIGTERM it writes <name>.term and exits 0 (a stop: no metrics, as a saved-and-stopped run).
_FAKE = """import os, sys, time, pathlib, signal, json
d, me, code, run_dir, early, wait_for = (pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]),
                                         pathlib.Path(sys.argv[4]), sys.argv[5] == "early", sys.argv[6:])
def on_term(signum, frame):
    (d / (me + '.term')).write_text('')
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
(d / (me + '.started')).write_text('')
t0 = time.time()
while not all((d / (w + '.started')).exists() for w in wait_for):
    if time.time() - t0 > float(os.environ.get('FAKE_WAIT', '30')):
        sys.exit(3)
    time.sleep(0.05)
if code == 0 and not early:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'metrics.jsonl').write_text(json.dumps({"step": 1}) + "\\n")
(d / (me + '.done')).write_text('')
sys.exit(code)
"""


def _fake_jobs(tmp_path, monkeypatch, specs):
    """Jobs whose command is _FAKE with (name, exit code, names to wait for[, "early"]) each."""
    script = tmp_path / "fake_job.py"
    script.write_text(_FAKE)
    jobs = [sw.Job(grid=0, launcher="basic", overrides=[f"name={spec[0]}"], hydra_overrides=[],
                   run_dir=str(tmp_path / "runs" / spec[0]), steps=1, final_eval=False) for spec in specs]
    by_name = {spec[0]: spec for spec in specs}

    def command(job, python=sys.executable):
        n = job.overrides[0].split("=", 1)[1]
        _, code, wait_for, *rest = by_name[n]
        return [python, str(script), str(tmp_path), n, str(code), job.run_dir, "early" if rest else "-", *wait_for]
    monkeypatch.setattr(sw, "job_command", command)
    return jobs


def test_local_workers_run_jobs_at_the_same_time(tmp_path, monkeypatch, capsys):
    # a and b each wait for the other to start: they finish only when both run at once
    jobs = _fake_jobs(tmp_path, monkeypatch, [("a", 0, ["b"]), ("b", 0, ["a"]), ("c", 0, [])])
    assert sw._launch_local_jobs(jobs, tmp_path, dict(os.environ), workers=2, log_dir=tmp_path) == 0
    assert all((tmp_path / f"{n}.done").exists() for n in "abc")
    out = capsys.readouterr().out
    assert out.count(f"(output: {tmp_path}") == 3 and "job #2 finished" in out
    assert out.strip().splitlines()[-1] == "moeut.sweep: 3 job(s) finished, 0 stopped early"
    assert (tmp_path / "job2.log").read_text().startswith("=== moeut.sweep local launch, ")
    # one worker: a waits for b, which never starts -> a fails, and nothing after it starts
    import shutil
    for f in tmp_path.glob("*.started"):
        f.unlink()
    shutil.rmtree(tmp_path / "runs")  # not finished any more
    jobs = _fake_jobs(tmp_path, monkeypatch, [("a", 0, ["b"]), ("b", 0, ["a"])])
    monkeypatch.setenv("FAKE_WAIT", "2")  # a gives up on b after 2 s
    assert sw._launch_local_jobs(jobs, tmp_path, dict(os.environ), workers=1) == 3
    assert not (tmp_path / "b.started").exists()


def test_local_workers_stop_starting_jobs_after_a_failure(tmp_path, monkeypatch, capsys):
    # a fails at once; b (already running, waits for a) still finishes; c is never started
    jobs = _fake_jobs(tmp_path, monkeypatch, [("a", 7, []), ("b", 0, ["a"]), ("c", 0, [])])
    assert sw._launch_local_jobs(jobs, tmp_path, dict(os.environ), workers=2, log_dir=tmp_path) == 7
    assert (tmp_path / "b.done").exists() and not (tmp_path / "c.started").exists()
    assert "job #0 failed with exit code 7" in capsys.readouterr().err


def test_a_job_that_exits_before_its_schedule_ends_is_stopped_not_finished(tmp_path, monkeypatch, capsys):
    jobs = _fake_jobs(tmp_path, monkeypatch, [("a", 0, [], "early"), ("b", 0, [])])
    assert sw._launch_local_jobs(jobs, tmp_path, dict(os.environ), workers=1) == 0
    out = capsys.readouterr().out
    assert "job #0 stopped before the end of its schedule" in out and "job #1 finished" in out
    assert out.strip().splitlines()[-1] == "moeut.sweep: 1 job(s) finished, 1 stopped early (#0)"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_stops_its_jobs_and_starts_no_more(tmp_path, monkeypatch, capsys, sig):
    import signal
    import threading
    # a and b run until stopped (each waits for a job that never starts); c must never start
    jobs = _fake_jobs(tmp_path, monkeypatch, [("a", 0, ["never"]), ("b", 0, ["never"]), ("c", 0, [])])
    signum = getattr(signal, sig)

    def send():  # once both jobs run, signal the launcher (this process)
        t0 = time.time()
        while not ((tmp_path / "a.started").exists() and (tmp_path / "b.started").exists()) and time.time() - t0 < 30:
            time.sleep(0.05)
        os.kill(os.getpid(), signum)
    threading.Thread(target=send, daemon=True).start()
    before = signal.getsignal(signum)
    rc = sw._launch_local_jobs(jobs, tmp_path, dict(os.environ), workers=2, log_dir=tmp_path)
    assert rc == 128 + signum
    assert (tmp_path / "a.term").exists() and (tmp_path / "b.term").exists()  # each job got SIGTERM
    assert not (tmp_path / "c.started").exists()
    captured = capsys.readouterr()
    assert f"moeut.sweep: {sig} received: stopping the running jobs" in captured.err
    assert captured.out.strip().splitlines()[-1] == "moeut.sweep: 0 job(s) finished, 2 stopped early (#0, #1), 1 not started"
    assert signal.getsignal(signum) is before  # the launcher's handler is removed again


def test_the_launch_lock_stays_held_while_a_job_runs(tmp_path):
    """A job inherits the lock's file: while it runs, even with its launcher gone, a launch is refused."""
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    with sw.local_launch_lock(sweep_dir) as lock:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], pass_fds=(lock.fileno(),))
    try:  # the launcher's own handle is closed now; the job still holds the lock
        with pytest.raises(ValueError, match="or a job it started, is running"):
            with sw.local_launch_lock(sweep_dir):
                pass
    finally:
        child.kill()
        child.wait()
    with sw.local_launch_lock(sweep_dir):  # the job ended: free again
        pass


def test_workers_needs_a_local_launch(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moeut.sweep", "action=launch", "sweep=cpu_smoke", "workers=2",
                        f"root={tmp_path}"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("moeut.sweep: error: workers=2: only for a local launch")
    assert not any(tmp_path.iterdir())  # nothing written
