"""List, dry-run and launch the paper's experiment grids (`sweeps/*.yaml`) as Hydra multiruns.

    python -m moeut.sweep                                        # action=list: every sweep file, job counts
    python -m moeut.sweep action=dry-run sweep=main_table        # each job's overrides and run dir
    python -m moeut.sweep action=launch sweep=main_table \\
        'set=["hydra.launcher.partition=gpu","hydra.launcher.account=myproj"]'
    python -m moeut.sweep action=launch sweep=cpu_smoke local=true   # basic launcher, this machine

A typed tool (moeut.cli.typed_tool; options in `SweepOptions`: action, sweep, sweeps_dir, local,
launcher, root, set, detach; `python -m moeut.sweep --help` is generated from them). `sweep=` is a file path
or the name of a file in sweeps_dir; an unknown name is refused with the available ones.

A sweep file is YAML:

    name: g_ablation                   # sweep dir = <root>/<name>; wandb group = <name>
    description: ...                   # what paper table/figure it reproduces
    expected_jobs: 7                   # checked on every list/dry-run/launch
    common: [train.log_interval=100]   # overrides for every job (optional)
    grids:                             # one `python train.py -m` per grid (each its own launcher)
      - launcher: submitit_slurm_1gpu  # a conf/hydra/launcher/ preset (local=true: basic)
        overrides:                     # Hydra multirun overrides: comma lists = Cartesian product
          - experiment=c4_moeut_244m,c4_moeut_244m_g1

Run directories. Each job runs in `<sweep dir>/<override dirname>`, where the dirname is Hydra's
`${hydra.job.override_dirname}` built from the grid's own overrides only (common overrides, extra
`set=[...]` overrides and `seed` are excluded), e.g. `main_table/experiment=c4_moeut_244m`. The name
depends on what the job *is*, not on its position in the sweep, so a SLURM requeue, a re-launch of
the whole sweep after a crash, or a sweep file that gained a job all land every job in its old
directory, where train.py auto-resumes from the newest checkpoint. A local launch (local=true)
runs the jobs one at a time and skips every job whose run dir already holds a finished run
(metrics.jsonl reaches train.steps, with its final validation), so re-running the same launch
command after an interruption continues the sweep where it stopped.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .cli import CONF_DIR, option, typed_tool
from .paths import clone_root
from .sweep_file import DEFAULT_SWEEPS_DIR, Grid, SweepFile, list_sweep_files, load_sweep
DEFAULT_ROOT = os.environ.get("MOEUT_SWEEP_ROOT", "outputs/sweeps")
# keys that never name a run directory: the seed (a re-seeded rerun should resume, not fork)
ALWAYS_EXCLUDED = ("seed",)
SUBDIR = "${hydra.job.override_dirname}"
# launcher settings the dry run prints per job
RESOURCE_KEYS = ("partition", "account", "qos", "nodes", "tasks_per_node", "gpus_per_node",
                 "cpus_per_task", "mem_gb", "timeout_min", "constraint")


# ------------------------------------------------------------------------------------------
# Expanding a grid into jobs (Hydra's own parser and BasicSweeper semantics)
# ------------------------------------------------------------------------------------------

def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def expand(overrides: Sequence[str], config_loader: Any = None) -> List[List[str]]:
    """The job override lists Hydra's basic sweeper makes from `overrides` (Cartesian product of
    comma lists / range() / choice(); glob() needs `config_loader`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parser = OverridesParser.create(config_loader=config_loader)
    parsed = parser.parse_overrides(list(overrides))
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return batches[0]


@dataclass
class Job:
    """One job of a planned sweep: its grid's index and launcher, the overrides train.py sees, the
    hydra.* overrides (sweep dir, subdir, launcher settings), and -- after compose_jobs -- its run
    directory and resolved SLURM resources."""

    grid: int
    launcher: str
    overrides: List[str]          # what the job's train.py sees (task overrides)
    hydra_overrides: List[str]    # sweep dir / subdir / launcher settings
    run_dir: Optional[str] = None
    resources: Dict[str, Any] = field(default_factory=dict)  # resolved SLURM settings (dry run)
    steps: Optional[int] = None   # the job's train.steps (compose_jobs)
    final_eval: bool = True       # the job's train.final_eval (compose_jobs)


