"""Run logging on rank 0: always `metrics.jsonl` in the run dir, optionally wandb, and progress
output (a tqdm bar on a TTY, one plain line per log interval otherwise, e.g. SLURM logs).

Every record is one JSON line `{"step": s, "time": t, key: value, ...}`; analysis rebuilds curves
from this file without the wandb API. Figures (routing heatmaps) go to wandb as images and to
`<run_dir>/routing/` as PNG files.

Messages and progress lines go through Python logging (logger `moeut.train`); `run_log_file`
also writes everything logged (warnings included, under `python train.py`) to `<run_dir>/train.log`.
On a resume from step s, records after s (written before the interruption, after the checkpoint)
are moved to `metrics.rewound.jsonl`, so metrics.jsonl holds exactly one history; so is a cut
last line (a crash mid-write), with its own message. Any other damaged line follows moeut.rundir's
corrupt-line policy: the start is refused naming metrics.jsonl:LINE.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

from moeut.rundir import METRICS_FILE, REWOUND_METRICS_FILE, TruncatedLineWarning, read_jsonl

log = logging.getLogger("moeut.train")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Held(logging.Handler):
    """Keeps records in memory until the run dir may be written (see `run_log_file`)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep `record` for a later train.log."""
        self.records.append(record)


@contextlib.contextmanager
def run_log_file(run_dir: str, enabled: bool = True, held: Optional[List[logging.LogRecord]] = None
                 ) -> Iterator[List[logging.LogRecord]]:
    """Log records (INFO and up, any logger) while inside: appended to <run_dir>/train.log when
    `enabled`, else kept in the yielded list, which a later `run_log_file(..., held=that list)`
    writes to train.log first (so the messages of a start's validation phase reach train.log
    once the start is accepted, and nothing is written when it is refused).
    Also makes `moeut` messages visible on stdout when nothing else (Hydra's job logging) has
    set up a console handler, e.g. when `train()` is called from Python."""
    moeut_log = logging.getLogger("moeut")
    root = logging.getLogger()
    old_level = moeut_log.level
    moeut_log.setLevel(logging.INFO)
    handlers = []
    if not moeut_log.hasHandlers():
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        moeut_log.addHandler(console)
        handlers.append((moeut_log, console))
    if enabled:
        fh = logging.FileHandler(os.path.join(run_dir, "train.log"), mode="a", encoding="utf-8")
        fh.setLevel(logging.INFO)
        fh.setFormatter(logging.Formatter(LOG_FORMAT))
        for rec in held or []:
            fh.handle(rec)
        target: logging.Handler = fh
    else:
        target = _Held()
    root.addHandler(target)
    handlers.append((root, target))
    try:
        yield target.records if isinstance(target, _Held) else []
    finally:
        for lg, h in handlers:
            lg.removeHandler(h)
            h.close()
        moeut_log.setLevel(old_level)


def log_to_files(text: str, level: int = logging.INFO) -> None:
    """Send a line to the log files only (train.log), e.g. while a progress bar owns the console."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(log.makeRecord(log.name, level, __file__, 0, text, (), None))


def rewind_metrics(run_dir: str, step: int) -> Tuple[int, List[int]]:
    """Move records with step > `step` from metrics.jsonl to metrics.rewound.jsonl (appended) and
    rewrite metrics.jsonl atomically. Returns (records of later steps moved, 1-based line numbers
    of cut lines moved). The file is read under the run-dir corrupt-line policy
    (moeut.rundir.read_jsonl): a cut last line without newline (a crash mid-write) is moved aside
    too; any other damaged line raises CorruptRunFile naming metrics.jsonl:LINE before anything
    is written (training refuses such a start earlier, in validated_start). A resumed run re-logs
    the later steps."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return 0, []
    with warnings.catch_warnings():  # the caller reports the cut line with what happened to it
        warnings.simplefilter("ignore", TruncatedLineWarning)
        cut = set(read_jsonl(path).skipped_lines)  # raises CorruptRunFile on any other damaged line
    keep, moved, n_later = [], [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = raw if raw.endswith(b"\n") else raw + b"\n"
            if lineno in cut:
                moved.append(line)
            elif json.loads(raw.decode("utf-8")).get("step", 0) > step:
                moved.append(line)
                n_later += 1
            else:
                keep.append(line)
    if not moved:
        return 0, []
    with open(os.path.join(run_dir, REWOUND_METRICS_FILE), "ab") as f:
        f.writelines(moved)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return n_later, sorted(cut)


class RunLogger:
    """Rank 0's writer of a run's records: metrics.jsonl (one JSON object per line:
    {"step", "time" (Unix seconds), key: value, ...}; None values are left out), wandb when
    `wandb_mode` is "offline" / "online", progress on the console ("bar", "lines" or "none";
    "auto": a bar on a TTY), and routing figures as PNG under <run_dir>/routing/. With
    `enabled=False` (other ranks) every method does nothing."""

    def __init__(self, run_dir: str, *, enabled: bool = True, wandb_mode: str = "disabled",
                 project: str = "moeut", entity: Optional[str] = None, name: Optional[str] = None,
                 group: Optional[str] = None, tags=(), config: Optional[Dict[str, Any]] = None,
                 wandb_id: Optional[str] = None, progress: str = "auto", total_steps: int = 0,
                 initial_step: int = 0, resume_step: Optional[int] = None):
        """resume_step: the step this start continues from (0 for a fresh start): records of
        later steps in metrics.jsonl are moved aside (see `rewind_metrics`)."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb = None
        self.wandb_id = wandb_id
        self.bar = None
        self._metrics = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None:
            n, cut = rewind_metrics(run_dir, resume_step)
            for lineno in cut:
                self.message(f"[log] WARNING {os.path.join(run_dir, METRICS_FILE)}:{lineno}: moved an unparsable "
                             f"last line without newline (a record cut short by a crash or kill, not a later "
                             f"step) to {REWOUND_METRICS_FILE}")
            if n:
                self.message(f"[log] starting at step {resume_step}: moved {n} records of later steps from "
                             "metrics.jsonl to metrics.rewound.jsonl (they are logged again)")
                if wandb_mode != "disabled" and wandb_id:
                    warnings.warn(f"logger.wandb: wandb run {wandb_id} already has steps after {resume_step}; "
                                  "wandb drops records whose step is not larger than its last one, so those "
                                  "steps keep their first values there (metrics.jsonl has the resumed ones)")
        self._metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if wandb_mode != "disabled":
            import wandb
            # config must be a plain container (passing a DictConfig is a known footgun)
            self.wandb = wandb.init(project=project, entity=entity, name=name, group=group, tags=list(tags),
                                    dir=run_dir, config=config, id=wandb_id, resume="allow", mode=wandb_mode)
            self.wandb_id = self.wandb.id
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "lines"
        self.progress = progress
        if progress == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Dict[str, Any], line: bool = False) -> None:
        """Write one record; `line=True` also prints it (or updates the bar's postfix)."""
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items() if v is not None}
        rec = {"step": step, "time": time.time(), **clean}
        self._metrics.write(json.dumps(rec, allow_nan=True) + "\n")
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
        if line:
            short = {k.split("/")[-1] if k.startswith("train/") else k: v for k, v in clean.items()}
            text = " ".join(f"{k}={_fmt(v)}" for k, v in short.items())
            if self.bar is not None:
                self.bar.set_postfix_str(text[:200])
                log_to_files(f"[step {step}] {text}")
            elif self.progress == "lines":
                log.info(f"[step {step}] {text}")

    def message(self, text: str, level: int = logging.INFO) -> None:
        """Print a line on the console (above the progress bar) and append it to train.log at
        `level` (logging.INFO, or logging.WARNING for a warning)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
            log_to_files(text, level)
        else:
            log.log(level, text)

    def advance(self, n: int = 1) -> None:
        """Move the progress bar on by `n` steps."""
        if self.bar is not None:
            self.bar.update(n)

    def log_figure(self, step: int, key: str, fig) -> None:
        """Save a matplotlib Figure as PNG under run_dir/routing/ and log it to wandb."""
        if not self.enabled:
            return
        out = os.path.join(self.run_dir, "routing")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"{key.replace('/', '_')}_step{step:07d}.png")
        fig.savefig(path + ".tmp", dpi=80, format="png")  # written whole, then renamed
        os.replace(path + ".tmp", path)
        if self.wandb is not None:
            import wandb
            self.wandb.log({key: wandb.Image(path)}, step=step)

    def close(self) -> None:
        """Close the bar, metrics.jsonl and the wandb run (idempotent)."""
        if self.bar is not None:
            self.bar.close()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)
