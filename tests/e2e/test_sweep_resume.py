"""moeut.sweep local launches resume a sweep: finished jobs are skipped (their run dirs untouched),
interrupted ones continue from their checkpoint to the same numbers as an uninterrupted run."""
import json
import os
import subprocess
import sys
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
        with pytest.raises(ValueError, match=r"another local launch of this sweep is running \(pid %d" % os.getpid()):
            sw.launch(sweep, root=str(tmp_path / "sweeps"), local=True)
    assert [p.name for p in sweep_dir.iterdir()] == [".local_launch.lock"]  # nothing written, no job started
    with sw.local_launch_lock(sweep_dir):  # released: the next launch takes it
        pass


# A fake job: marks itself started, then waits (up to 30 s) until every name in `wait_for` has started;
# exit 3 if one never does, exit `code` otherwise.
_FAKE = """import os, sys, time, pathlib
d, me, code, wait_for = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
(d / (me + '.started')).write_text('')
t0 = time.time()
while not all((d / (w + '.started')).exists() for w in wait_for):
    if time.time() - t0 > float(os.environ.get('FAKE_WAIT', '30')):
        sys.exit(3)
    time.sleep(0.05)
(d / (me + '.done')).write_text('')
sys.exit(code)
"""


def _fake_jobs(tmp_path, monkeypatch, specs):
    """Jobs whose command is _FAKE with (name, exit code, names to wait for) each."""
    script = tmp_path / "fake_job.py"
    script.write_text(_FAKE)
    jobs = [sw.Job(grid=0, launcher="basic", overrides=[f"name={n}"], hydra_overrides=[],
                   run_dir=str(tmp_path / "runs" / n)) for n, _, _ in specs]
    by_name = {n: (c, w) for n, c, w in specs}

    def command(job, python=sys.executable):
        n = job.overrides[0].split("=", 1)[1]
        return [python, str(script), str(tmp_path), n, str(by_name[n][0]), *by_name[n][1]]
    monkeypatch.setattr(sw, "job_command", command)
    return jobs


def test_local_workers_run_jobs_at_the_same_time(tmp_path, monkeypatch, capsys):
    # a and b each wait for the other to start: they finish only when both run at once
    jobs = _fake_jobs(tmp_path, monkeypatch, [("a", 0, ["b"]), ("b", 0, ["a"]), ("c", 0, [])])
    assert sw._launch_local_jobs(jobs, tmp_path, dict(os.environ), workers=2, log_dir=tmp_path) == 0
    assert all((tmp_path / f"{n}.done").exists() for n in "abc")
    out = capsys.readouterr().out
    assert out.count(f"(output: {tmp_path}") == 3 and "job #2 finished" in out
    # one worker: a waits for b, which never starts -> a fails, and nothing after it starts
    for f in tmp_path.glob("*.started"):
        f.unlink()
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


def test_workers_needs_a_local_launch(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moeut.sweep", "action=launch", "sweep=cpu_smoke", "workers=2",
                        f"root={tmp_path}"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("moeut.sweep: error: workers=2: only for a local launch")
    assert not any(tmp_path.iterdir())  # nothing written