def hydra_overrides(sweep: SweepFile, grid: Grid, root: str, local: bool,
                    launcher: Optional[str], extra: Sequence[str]) -> List[str]:
    """hydra.* overrides for one grid: launcher preset, sweep dir, override-named subdir."""
    exclude = sorted({_key(o) for o in list(sweep.common) + list(extra) if not _key(o).startswith("hydra")}
                     | set(ALWAYS_EXCLUDED) | {sweep.wandb_group_key})
    chosen = "basic" if local else (launcher or grid.launcher)
    return [f"hydra/launcher={chosen}",
            f"hydra.sweep.dir={root}/{sweep.name}",
            f"hydra.sweep.subdir={SUBDIR}",
            "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(exclude) + "]",
            *[o for o in extra if _key(o).startswith("hydra")]]


def task_overrides(sweep: SweepFile, grid: Grid, extra: Sequence[str], group: bool = True) -> List[str]:
    """The overrides a grid's train.py jobs see: common + grid + non-hydra `extra` ones (an `extra`
    key replaces the same key of common/grid: `replaced_by_set` names them), plus
    `<wandb_group_key>=<sweep name>` when `group` and no override sets that key already."""
    task_extra = [o for o in extra if not _key(o).startswith("hydra")]
    set_keys = {_key(o) for o in task_extra}
    ov = [*[o for o in [*sweep.common, *grid.overrides] if _key(o) not in set_keys], *task_extra]
    if group and sweep.wandb_group_key and not any(_key(o) == sweep.wandb_group_key for o in ov):
        ov.append(f"{sweep.wandb_group_key}={sweep.name}")
    return ov


def replaced_by_set(sweep: SweepFile, extra: Sequence[str]) -> List[str]:
    """One phrase per sweep-file override (common or a grid's) that a `set` entry replaces:
    "set: <set override> replaces <where>'s <file override>"."""
    by_key = {_key(o): o for o in extra}
    lines = []
    for where, overrides in [("common", sweep.common)] + [(f"grid {gi}", g.overrides) for gi, g in enumerate(sweep.grids)]:
        lines += [f"set: {by_key[_key(o)]} replaces {where}'s {o}" for o in overrides if _key(o) in by_key]
    return lines


def plan(sweep: SweepFile, root: str = DEFAULT_ROOT, local: bool = False,
         launcher: Optional[str] = None, extra: Sequence[str] = (), group: bool = True,
         config_loader: Any = None) -> List[Job]:
    """Every job of the sweep (without composing configs)."""
    jobs = []
    for gi, grid in enumerate(sweep.grids):
        hov = hydra_overrides(sweep, grid, root, local, launcher, extra)
        for job_ov in expand(task_overrides(sweep, grid, extra, group), config_loader):
            jobs.append(Job(grid=gi, launcher=hov[0].split("=", 1)[1], overrides=job_ov,
                            hydra_overrides=hov))
    return jobs


def check_expected(sweep: SweepFile, jobs: Sequence[Job], extra: Sequence[str] = ()) -> None:
    """Raise ValueError naming the file when the sweep's `expected_jobs` differs from len(jobs), and
    the `set` overrides (`extra`) that replaced a value of the file, the likely cause, when any did."""
    if sweep.expected_jobs is not None and len(jobs) != sweep.expected_jobs:
        replaced = replaced_by_set(sweep, extra)
        cause = f" ({'; '.join(replaced)})" if replaced else ""
        raise ValueError(f"sweep file {sweep.path}: expands to {len(jobs)} jobs but "
                         f"expected_jobs is {sweep.expected_jobs}{cause}")


# ------------------------------------------------------------------------------------------
# Composing every job against the real conf/ (dry run)
# ------------------------------------------------------------------------------------------

