"""Tests for the sweep tooling (issue 8): sweep files, launcher presets, sbatch template, summary.

- every sweeps/*.yaml composes with Hydra's compose API against the real conf/ and its dry run
  lists the expected number of jobs;
- a local multirun (basic launcher) of two tiny jobs on real text completes and the summary shows
  both, with numbers checked against metrics.jsonl and an independent parameter count;
- the submitit presets submit through a fake `sbatch`/`srun` on PATH (below) that records the
  script and runs the job on this machine: partition, GPUs, tasks per node, signal, requeue;
- the sbatch template, run by bash under fake srun/torchrun/scontrol/scancel, forwards the
  time-limit signal to training and requeues the job.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[2]
from conftest import C4  # noqa: E402  (the embedded C4 sample, data/README.md)
sys.path.insert(0, str(REPO))

from moeut.analysis import summary as summ  # noqa: E402
from moeut import sweep as sw  # noqa: E402

SWEEP_FILES = sw.list_sweep_files(REPO / "sweeps")


# ==========================================================================================
# A fake SLURM: sbatch, srun, sacct, scontrol, scancel (and torchrun for the sbatch template) as
# small Python scripts first on PATH. They record every call under a state directory and really
# run submitted jobs, one simulated task per array element on this machine, so a submitit job goes
# all the way through `python -m submitit.core._submit` and the Hydra task function (train.py).
# ==========================================================================================

_COMMON = r'''
import json, os, re, subprocess, sys, time
STATE = os.environ["FAKE_SLURM_DIR"]
def record(tool, **kw):
    with open(os.path.join(STATE, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"tool": tool, "argv": sys.argv[1:], **kw}) + "\n")
'''

_SBATCH = _COMMON + r'''
script_path = sys.argv[-1]
text = open(script_path).read()
counter = os.path.join(STATE, "next_job_id")
job_id = int(open(counter).read()) if os.path.exists(counter) else 1000
open(counter, "w").write(str(job_id + 1))
os.makedirs(os.path.join(STATE, "scripts"), exist_ok=True)
open(os.path.join(STATE, "scripts", f"{job_id}.sh"), "w").write(text)
record("sbatch", job_id=job_id)
m = re.search(r"^#SBATCH --array=0-(\d+)", text, re.M)
n_tasks = int(m.group(1)) + 1 if m else 1
print(f"Submitted batch job {job_id}", flush=True)
# run the job after returning, as a real scheduler would (submitit moves its pickles into place
# only once it knows the job id)
subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "_fake_runner"), script_path,
                  str(job_id), str(n_tasks), "1" if m else "0"], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
'''

_RUNNER = _COMMON + r'''
script, job_id, n_tasks, is_array = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
state_dir = os.path.join(STATE, "state")
os.makedirs(state_dir, exist_ok=True)
for i in range(n_tasks):
    name = f"{job_id}_{i}" if is_array else job_id
    open(os.path.join(state_dir, name), "w").write("RUNNING")
    text = open(script).read()
    flag = lambda k, d: int((re.search(rf"^#SBATCH --{k}=(\d+)", text, re.M) or [None, d])[1])
    nodes, per_node = flag("nodes", 1), flag("ntasks-per-node", 1)
    # the allocation as SLURM would describe it to the batch script
    env = dict(os.environ, SLURM_JOB_ID=str(int(job_id) * 100 + i) if is_array else job_id,
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
               SLURM_NTASKS=str(nodes * per_node), SLURM_NTASKS_PER_NODE=str(per_node),
               SLURM_SUBMIT_DIR=os.getcwd())
    if is_array:
        env.update(SLURM_ARRAY_JOB_ID=job_id, SLURM_ARRAY_TASK_ID=str(i))
    rc = subprocess.call(["bash", script], env=env)
    open(os.path.join(state_dir, name), "w").write("COMPLETED" if rc == 0 else "FAILED")
'''

_SRUN = _COMMON + r'''
args = sys.argv[1:]
opts, i = {}, 0
while i < len(args) and args[i].startswith("-"):
    a = args[i]
    if "=" in a:
        k, v = a.split("=", 1); opts[k] = v; i += 1
    elif a in ("--output", "--error", "-o", "-e", "--nodes", "--ntasks-per-node", "-N", "-n"):
        opts[a] = args[i + 1]; i += 2
    else:
        opts[a] = True; i += 1
cmd = args[i:]
record("srun", command=cmd, env={k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "MASTER_", "MOEUT_", "SUBMITIT_"))})
def fill(p):
    return (p.replace("%A", os.environ.get("SLURM_ARRAY_JOB_ID", "")).replace("%a", os.environ.get("SLURM_ARRAY_TASK_ID", ""))
             .replace("%j", os.environ.get("SLURM_JOB_ID", "")).replace("%t", "0"))
# one simulated task: this CPU machine stands in for task 0 of the step
env = dict(os.environ, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NTASKS="1",
           SLURM_STEP_NUM_TASKS="1")
out = open(fill(opts["--output"]), "a") if "--output" in opts else None
err = open(fill(opts["--error"]), "a") if "--error" in opts else subprocess.STDOUT
rc = subprocess.call(cmd, env=env, stdout=out, stderr=err if out is not None else None)
# The other tasks of the step (DDP ranks 1..N-1 on a real cluster) are not run on this CPU machine:
# report them as finished the way submitit's workers do, so the launcher sees a complete job.
n_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
if rc == 0 and n_tasks > 1 and cmd[-3:-1] == ["-m", "submitit.core._submit"]:
    import pickle
    job = (f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
           if "SLURM_ARRAY_JOB_ID" in os.environ else os.environ["SLURM_JOB_ID"])
    folder = fill(cmd[-1].replace("%j", job))
    for t in range(1, n_tasks):
        with open(os.path.join(folder, f"{job}_{t}_result.pkl"), "wb") as f:
            pickle.dump(("success", None), f)
sys.exit(rc)
'''

_SACCT = _COMMON + r'''
ids = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
state_dir = os.path.join(STATE, "state")
print("JobID|State|NodeList")
for jid in ids:
    found = False
    if os.path.isdir(state_dir):
        for name in sorted(os.listdir(state_dir)):
            if name == jid or name.startswith(jid + "_"):
                print(f"{name}|{open(os.path.join(state_dir, name)).read()}|localhost")
                found = True
    if not found:
        print(f"{jid}|PENDING|")
'''

_SCONTROL = _COMMON + r'''
record("scontrol")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("localhost")
'''

_SCANCEL = _COMMON + r'''
import signal
record("scancel")
# forward --signal=SIG to the processes registered as the job's steps (fake torchrun writes its pid)
sig = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--signal=")), None)
pid_file = os.path.join(STATE, "step.pid")
if sig and os.path.exists(pid_file):
    os.kill(int(open(pid_file).read()), getattr(signal, "SIG" + sig.removeprefix("SIG")))
'''

_TORCHRUN = _COMMON + r'''
import signal
if "--help" in sys.argv:
    print("usage: torchrun [--nnodes NNODES] [--nproc_per_node N] [--signals-to-handle SIGNALS] "
          "[--shutdown-timeout SECONDS] ...")
    sys.exit(0)
record("torchrun")
got = []
def handler(signum, frame):
    got.append(signal.Signals(signum).name)
signal.signal(signal.SIGUSR1, handler)
signal.signal(signal.SIGTERM, handler)
open(os.path.join(STATE, "step.pid"), "w").write(str(os.getpid()))
deadline = time.time() + 60
while not got and time.time() < deadline:   # "training" until a signal asks it to stop
    time.sleep(0.05)
record("torchrun-exit", signals=got)
sys.exit(0 if got else 3)
'''

TOOLS = {"sbatch": _SBATCH, "_fake_runner": _RUNNER, "srun": _SRUN, "sacct": _SACCT,
         "scontrol": _SCONTROL, "scancel": _SCANCEL, "torchrun": _TORCHRUN}


@dataclass
class FakeSlurm:
    bin_dir: Path
    state_dir: Path

    def env(self, base: Dict[str, str] | None = None) -> Dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["FAKE_SLURM_DIR"] = str(self.state_dir)
        return env

    def calls(self, tool: str | None = None) -> List[dict]:
        p = self.state_dir / "calls.jsonl"
        if not p.exists():
            return []
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return [r for r in rows if tool is None or r["tool"] == tool]

    def submitted_scripts(self) -> List[str]:
        d = self.state_dir / "scripts"
        return [p.read_text() for p in sorted(d.glob("*.sh"), key=lambda p: int(p.stem))] if d.is_dir() else []


def install_fake_slurm(root: Path, tools: tuple = ("sbatch", "_fake_runner", "srun", "sacct",
                                                    "scontrol", "scancel")) -> FakeSlurm:
    bin_dir, state_dir = root / "fake_bin", root / "fake_slurm_state"
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in tools:
        p = bin_dir / name
        p.write_text(f"#!{sys.executable}\n" + TOOLS[name])
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return FakeSlurm(bin_dir, state_dir)


# ==========================================================================================
# Helpers
# ==========================================================================================

def _base_env(tmp_path: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(MOEUT_CACHE=str(tmp_path / "cache"), MOEUT_WANDB="disabled", WANDB_MODE="disabled",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    return env


def _needs_data():
    assert (C4 / "train.jsonl.gz").is_file(), f"embedded corpus missing: {C4}/train.jsonl.gz"


# ==========================================================================================
# Sweep files
# ==========================================================================================

def test_sweep_files_exist():
    names = {sw.load_sweep(p).name for p in SWEEP_FILES}
    for required in ("main_table", "g_ablation", "ln_placement", "k_ablation", "dexpert_ablation",
                     "no_sharing", "sut_comparison", "baselines", "cpu_smoke"):
        assert required in names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_composes_and_counts(path, tmp_path):
    sweep = sw.load_sweep(path)
    assert sweep.expected_jobs is not None, f"{path}: set expected_jobs"
    jobs = sw.compose_jobs(sweep, root=str(tmp_path))  # raises on any job that fails to compose
    assert len(jobs) == sweep.expected_jobs
    run_dirs = [j.run_dir for j in jobs]
    assert len(set(run_dirs)) == len(run_dirs)
    for job in jobs:
        assert Path(job.run_dir).parent == tmp_path / sweep.name
        assert f"logger.group={sweep.name}" in job.overrides  # wandb runs grouped by sweep
        # the run dir names the job by its own overrides, never by its position in the sweep
        assert not re.fullmatch(r"\d+", Path(job.run_dir).name)
        assert job.launcher.startswith("submitit_slurm_")
        assert job.resources["gpus_per_node"] == job.resources["tasks_per_node"]


def test_main_table_pairs_every_moeut_run_with_its_dense_baseline(tmp_path):
    jobs = sw.plan(sw.load_sweep(REPO / "sweeps" / "main_table.yaml"), root=str(tmp_path))
    exps = {o.split("=", 1)[1] for j in jobs for o in j.overrides if o.startswith("experiment=")}
    moeut = {e for e in exps if "_moeut_" in e}
    assert {e.replace("_moeut_", "_dense_") for e in moeut} <= exps
    assert {f"c4_moeut_{s}" for s in ("44m", "126m", "244m", "319m", "728m", "1040m")} <= moeut


def test_expand_is_hydras_cartesian_product():
    jobs = sw.expand(["a=1,2", "b=x,y,z", "c=5"])
    expected = [[f"a={a}", f"b={b}", "c=5"] for a in (1, 2) for b in ("x", "y", "z")]
    assert jobs == expected


def test_bad_sweep_files_fail_naming_file_and_field(tmp_path):
    def write(text):
        p = tmp_path / "s.yaml"
        p.write_text(text)
        return p

    with pytest.raises(ValueError, match=r"s\.yaml.*unknown field.*'grid'"):
        sw.load_sweep(write("name: x\ngrid: []\n"))
    with pytest.raises(ValueError, match=r"grids\[0\]\.overrides.*not a Hydra override"):
        sw.load_sweep(write("name: x\ngrids:\n  - overrides: [experiment]\n"))
    with pytest.raises(ValueError, match=r"hydra\.\* keys"):
        sw.load_sweep(write("name: x\ngrids:\n  - overrides: [hydra.sweep.dir=/x]\n"))
    s = sw.load_sweep(write("name: x\nexpected_jobs: 3\ngrids:\n  - overrides: ['experiment=cpu_tiny,cpu_small']\n"))
    with pytest.raises(ValueError, match="expands to 2 jobs but expected_jobs is 3"):
        sw.check_expected(s, sw.plan(s))
    s = sw.load_sweep(write("name: x\ngrids:\n  - overrides: [experiment=no_such_experiment]\n"))
    with pytest.raises(ValueError, match=r"job #0 \[experiment=no_such_experiment"):
        sw.compose_jobs(s, root=str(tmp_path))


def _opts(overrides):
    """The checked options of `python -m moeut.sweep <overrides>`."""
    from moeut.cli import typed_options
    return typed_options(sw.SweepOptions, overrides, "moeut.sweep")


def test_dry_run_cli_prints_every_job(tmp_path, capsys):
    assert sw.run(_opts(["action=dry-run", "sweep=k_ablation", f"root={tmp_path}",
                         'set=["hydra.launcher.partition=mypart"]'])) == 0
    out = capsys.readouterr().out
    assert out.count("run dir:") == 3
    for name in ("c4_moeut_244m_k8", "c4_moeut_244m", "c4_moeut_244m_k24"):
        assert f"{tmp_path}/k_ablation/experiment={name}\n" in out
    assert "partition=mypart" in out and "tasks_per_node=8" in out


def test_set_replaces_the_sweep_files_value_and_says_so(tmp_path, capsys):
    """`set` overriding a key of the sweep file's `common` (cpu_smoke: train.steps=10) replaces it: the
    grid command carries the key once, with set's value, every job composes to it, and one line names
    what was replaced."""
    assert sw.run(_opts(["action=dry-run", "sweep=cpu_smoke", f"root={tmp_path}", 'set=["train.steps=7"]'])) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"set: train.steps=7 replaces common's train.steps=10 of {REPO / 'sweeps' / 'cpu_smoke.yaml'}"
    command = out.split("grid 0 command:")[1]
    assert command.count("train.steps=") == 1 and " train.steps=7 " in command
    jobs = sw.compose_jobs(sw.load_sweep(REPO / "sweeps" / "cpu_smoke.yaml"), str(tmp_path), extra=["train.steps=7"])
    assert [j.steps for j in jobs] == [7, 7]
    # a key given twice is refused, not resolved silently; a set value that collapses a grid is named
    with pytest.raises(ValueError, match=r"^set: train\.steps is given 2 times \(train\.steps=7, train\.steps=8\); give it once$"):
        sw.run(_opts(["action=dry-run", "sweep=cpu_smoke", 'set=["train.steps=7","train.steps=8"]']))
    with pytest.raises(ValueError, match=r"expands to 1 jobs but expected_jobs is 2 \(set: model=dense_tiny "
                                         r"replaces grid 0's model=tiny,dense_tiny\)$"):
        sw.run(_opts(["action=dry-run", "sweep=cpu_smoke", f"root={tmp_path}", 'set=["model=dense_tiny"]']))


def test_cli_errors_name_the_option(tmp_path):
    """Bad options of `python -m moeut.sweep` fail naming the option; an unknown sweep name lists
    the available ones (read from sweeps/, not a hand list)."""
    names = [p.stem for p in SWEEP_FILES]
    with pytest.raises(FileNotFoundError, match=r"sweep=no_such_sweep: .*available: " + ", ".join(names)):
        sw.run(_opts(["action=dry-run", "sweep=no_such_sweep"]))
    with pytest.raises(ValueError, match=r"sweep: required for action=launch.*available: " + names[0]):
        sw.run(_opts(["action=launch"]))
    with pytest.raises(ValueError, match=r"^action: must be one of list \| dry-run \| launch, got 'run'$"):
        sw.run(_opts(["action=run"]))
    with pytest.raises(ValueError, match=r"set: 'train\.steps' is not a Hydra override"):
        sw.run(_opts(["action=dry-run", "sweep=cpu_smoke", "set=[train.steps]"]))
    with pytest.raises(ValueError, match=r"^local: Value 'maybe' is not a valid bool"):
        sw.run(_opts(["local=maybe"]))
    with pytest.raises(ValueError, match=r"^sweep_dir: no such option"):
        sw.run(_opts([f"+sweep_dir={tmp_path}"]))
    with pytest.raises(FileNotFoundError, match=r"sweeps_dir=.*nowhere: no such directory"):
        sw.run(_opts([f"sweeps_dir={tmp_path / 'nowhere'}"]))
    # a sweep named from another sweeps_dir; `list` lists that directory
    (tmp_path / "mine.yaml").write_text("name: mine\nexpected_jobs: 2\n"
                                        "grids:\n  - overrides: ['experiment=cpu_tiny,cpu_small']\n")
    assert sw.resolve_sweep_path("mine", tmp_path) == tmp_path / "mine.yaml"
    with pytest.raises(FileNotFoundError, match=r"available: mine$"):
        sw.resolve_sweep_path("cpu_smoke", tmp_path)


def test_cli_subprocess_dry_run_writes_nothing_in_cwd(tmp_path):
    """The real command line (quoting of `set`), exit codes 0 / 1, and no Hydra output or log
    file in the working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "moeut.sweep", "action=dry-run", "sweep=k_ablation",
                        f"root={tmp_path / 'r'}", 'set=["train.steps=3","hydra.launcher.partition=p1"]'],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("run dir:") == 3 and r.stdout.count("partition=p1 ") == 3
    assert "train.steps=3" in r.stdout.split("grid 0 command:")[1]
    r = subprocess.run([sys.executable, "-m", "moeut.sweep", "action=launch", "sweep=nope"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "moeut.sweep: error: sweep=nope:" in r.stderr and "cpu_smoke" in r.stderr
    assert list(cwd.iterdir()) == []


# ==========================================================================================
# Local multirun of two tiny jobs on real text, then the summary
# ==========================================================================================

def test_local_multirun_two_tiny_jobs_and_summary(tmp_path):
    _needs_data()
    root = tmp_path / "sweeps"
    r = subprocess.run([sys.executable, "-m", "moeut.sweep", "action=launch", "sweep=cpu_smoke", "local=true",
                        f"root={root}"], cwd=REPO, env=_base_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep_dir = root / "cpu_smoke"
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["model=dense_tiny", "model=tiny"]

    res = summ.write_summary(sweep_dir)
    rows = {row["run"]: row for row in res["rows"]}
    assert set(rows) == {"model=dense_tiny", "model=tiny"}
    from moeut.checkpoint import load_model
    for run, arch in (("model=tiny", "moeut"), ("model=dense_tiny", "dense")):
        row = rows[run]
        records = [json.loads(line) for line in (sweep_dir / run / "metrics.jsonl").read_text().splitlines()]
        last_val = [rec for rec in records if "validation/val/loss" in rec][-1]
        assert row["arch"] == arch and row["step"] == 10 and row["dataset"] == "c4_sample"
        assert row["experiment"] == "cpu_tiny"
        assert row["val_ppl"] == pytest.approx(math.exp(last_val["validation/val/loss"]), rel=1e-4)
        model = load_model(sweep_dir / run).model  # independent count: the real module's tensors
        assert row["params"] == sum(p.numel() for p in model.parameters())
    md = (sweep_dir / "summary.md").read_text()
    assert "model=tiny" in md and "model=dense_tiny" in md
    assert (sweep_dir / "summary.csv").read_text().count("\n") == 3
    assert (sweep_dir / "ppl_vs_params.png").stat().st_size > 1000


# ==========================================================================================
# Submitit presets against the fake SLURM
# ==========================================================================================

@pytest.mark.parametrize("preset,nodes,gpus,tasks", [("submitit_slurm_1gpu", 1, 1, 1),
                                                     ("submitit_slurm_8gpu", 1, 8, 8),
                                                     ("submitit_slurm_multinode", 2, 8, 8)])
def test_submitit_preset_with_fake_slurm(preset, nodes, gpus, tasks, tmp_path):
    _needs_data()
    fake = install_fake_slurm(tmp_path)
    env = fake.env(_base_env(tmp_path))
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "experiment=cpu_tiny", "train.steps=2", "model=tiny",
           f"hydra/launcher={preset}", "hydra.launcher.partition=testpart",
           "hydra.launcher.account=testacct", "hydra.launcher.qos=high", "hydra.launcher.timeout_min=90",
           f"hydra.sweep.dir={sweep_dir}", f"hydra.sweep.subdir={sw.SUBDIR}",
           "hydra.job.config.override_dirname.exclude_keys=[experiment,train.steps]"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    scripts = fake.submitted_scripts()
    assert len(scripts) == 1
    lines = set(scripts[0].splitlines())
    for expected in ("#SBATCH --partition=testpart", "#SBATCH --account=testacct", "#SBATCH --qos=high",
                     "#SBATCH --time=90", f"#SBATCH --nodes={nodes}", f"#SBATCH --gpus-per-node={gpus}",
                     f"#SBATCH --ntasks-per-node={tasks}", "#SBATCH --signal=USR1@120",
                     "#SBATCH --requeue", "#SBATCH --open-mode=append",
                     "export SUBMITIT_PREEMPT_SIGNAL=USR1", "export MOEUT_WANDB=disabled"):
        assert expected in lines, f"{expected!r} not in the submitted script:\n{scripts[0]}"
    assert not any(l.startswith("#SBATCH --signal=USR2") for l in lines)
    (srun,) = fake.calls("srun")
    assert srun["command"][-3:-1] == ["-m", "submitit.core._submit"]
    assert srun["env"]["SLURM_NTASKS"] == str(nodes * tasks)
    assert srun["env"]["MASTER_ADDR"] == "localhost"  # from `scontrol show hostnames`
    # the job really ran: train.py in the override-named (requeue-stable) sub-directory
    run_dir = sweep_dir / "model=tiny"
    assert (run_dir / "checkpoints" / "step_0000002" / "model.pt").is_file()
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


# ==========================================================================================
# The sbatch template (no submitit)
# ==========================================================================================

def test_sbatch_template_forwards_signal_and_requeues(tmp_path):
    script = REPO / "sweeps" / "slurm" / "train.sbatch"
    text = script.read_text()
    for line in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --ntasks-per-node=1"):
        assert line in text.splitlines()
    fake = install_fake_slurm(tmp_path, tools=("srun", "scontrol", "scancel", "torchrun"))
    env = fake.env(_base_env(tmp_path))
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NAME="moeut", SLURM_JOB_NODELIST="node[01-02]",
               SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4", MOEUT_RUN_DIR=str(tmp_path / "run"),
               MOEUT_PREPARE_CMD="echo prepare_data")  # stands in for python -m moeut.prepare_data (needs C4)
    proc = subprocess.Popen(["bash", str(script), "experiment=c4_moeut_244m", "train.steps=10"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_file = fake.state_dir / "step.pid"
    deadline = time.time() + 60
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert pid_file.exists(), "torchrun never started"
    proc.send_signal(signal.SIGUSR1)  # what SLURM does 120 s before the time limit (B: = batch shell)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out

    (trun,) = fake.calls("torchrun")
    argv = trun["argv"]
    assert "--nnodes=2" in argv and "--nproc_per_node=4" in argv and "--rdzv_backend=c10d" in argv
    assert "--rdzv_endpoint=localhost:" + str(20000 + 4242 % 20000) in argv  # head node via scontrol
    assert "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in argv
    assert argv[argv.index("train.py") + 1:] == [f"hydra.run.dir={tmp_path / 'run'}",
                                                  "experiment=c4_moeut_244m", "train.steps=10"]
    assert fake.calls("torchrun-exit")[0]["signals"] == ["SIGUSR1"]  # training was told to save
    scontrol = [c["argv"] for c in fake.calls("scontrol")]
    assert ["requeue", "4242"] in scontrol
    assert ["show", "hostnames", "node[01-02]"] in scontrol
    assert "requeueing job 4242" in out
    # data preparation ran first, once, on one task, with the run dir and the same overrides
    prep = [c["command"] for c in fake.calls("srun") if c["command"][:1] == ["echo"]]
    assert prep == [["echo", "prepare_data", f"prepare.run_dir={tmp_path / 'run'}",
                     "experiment=c4_moeut_244m", "train.steps=10"]]