def register_train_schemas(repo_root: Optional[Path] = None) -> None:
    """Register the training config's structured schemas in Hydra's ConfigStore
    (`moeut.train_lib.config.register_configs`, as `python train.py` does) so that composing
    conf/ here validates exactly as a launched job would. `repo_root` is not needed any more (the
    schemas come from the package, not from train.py) and is accepted for existing callers."""
    from moeut.train_lib.config import register_configs
    register_configs()


def compose_jobs(sweep: SweepFile, root: str = DEFAULT_ROOT, local: bool = False,
                 launcher: Optional[str] = None, extra: Sequence[str] = (),
                 repo_root: Optional[Path] = None, config_name: str = "config") -> List[Job]:
    """Plan the sweep and compose every job's config with Hydra's compose API against the real
    conf/ (`repo_root`/conf, default the package's: moeut.paths.conf_dir) -- so a missing
    experiment, a misspelt key or an unknown launcher preset fails here, not on the cluster; fills
    each job's resolved run dir. Raises ValueError naming the job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    register_train_schemas(repo_root)
    try:  # the training code's model-config builder (validates presets and fields); optional
        from moeut.train_lib.config import build_model_config
    except ImportError:
        build_model_config = None
    GlobalHydra.instance().clear()
    config_dir = str(repo_root / "conf") if repo_root is not None else CONF_DIR
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        loader = GlobalHydra.instance().hydra.config_loader
        probe = compose(config_name=config_name)
        group = OmegaConf.select(probe, sweep.wandb_group_key, default="__absent__") != "__absent__"
        if not group:
            print(f"warning: the training config has no '{sweep.wandb_group_key}' key: wandb runs of "
                  f"this sweep are not grouped (set wandb_group_key in {sweep.path})", file=sys.stderr)
        jobs = plan(sweep, root, local, launcher, extra, group=group, config_loader=loader)
        seen: Dict[str, int] = {}
        for i, job in enumerate(jobs):
            try:
                cfg = compose(config_name=config_name, overrides=job.overrides + job.hydra_overrides,
                              return_hydra_config=True)
                job.run_dir = str(Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir)
                launcher_cfg = cfg.hydra.launcher
                job.resources = {k: OmegaConf.select(launcher_cfg, k, throw_on_resolution_failure=False)
                                 for k in RESOURCE_KEYS if k in launcher_cfg}
                job.steps = OmegaConf.select(cfg, "train.steps", default=None)
                job.final_eval = bool(OmegaConf.select(cfg, "train.final_eval", default=True))
                # resolve the job's own config too, as run_job would (HydraConfig set for the
                # ${hydra:...} resolver): a bad interpolation should fail now, not on the cluster
                with open_dict(cfg):
                    cfg.hydra.runtime.output_dir = job.run_dir
                HydraConfig.instance().set_config(cfg)
                job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
                OmegaConf.to_container(job_cfg, resolve=True, throw_on_missing=False)
                if build_model_config is not None:  # unknown preset / bad architecture field
                    build_model_config(cfg.model)
            except Exception as e:  # noqa: BLE001 - re-raised with the job named
                raise ValueError(f"sweep {sweep.name} ({sweep.path}), job #{i} "
                                 f"[{' '.join(job.overrides)}]: {type(e).__name__}: {e}") from e
            if job.run_dir in seen:
                raise ValueError(f"sweep {sweep.name}: jobs #{seen[job.run_dir]} and #{i} share run "
                                 f"dir {job.run_dir}; make their grid overrides differ")
            seen[job.run_dir] = i
    GlobalHydra.instance().clear()
    check_expected(sweep, jobs, extra)
    return jobs


# ------------------------------------------------------------------------------------------
# Launching
# ------------------------------------------------------------------------------------------

def grid_command(sweep: SweepFile, grid_index: int, root: str, local: bool,
                 launcher: Optional[str], extra: Sequence[str], group: bool = True,
                 python: str = sys.executable) -> List[str]:
    """`python train.py -m ...` for one grid (argv list: no shell, `${...}` stays literal); an
    installed wheel has no train.py: `python -m moeut.train -m ...` (the same entry point)."""
    grid = sweep.grids[grid_index]
    entry = ["train.py"] if clone_root() is not None else ["-m", "moeut.train"]
    return [python, *entry, "-m", *task_overrides(sweep, grid, extra, group),
            *hydra_overrides(sweep, grid, root, local, launcher, extra)]


def shown_command(cmd: Sequence[str]) -> str:
    """A grid command as printed: without this interpreter's path (`train.py -m ...` in a clone,
    `python -m moeut.train -m ...` for an installed wheel), shell-quoted."""
    if cmd and cmd[0] == sys.executable:
        cmd = ["python", *cmd[1:]] if len(cmd) > 1 and cmd[1] == "-m" else list(cmd[1:])
    return shlex.join(cmd)


def job_finished(run_dir: os.PathLike, steps: Optional[int], final_eval: bool = True) -> bool:
    """Whether the run in `run_dir` has finished its schedule: its metrics.jsonl has a record at
    step `steps` (train.steps) -- with a `validation/...` key when `final_eval` (train.final_eval),
    so a run killed during its final validation is not taken as finished. No metrics.jsonl, an
    unknown `steps` (None) or an unreadable file: False (the job is run; train.py resumes it)."""
    from .rundir import CorruptRunFile, TruncatedLineWarning, read_jsonl
    import warnings
    path = Path(run_dir) / "metrics.jsonl"
    if steps is None or not path.is_file():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncatedLineWarning)
            records = read_jsonl(path).records
    except (OSError, CorruptRunFile):
        return False
    return any(r.get("step") == steps and (not final_eval or any(str(k).startswith("validation/") for k in r))
               for r in records)


def job_command(job: Job, python: str = sys.executable) -> List[str]:
    """`python train.py -m ...` for one job of a local launch: a one-job multirun with the job's
    own overrides and its grid's hydra overrides, so it lands in the same run dir as in the grid's
    multirun (`${hydra.job.override_dirname}`)."""
    entry = ["train.py"] if clone_root() is not None else ["-m", "moeut.train"]
    return [python, *entry, "-m", *job.overrides, *job.hydra_overrides]


def launch(sweep: SweepFile, root: str = DEFAULT_ROOT, local: bool = False,
           launcher: Optional[str] = None, extra: Sequence[str] = (), detach: bool = False,
           repo_root: Optional[Path] = None, env: Optional[Dict[str, str]] = None,
           check: bool = True, workers: int = 1) -> int:
    """Run the sweep. Local: job by job in the foreground, or `workers` jobs at a time
    (`_launch_local_jobs`: a finished job is skipped, an interrupted one resumes from its checkpoint). SLURM: every grid's multirun, all
    grids at once (the submitit launcher blocks until its jobs end), logs in the sweep dir; a
    failing grid's last log line is printed as `moeut.sweep: error: grid N failed ...`. The grids
    run in `repo_root` (default: the clone's root; for an installed wheel the working directory),
    against which a relative `root` is taken. Raises ValueError (`check_slurm`) before writing
    anything when SLURM's commands are missing."""
    if not local:
        check_slurm(sweep, launcher, env)
    jobs = compose_jobs(sweep, root, local, launcher, extra, repo_root) if check else []
    group = bool(jobs) and any(_key(o) == sweep.wandb_group_key for o in jobs[0].overrides)
    if repo_root is None:
        repo_root = clone_root() or Path.cwd()
    sweep_dir = (repo_root / root / sweep.name) if not os.path.isabs(root) else Path(root) / sweep.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    run_env = dict(os.environ if env is None else env)
    # submitit writes the sbatch --signal line with this signal, and the job binds its handler to it
    run_env.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    if local and check:  # job by job: a finished job is skipped, an interrupted one resumes
        with local_launch_lock(sweep_dir) as lock:  # refused before anything is written when another launch runs
            (sweep_dir / "sweep.yaml").write_text(sweep.path.read_text(encoding="utf-8"), encoding="utf-8")
            return _launch_local_jobs(jobs, repo_root, run_env, workers, log_dir=sweep_dir, lock_fd=lock.fileno())
    (sweep_dir / "sweep.yaml").write_text(sweep.path.read_text(encoding="utf-8"), encoding="utf-8")
    procs = []
    for gi in range(len(sweep.grids)):
        cmd = grid_command(sweep, gi, root, local, launcher, extra, group)
        print("$ " + shown_command(cmd), flush=True)
        if local:
            rc = subprocess.run(cmd, cwd=repo_root, env=run_env).returncode
            if rc != 0:
                print(f"grid {gi} failed with exit code {rc}", file=sys.stderr)
                return rc
            continue
        log = open(sweep_dir / f"launch_grid{gi}.log", "ab")
        procs.append((gi, subprocess.Popen(cmd, cwd=repo_root, env=run_env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=detach)))
        print(f"  grid {gi}: pid {procs[-1][1].pid}, log {log.name}", flush=True)
    if local or detach:
        return 0
    rc = 0
    for gi, p in procs:
        code = p.wait()
        print(f"grid {gi} finished with exit code {code}")
        if code != 0:  # the reason is in the grid's log: its last line says it on the console
            print(f"moeut.sweep: error: grid {gi} failed with exit code {code}: {_last_line(sweep_dir / f'launch_grid{gi}.log')} "
                  f"(log: {sweep_dir / f'launch_grid{gi}.log'})", file=sys.stderr)
        rc = rc or code
    return rc


@contextlib.contextmanager
def local_launch_lock(sweep_dir: Path):
    """Hold `<sweep_dir>/.local_launch.lock` (an exclusive flock) while a local launch runs, so a
    second launch of the same sweep cannot train the same job into the same run dir at once.
    Raises ValueError naming the lock file (and the holder's pid) when another launch holds it."""
    import fcntl
    path = Path(sweep_dir) / ".local_launch.lock"
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ValueError(f"sweep dir {sweep_dir}: another local launch of this sweep, or a job it started, is "
                             f"running (launch pid {holder}, lock {path}); wait for it or stop it, then launch again") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield f
    finally:
        f.close()


def _launch_local_jobs(jobs: Sequence[Job], repo_root: Path, env: Dict[str, str], workers: int = 1,
                       log_dir: Optional[Path] = None, python: str = sys.executable,
                       lock_fd: Optional[int] = None) -> int:
    """Run the composed `jobs` on this machine (a local launch), at most `workers` at a time: a job
    whose run dir holds a finished run (`job_finished`) is skipped with a line saying so; any other is
    started, and train.py's train.resume=auto continues an interrupted one from its newest checkpoint.
    With one worker a job's output goes to the console; with several, each job's to
    `<log_dir>/job<i>.log` (appended), named when it starts. A job that exits 0 before its schedule's
    end (train.stop_at, a stop signal) is reported as stopped, not finished, and the launch ends with
    a count. SIGTERM or SIGINT to the launcher is passed on to the running jobs as SIGTERM (each
    saves a checkpoint and exits) and the launch waits for them, starts nothing new and returns
    128 + the signal number. After a failing job no new job starts (the running ones finish). Each
    job inherits `lock_fd` (the launch lock's file), so the lock stays held while any job started
    here runs, even if the launcher itself is killed. Returns 0, the first failing job's exit code,
    or 128 + signal."""
    import signal
    import time
    todo = []
    for i, job in enumerate(jobs):
        run_dir = _abs_run_dir(job, repo_root)
        if job_finished(run_dir, job.steps, job.final_eval):
            print(f"job #{i} skipped: finished (step {job.steps} in {run_dir / 'metrics.jsonl'})", flush=True)
        else:
            todo.append((i, job))
    rc, running, stopped, finished = 0, [], [], 0  # running: [(index, job, Popen, log file or None)]
    got: Dict[str, Optional[int]] = {"sig": None}

    def on_signal(signum, frame):  # stop: the jobs save their checkpoints, the launch waits for them
        if got["sig"] is None:
            print(f"moeut.sweep: {signal.Signals(signum).name} received: stopping the running jobs "
                  f"(each saves a checkpoint); launch again to resume", file=sys.stderr, flush=True)
        got["sig"] = signum
        for _, _, proc, _ in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while todo or running:
            while todo and len(running) < workers and rc == 0 and got["sig"] is None:
                i, job = todo.pop(0)
                cmd = job_command(job, python)
                log = None
                if workers > 1:
                    log_path = Path(log_dir or repo_root) / f"job{i}.log"
                    log = open(log_path, "ab")
                    log.write(f"=== moeut.sweep local launch, {time.strftime('%Y-%m-%d %H:%M:%S')}: job #{i} ===\n".encode())
                    log.flush()  # appended across launches: each launch's output starts with this line
                    print(f"job #{i}: $ " + shown_command(cmd) + f"   (output: {log_path})", flush=True)
                else:
                    print(f"job #{i}: $ " + shown_command(cmd), flush=True)
                # own process group: a Ctrl-C at the terminal reaches the launcher only, which passes it on once
                running.append((i, job, subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=log,
                                                         stderr=subprocess.STDOUT if log else None,
                                                         start_new_session=True,
                                                         pass_fds=(lock_fd,) if lock_fd is not None else ()), log))
            if not running:
                break
            time.sleep(0.2)
            for entry in list(running):
                i, job, proc, log = entry
                code = proc.poll()
                if code is None:
                    continue
                running.remove(entry)
                if log is not None:
                    log.close()
                if code != 0:
                    print(f"job #{i} failed with exit code {code}", file=sys.stderr, flush=True)
                    rc = rc or code
                elif job_finished(_abs_run_dir(job, repo_root), job.steps, job.final_eval):
                    finished += 1
                    print(f"job #{i} finished", flush=True)
                else:
                    stopped.append(i)
                    print(f"job #{i} stopped before the end of its schedule (train.steps={job.steps}; "
                          f"train.stop_at or a signal): launch again to resume it", flush=True)
    finally:
        for s_, h in old.items():
            signal.signal(s_, h)
    left = len(todo)
    print(f"moeut.sweep: {finished} job(s) finished, {len(stopped)} stopped early"
          + (f" (#{', #'.join(map(str, stopped))})" if stopped else "")
          + (f", {left} not started" if left else ""), flush=True)
    if got["sig"] is not None:
        return 128 + got["sig"]
    return rc


def _abs_run_dir(job: Job, repo_root: Path) -> Path:
    """The job's run dir, relative ones taken against `repo_root`."""
    run_dir = Path(job.run_dir)
    return run_dir if run_dir.is_absolute() else repo_root / run_dir


def _last_line(path: Path) -> str:
    """The last non-blank line of a log file (what a failing command printed last), or ''."""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    return next((ln for ln in reversed(lines) if ln), "")


def is_slurm_launcher(name: str) -> bool:
    """Whether the conf/hydra/launcher preset `name` submits to SLURM (Hydra's `submitit_slurm`
    or a preset built on it)."""
    if name == "submitit_slurm":
        return True
    from .paths import conf_dir
    preset = conf_dir() / "hydra" / "launcher" / f"{name}.yaml"
    return preset.is_file() and "submitit_slurm" in preset.read_text(encoding="utf-8")


def check_slurm(sweep: SweepFile, launcher: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> None:
    """Before a SLURM launch writes anything: raise ValueError naming the grid and its launcher
    when SLURM's `sbatch` / `srun` are not on PATH (this machine is no SLURM login node), with
    the way out (`local=true`)."""
    import shutil
    path = (os.environ if env is None else env).get("PATH")
    for gi, grid in enumerate(sweep.grids):
        name = launcher or grid.launcher
        if not is_slurm_launcher(name):
            continue
        missing = [c for c in ("sbatch", "srun") if shutil.which(c, path=path) is None]
        if missing:
            raise ValueError(f"launcher={name} (grid {gi} of sweep {sweep.name}): {' and '.join(missing)} not found "
                             f"on PATH, so this machine cannot submit SLURM jobs; launch from a SLURM login node, "
                             f"or pass local=true to run the jobs here one after another")


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def _print_jobs(sweep: SweepFile, jobs: Sequence[Job]) -> None:
    """The dry run's listing: per job its grid, launcher, resources, overrides and run dir."""
    print(f"sweep {sweep.name}: {len(jobs)} job(s) in {len(sweep.grids)} grid(s)  [{sweep.path}]")
    for i, job in enumerate(jobs):
        res = " ".join(f"{k}={v}" for k, v in job.resources.items() if v is not None)
        print(f"  #{i:<3d} grid {job.grid}  launcher={job.launcher}" + (f"  [{res}]" if res else ""))
        print(f"       overrides: {' '.join(job.overrides)}")
        print(f"       run dir:   {job.run_dir}"
              + ("   (finished: a local launch skips it)" if job.run_dir and job_finished(
                  job.run_dir, job.steps, job.final_eval) else ""))


SWEEP_ACTIONS = ("list", "dry-run", "launch")


@dataclass
class SweepOptions:
    """The options of `python -m moeut.sweep` (`--help` is generated from them)."""
    action: str = option("list", help="list: every sweep file with its job count; dry-run: compose every job "
                         "against conf/ and print its overrides, run dir and SLURM resources, submit nothing; "
                         "launch: run every grid (`python train.py -m ...`; installed: `python -m moeut.train -m ...`)",
                         choices=SWEEP_ACTIONS)
    sweep: Optional[str] = option(None, help="dry-run/launch: a sweep file's path, or the name of one in sweeps_dir "
                                  "(an unknown name is refused with the available ones)")
    sweeps_dir: Optional[str] = option(None, help="where sweep names are looked up and what `list` shows; null = the "
                                       "repository's sweeps/ (installed: the package's copy)")
    local: bool = option(False, help="jobs one after another on this machine (no SLURM); finished jobs skipped, interrupted ones resumed")
    workers: int = option(1, lo=1, help="local launch: this many jobs at a time (each its own process; give each "
                          "its share of the cores with train.threads), each job's output in <sweep dir>/job<i>.log")
    launcher: Optional[str] = option(None, help="a conf/hydra/launcher/ preset for every grid (e.g. "
                                     "submitit_slurm_8gpu); null = each grid's own")
    root: str = option("${oc.env:MOEUT_SWEEP_ROOT,outputs/sweeps}",
                       help="sweep dirs go to <root>/<sweep name> ($MOEUT_SWEEP_ROOT, else outputs/sweeps)")
    set: List[str] = option(default_factory=list, help="extra overrides for every job, a list of quoted strings, e.g. "
                            "'set=[\"train.steps=1000\",\"hydra.launcher.partition=gpu\"]' (hydra.* ones go to the launcher)")
    detach: bool = option(False, help="launch on SLURM: return once the submitters have started instead of waiting")




def resolve_sweep_path(sweep: str, sweeps_dir: os.PathLike = DEFAULT_SWEEPS_DIR) -> Path:
    """The sweep file `sweep` names: a path to a file, or the name of one in `sweeps_dir`
    (`g_ablation` -> sweeps/g_ablation.yaml). Raises FileNotFoundError naming the `sweep` option
    and listing the available names when neither exists."""
    path = Path(sweep)
    if path.is_file():
        return path
    named = Path(sweeps_dir) / f"{sweep}.yaml"
    if named.is_file():
        return named
    names = [p.stem for p in list_sweep_files(sweeps_dir)]
    raise FileNotFoundError(f"sweep={sweep}: no such sweep file, and no {named.name} in {sweeps_dir}; "
                            f"available: {', '.join(names) if names else '(none)'}")


def _list(sweeps_dir: Path) -> int:
    """`action=list`: one line per sweep file (name, job count, file, description); 1 on a bad file."""
    files = list_sweep_files(sweeps_dir)
    if not files:
        print(f"no sweep files in {sweeps_dir}", file=sys.stderr)
        return 1
    for f in files:
        try:
            s = load_sweep(f)
            n = len(plan(s))
            flag = "" if s.expected_jobs in (None, n) else f"  (expected {s.expected_jobs}!)"
            print(f"{s.name:<22s} {n:4d} jobs  {f.name:<24s} {s.description.splitlines()[0] if s.description else ''}{flag}")
        except Exception as e:  # noqa: BLE001 - list the rest, then fail
            print(f"{f.name}: ERROR {e}", file=sys.stderr)
            return 1
    return 0


def run(o: SweepOptions) -> int:
    """Do what `python -m moeut.sweep` options `o` ask (`action=list | dry-run | launch`); the exit code.

    Returns 0 on success, 1 when `list` finds no or a broken sweep file, the first failing grid's
    exit code for a local launch. Raises ValueError / FileNotFoundError naming the option (missing
    or unknown `sweep` -- with the available names --, a missing sweeps_dir, a `set` entry that is
    not an override) or the sweep file and job (errors of load_sweep / compose_jobs)."""
    sweeps_dir = Path(o.sweeps_dir) if o.sweeps_dir else DEFAULT_SWEEPS_DIR
    if o.sweeps_dir and not sweeps_dir.is_dir():
        raise FileNotFoundError(f"sweeps_dir={sweeps_dir}: no such directory")
    extra = list(o.set)
    for item in extra:
        if "=" not in item and not item.startswith("~"):
            raise ValueError(f"set: {item!r} is not a Hydra override (key=value); quote each entry: "
                             "'set=[\"train.steps=1000\"]'")
    for key in sorted({_key(i) for i in extra}):
        if len(same := [i for i in extra if _key(i) == key]) > 1:
            raise ValueError(f"set: {key} is given {len(same)} times ({', '.join(same)}); give it once")
    root = str(o.root or DEFAULT_ROOT)
    if o.action == "list":
        return _list(sweeps_dir)
    if not o.sweep:
        names = [p.stem for p in list_sweep_files(sweeps_dir)]
        raise ValueError(f"sweep: required for action={o.action}: pass sweep=<name or file>; "
                         f"available: {', '.join(names) if names else '(none)'}")
    sweep = load_sweep(resolve_sweep_path(o.sweep, sweeps_dir))
    for line in replaced_by_set(sweep, extra):
        print(f"{line} of {sweep.path}", flush=True)
    from .cli import check_out_dir
    check_out_dir(root, "root")  # the sweep dirs go under it: a file there is refused before any job
    if o.action == "dry-run":
        jobs = compose_jobs(sweep, root, o.local, o.launcher, extra)
        _print_jobs(sweep, jobs)
        for gi in range(len(sweep.grids)):
            group = any(_key(ov) == sweep.wandb_group_key for ov in jobs[0].overrides)
            print(f"grid {gi} command:\n  " + shown_command(grid_command(sweep, gi, root, o.local, o.launcher,
                                                                           extra, group)))
        return 0
    if o.workers > 1 and not o.local:
        raise ValueError(f"workers={o.workers}: only for a local launch (local=true); a SLURM launch runs every job at once")
    return launch(sweep, root, o.local, o.launcher, extra, o.detach, workers=o.workers)


def _main(o: SweepOptions) -> None:
    """Exit with run()'s code; bad input (an option, a sweep file, a job that does not compose, no
    SLURM for a SLURM launcher) is one line `moeut.sweep: error: ...`, exit 1."""
    from .cli import bad_input_exits
    with bad_input_exits("moeut.sweep"):
        rc = run(o)
    sys.exit(rc)


main = typed_tool(
    "moeut.sweep", SweepOptions,
    summary="List, dry-run and launch the paper's experiment grids (sweeps/*.yaml) as Hydra multiruns of\n"
            "train.py. Every job runs in <root>/<sweep name>/<its grid overrides>, so a re-launch or a SLURM\n"
            "requeue lands each job in its old directory, where train.py resumes it. See docs/sweeps.md.",
    usage="python -m moeut.sweep [key=value ...]   (also moeut-sweep)",
    notes="Examples:\n"
          "  python -m moeut.sweep\n"
          "  python -m moeut.sweep action=dry-run sweep=g_ablation\n"
          "  python -m moeut.sweep action=launch sweep=main_table 'set=[\"hydra.launcher.account=myproj\"]'\n"
          "  python -m moeut.sweep action=launch sweep=cpu_smoke local=true root=/tmp/sweeps",
)(_main)


if __name__ == "__main__":
    main()
