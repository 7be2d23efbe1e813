"""The one way to read a run directory: metrics, evaluation results, saved config, checkpoints.

A *run directory* is what `python train.py` writes (docs/training.md, "Run directory")::

    <run>/metrics.jsonl              one JSON object per line: {"step": s, "time": t, key: value, ...}
    <run>/metrics.rewound.jsonl      records a resume moved aside (never read here: see below)
    <run>/.hydra/{config,overrides,hydra}.yaml   the job's config, command-line overrides, Hydra state
    <run>/checkpoints/step_XXXXXXX/  checkpoints (model_config.json, model.pt, meta.json, config.yaml, ...)
    <run>/eval/*.json                `python -m moeut.evaluate` results, one file per evaluation
                                     (results_step_XXXXXXX.json, then results_step_XXXXXXX.2.json, ...;
                                     never overwritten: see "Evaluation results" below) and
                                     lm-evaluation-harness results files
    <run>/step_time.json             a measured step time (moeut.analysis compare measure=true)

Every reader of these files (the `python -m moeut.analysis` subcommands summary, compare, curves,
table and cpu-result, moeut.evaluate / moeut.eval.zeroshot, routing and its notebooks) goes
through this module, so they agree on where things are, on what a damaged file means, and on the
run's facts: its validation perplexity (`val_ppl_key`, the one rule), training corpus
(`RunDir.dataset`), context length (`RunDir.seq_len`) and commit (`RunDir.commit`).

**The corrupt-line policy** (one for every reader; docs/analysis.md, "Reading run directories"):

- A line of a JSON-lines file (metrics.jsonl) that is not valid JSON is skipped with a warning
  (`TruncatedLineWarning`, naming `file:line` and counting the skipped lines) only when it is the
  file's LAST line and has no terminating newline: that is what a write cut short by a crash or
  a kill leaves (the logger writes each record and its newline in one line-buffered write).
- Any other unparsable line, a line that is valid JSON but not an object, and any whole JSON or
  YAML file of the run dir that does not parse (eval results, .hydra/*.yaml, step_time.json:
  all written in one go, the results atomically) raise `CorruptRunFile` (a ValueError) naming
  `file:line` (and column where the parser gives one). Nothing is guessed around: repair or
  delete the line/file named.
- Blank lines are ignored. A complete record without its final newline is kept.

`metrics.rewound.jsonl` holds the records a resume moved out of metrics.jsonl (records of steps
after the checkpoint it resumed from, and any cut line; moeut.train_lib.logging.rewind_metrics),
so metrics.jsonl alone is the run's one history; no reader here ever reads the rewound file,
which would count those steps twice.

**Evaluation results** (the one rule; docs/evaluation.md, "Results files"): every
`moeut.evaluate` run writes a new file, `results_<tag>.json` for a checkpoint's first evaluation
and `results_<tag>.<k>.json` (k = 2, 3, ...) for later ones (`moeut.results_files`); none is ever
replaced. Readers that want "the run's evaluation" (`RunDir.latest_eval`: tables, summaries,
compare) take the newest evaluated step and merge its evaluations per task (`results_files.merge_evals`): for
each task the result of the newest evaluation (largest k) that scored it; a task skipped there
keeps an earlier real result. Each merged task records its `results_file`, `n_items`, `limit` and
`data` (full set or carried subset), so tables can say when cells differ in what they scored.

`run_dir_of(path)` maps a run dir, its checkpoints/ dir, a checkpoint step dir or a file in one
to the run dir. Checkpoint *contents* are read by moeut.checkpoint (its own policy: an unreadable
checkpoint of a run dir is skipped with a warning naming the file).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

from .results_files import is_moeut_eval, merge_evals

PathLike = Union[str, "os.PathLike[str]"]

# ------------------------------------------------------------------------------------------
# File names of a run directory
# ------------------------------------------------------------------------------------------

METRICS_FILE = "metrics.jsonl"
REWOUND_METRICS_FILE = "metrics.rewound.jsonl"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
EVAL_RESULTS_GLOB = "results_*.json"      # moeut.evaluate's results files inside EVAL_DIR
HYDRA_DIR = ".hydra"
HYDRA_CONFIG_FILE = "config.yaml"         # in HYDRA_DIR: the job's (unresolved) config
HYDRA_OVERRIDES_FILE = "overrides.yaml"   # in HYDRA_DIR: the command-line overrides
HYDRA_STATE_FILE = "hydra.yaml"           # in HYDRA_DIR: Hydra's own config (runtime choices)
CHECKPOINT_CONFIG_FILE = "config.yaml"    # in a checkpoint dir: the resolved training config
STEP_TIME_FILE = "step_time.json"         # measured step time (moeut.analysis compare)
STEP_DIR_RE = re.compile(r"^step_(\d+)$")  # a checkpoint dir: step_XXXXXXX
# folders of a run dir that never hold another run (pruned by find_runs)
_NOT_RUNS = ("eval", "routing", "wandb", "analysis")


class CorruptRunFile(ValueError):
    """A file of a run directory does not parse; the message names `file:line` (and column).
    Raised for every unparsable line except a cut last line of a JSON-lines file."""


class TruncatedLineWarning(UserWarning):
    """A JSON-lines file's last line has no newline and does not parse (a write cut by a crash);
    it was skipped. The message names `file:line`."""


# ------------------------------------------------------------------------------------------
# Files: the one policy
# ------------------------------------------------------------------------------------------

class JsonLines(NamedTuple):
    """Result of `read_jsonl`: the records (JSON objects, in file order) and the 1-based line
    numbers that were skipped as cut by a crash (at most one: the last line)."""
    records: List[Dict[str, Any]]
    skipped_lines: List[int]


def read_jsonl(path: PathLike) -> JsonLines:
    """Every JSON object of a JSON-lines file, under the module's corrupt-line policy.

    Raises FileNotFoundError (no such file), CorruptRunFile (an unparsable line that is not the
    unterminated last line, or a line that is not a JSON object; message `path:line: ...`).
    Warns TruncatedLineWarning (`path:line: skipping unparsable last line ...`) for a cut last line.
    """
    path = os.fspath(path)
    records: List[Dict[str, Any]] = []
    skipped: List[int] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            cut = not raw.endswith(b"\n")  # only the file's last line can lack its newline
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else f"not UTF-8: {e.reason}"
                if cut:
                    skipped.append(lineno)
                    warnings.warn(f"{path}:{lineno}: skipping unparsable last line ({reason}; no newline: a write "
                                  f"cut short by a crash or kill); {len(skipped)} line skipped, "
                                  f"{len(records)} records read", TruncatedLineWarning, stacklevel=2)
                    continue
                raise CorruptRunFile(f"{path}:{lineno}: not valid JSON ({reason}); only an unterminated last "
                                     "line (a write cut by a crash) is skipped: repair or delete this line") from None
            if not isinstance(rec, dict):
                raise CorruptRunFile(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    return JsonLines(records, skipped)


def read_metrics(path: PathLike) -> List[Dict[str, Any]]:
    """Records of a run's metrics.jsonl, in logging order; `path` is the file, or a directory
    that `run_dir_of` maps to the run dir (run dir, checkpoints/, a step dir). Same policy and
    errors as `read_jsonl`; never reads metrics.rewound.jsonl. Raises FileNotFoundError when the
    file does not exist."""
    p = Path(path)
    if p.is_dir():
        p = Path(run_dir_of(p)) / METRICS_FILE
    return read_jsonl(p).records


def read_json(path: PathLike) -> Any:
    """A whole JSON file (eval results, step_time.json, meta.json). Raises FileNotFoundError,
    CorruptRunFile (`path:line:col: not valid JSON (...)`, or not UTF-8)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise CorruptRunFile(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise CorruptRunFile(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_yaml(path: PathLike) -> Any:
    """A YAML file of a run dir (.hydra/*.yaml, a checkpoint's config.yaml), as plain Python
    containers; `${...}` interpolations stay strings. Raises FileNotFoundError, CorruptRunFile
    (`path:line:col: not valid YAML (...)`)."""
    import yaml
    path = os.fspath(path)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{mark.line + 1}:{mark.column + 1}" if mark is not None else "?"
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise CorruptRunFile(f"{path}:{where}: not valid YAML ({problem})") from None
        except UnicodeDecodeError as e:
            raise CorruptRunFile(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# ------------------------------------------------------------------------------------------
# Where the run dir is
# ------------------------------------------------------------------------------------------

def run_dir_of(path: PathLike) -> str:
    """The run directory (absolute, symlinks resolved) of `path`, which may be

    - a run dir: itself (also a bare checkpoint dir outside any run, e.g. an exported one: it
      is its own run dir, so results written "into the run" stay inside what was given);
    - its `checkpoints/` dir: the parent;
    - a checkpoint dir `step_XXXXXXX`: the run dir above `checkpoints/` (or, for step dirs
      kept directly in the run dir, their parent);
    - a file (a checkpoint's model.pt, a run's metrics.jsonl, ...): `run_dir_of` of its folder.

    Raises FileNotFoundError when `path` does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory (expected a run dir, its checkpoints/ "
                                "dir, a checkpoints/step_XXXXXXX dir or a file in one)")
    p = p.resolve()
    if p.is_file():
        p = p.parent
    if p.name == CHECKPOINTS_DIR:
        return str(p.parent)
    if STEP_DIR_RE.match(p.name):
        return str(p.parent.parent if p.parent.name == CHECKPOINTS_DIR else p.parent)
    return str(p)


def is_run_dir(path: PathLike) -> bool:
    """True for a directory holding metrics.jsonl or a checkpoints/ folder."""
    p = Path(path)
    return (p / METRICS_FILE).is_file() or (p / CHECKPOINTS_DIR).is_dir()


def find_runs(root: PathLike) -> List[Path]:
    """Run directories under `root` (itself included), sorted by path. Hidden folders (.hydra,
    .submitit), checkpoints/ and a run's eval/, routing/, wandb/, analysis/ are never searched.
    Raises FileNotFoundError when `root` is not a directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep dir {root} does not exist or is not a directory")
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        is_run = METRICS_FILE in filenames or CHECKPOINTS_DIR in dirnames
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != CHECKPOINTS_DIR
                             and not (is_run and d in _NOT_RUNS))
        if is_run:
            runs.append(Path(dirpath))
    return sorted(runs)


# ------------------------------------------------------------------------------------------
# Run facts: the validation perplexity (the one rule), the training corpus
# ------------------------------------------------------------------------------------------

# train.py logs validation/<set>/perplexity per validation set; "val" is the held-out split of the
# training corpus itself, the number every table reports (extra sets such as "c4" are other corpora)
VAL_PPL_KEY = "validation/val/perplexity"
_VAL_PPL_ALIASES = (VAL_PPL_KEY, "val/perplexity")  # the same set under the older logging name
_VAL_PPL_RE = re.compile(r"^(.*/)?val[^/]*/(.*/)?(perplexity|ppl)$|^val[^/]*_perplexity$")
_CORPUS_NAMES = {"c4": "C4", "slimpajama": "SlimPajama", "pes2o": "peS2o", "thestack": "The Stack"}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def val_ppl_key(keys: Any, preferred: Optional[str] = None) -> Optional[str]:
    """The validation-perplexity key among logged `keys`, by the one rule: `preferred` when given
    (None if it is not logged); else the training corpus's own held-out set (VAL_PPL_KEY, or its
    older name "val/perplexity"), whatever else is logged and in whatever order; else, for a run
    with only other validation sets, the first in sorted order of the keys whose last part is
    "perplexity"/"ppl" under a part starting with "val" ("validation/c4/perplexity")."""
    keys = set(keys)
    if preferred is not None:
        return preferred if preferred in keys else None
    for k in _VAL_PPL_ALIASES:
        if k in keys:
            return k
    return next(iter(sorted(k for k in keys if isinstance(k, str) and _VAL_PPL_RE.match(k))), None)


def val_ppl_curve(records: List[Dict[str, Any]], key: Optional[str] = None) -> Tuple[Optional[str], List[Tuple[int, float]]]:
    """(key, [(step, perplexity), ...] in logging order) of metrics records: the key by
    `val_ppl_key` over every key logged with a finite number (`key` as its `preferred`); records
    without a numeric step are left out. (None, []) when the run logged no validation perplexity."""
    k = val_ppl_key({name for r in records for name, v in r.items() if _finite(v)}, key)
    if k is None:
        return None, []
    return k, [(int(r["step"]), float(r[k])) for r in records if _finite(r.get(k)) and _finite(r.get("step"))]


def corpus_name(data: Any) -> Optional[str]:
    """The training corpus named by a run config's `data` section: a hub corpus by its `source`
    (c4 -> "C4", slimpajama, pes2o, thestack), local files by the folder holding `data.path`
    (.../c4/train.jsonl.gz -> "c4"); None when `data` names neither."""
    if not isinstance(data, dict):
        return None
    source = data.get("source")
    if isinstance(source, str) and source != "local":
        return _CORPUS_NAMES.get(source, source)
    path = data.get("path")
    if isinstance(path, str) and path:
        return Path(path).parent.name or Path(path).stem
    return None


# ------------------------------------------------------------------------------------------
# A run directory
# ------------------------------------------------------------------------------------------

# Run-dir leaves that name no run: a time stamp (conf/config.yaml's hydra.run.dir, Hydra's own
# HH-MM-SS), a SLURM job id or a multirun job number.
_OPAQUE_LEAF = re.compile(r"(\d{4}-\d\d-\d\d_)?\d\d-\d\d-\d\d(_\d+)?|\d+")


PROVENANCE_FILE = "provenance.jsonl"  # one record per start of a run (moeut.provenance)


def commit_label(records: List[Dict[str, Any]]) -> str:
    """Short commit(s) of a run's starts, in order, distinct: "1a2b3c4", "1a2b3c4-dirty",
    "1a2b3c4, 5d6e7f8" (resumed on another commit); "no git (moeut X)" for an installed package;
    "" without records."""
    out: List[str] = []
    for r in records:
        g = r.get("git")
        if g and g.get("commit"):
            label = g["commit"][:7] + ("-dirty" if g.get("dirty") else "")
        else:
            label = f"no git (moeut {(r.get('packages') or {}).get('moeut')})"
        if label not in out:
            out.append(label)
    return ", ".join(out)


class RunDir:
    """One run directory (see the module docstring for its layout and the corrupt-line policy).

    `RunDir(path)` takes anything `run_dir_of` takes. Readers return empty results for absent
    files (a run without metrics.jsonl has no metrics) and raise CorruptRunFile for damaged ones.
    """

    def __init__(self, path: PathLike):
        self.path = Path(run_dir_of(path))

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        """The run dir's folder name."""
        return self.path.name

    @property
    def short_name(self) -> str:
        """The folder name, with its parent's in front when it is a time stamp or a number
        (train.py's default `runs/<name>/<date_time>`, a SLURM job id, a multirun job number):
        `cpu_result_moeut/2026-11-30_05-49-25`."""
        if not _OPAQUE_LEAF.fullmatch(self.path.name):
            return self.path.name
        return f"{self.path.parent.name}/{self.path.name}"

    def label(self) -> str:
        """The name tables show for the run: the folder name when it says something (a sweep
        job's `experiment=...,optim.lr=...`); when it is a time stamp or a number, `short_name` and
        the job's command-line overrides:
        `cpu_result_moeut/2026-11-30_05-49-25 (optim.lr=1e-3 train.seed=1)`. (Figure legends of
        several runs show only what differs between them: moeut.analysis.curves.legend_labels.)"""
        if not _OPAQUE_LEAF.fullmatch(self.path.name):
            return self.path.name
        overrides = " ".join(self.overrides())
        return self.short_name + (f" ({overrides})" if overrides else "")

    @property
    def metrics_path(self) -> Path:
        """<run>/metrics.jsonl (may not exist)."""
        return self.path / METRICS_FILE

    @property
    def rewound_metrics_path(self) -> Path:
        """<run>/metrics.rewound.jsonl: records a resume moved aside; not part of the history."""
        return self.path / REWOUND_METRICS_FILE

    @property
    def eval_dir(self) -> Path:
        """<run>/eval, where moeut.evaluate writes its results."""
        return self.path / EVAL_DIR

    @property
    def hydra_dir(self) -> Path:
        """<run>/.hydra."""
        return self.path / HYDRA_DIR

    @property
    def checkpoints_dir(self) -> Path:
        """<run>/checkpoints."""
        return self.path / CHECKPOINTS_DIR

    def has_metrics(self) -> bool:
        """Whether metrics.jsonl exists."""
        return self.metrics_path.is_file()

    def metrics(self) -> List[Dict[str, Any]]:
        """Records of metrics.jsonl in logging order ([] when absent); see `read_jsonl`."""
        return read_jsonl(self.metrics_path).records if self.has_metrics() else []

    def checkpoints(self) -> List[str]:
        """Checkpoint dirs (step_XXXXXXX) of the run, oldest first (moeut.checkpoint.find_checkpoints)."""
        from .checkpoint import find_checkpoints
        return find_checkpoints(self.path)

    # --- saved config -------------------------------------------------------------------

    def overrides(self) -> List[str]:
        """The job's command-line overrides (.hydra/overrides.yaml); [] when absent."""
        p = self.hydra_dir / HYDRA_OVERRIDES_FILE
        data = read_yaml(p) if p.is_file() else None
        return [str(x) for x in data] if isinstance(data, list) else []

    def hydra_choices(self) -> Dict[str, Any]:
        """Config-group choices of the job (.hydra/hydra.yaml -> hydra.runtime.choices); {} when absent."""
        p = self.hydra_dir / HYDRA_STATE_FILE
        node = read_yaml(p) if p.is_file() else None
        for key in ("hydra", "runtime", "choices"):
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def config_path(self, checkpoint: Optional[PathLike] = None) -> Optional[Path]:
        """The training config to trust: `<checkpoint>/config.yaml` (resolved, written with that
        checkpoint) when a checkpoint dir is given and has one, else `.hydra/config.yaml`; None
        when neither exists."""
        cands = [Path(checkpoint) / CHECKPOINT_CONFIG_FILE] if checkpoint is not None else []
        cands.append(self.hydra_dir / HYDRA_CONFIG_FILE)
        return next((p for p in cands if p.is_file()), None)

    def config(self, checkpoint: Optional[PathLike] = None) -> Optional[Dict[str, Any]]:
        """The training config (see `config_path`) as a dict; None when absent or not a mapping.
        Raises CorruptRunFile for a file that does not parse."""
        p = self.config_path(checkpoint)
        data = read_yaml(p) if p is not None else None
        return data if isinstance(data, dict) else None

    # --- evaluation results -------------------------------------------------------------

    def eval_files(self, pattern: str = "*.json") -> List[Tuple[Path, Any]]:
        """(path, parsed JSON) of every eval/ file matching `pattern`, sorted by name; [] when
        eval/ is absent. Raises CorruptRunFile for a file that does not parse."""
        if not self.eval_dir.is_dir():
            return []
        return [(p, read_json(p)) for p in sorted(self.eval_dir.glob(pattern)) if p.is_file()]

    def latest_eval(self, files: Optional[List[Tuple[Path, Any]]] = None) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """The run's evaluation by the module's rule, or None: (the newest results file of the
        largest evaluated "step", the `merge_evals` of every moeut.evaluate file of that step).
        `files`: the output of `eval_files()` when the caller has read them already."""
        ours = [(d.get("step") if isinstance(d.get("step"), int) else -1, p, d)
                for p, d in (self.eval_files() if files is None else files) if is_moeut_eval(d)]
        if not ours:
            return None
        step = max(t[0] for t in ours)
        at_step = [(p, d) for s, p, d in ours if s == step]
        merged = merge_evals(at_step)
        return self.eval_dir / merged["evaluations"][-1], merged

    def val_ppl_curve(self, key: Optional[str] = None) -> Tuple[Optional[str], List[Tuple[int, float]]]:
        """The run's validation-perplexity key and curve from metrics.jsonl (`val_ppl_curve`)."""
        return val_ppl_curve(self.metrics(), key)

    def dataset(self, checkpoint: Optional[PathLike] = None) -> Optional[str]:
        """The training corpus (`corpus_name` of the config's `data`, see `config`); None when unknown."""
        return corpus_name((self.config(checkpoint) or {}).get("data"))

    def seq_len(self, checkpoint: Optional[PathLike] = None) -> Optional[int]:
        """The training context length (the config's data.seq_len, see `config`); None when unknown."""
        data = (self.config(checkpoint) or {}).get("data")
        v = data.get("seq_len") if isinstance(data, dict) else None
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 1 else None

    def commit(self) -> str:
        """The commit(s) of the run's starts from provenance.jsonl (moeut.provenance.commit_label:
        "1a2b3c4", "1a2b3c4-dirty", ...); "" when the run dir has no provenance."""
        path = self.path / PROVENANCE_FILE
        return commit_label(list(read_jsonl(path).records)) if path.exists() else ""

    def step_time(self) -> Optional[float]:
        """Measured step time in seconds from step_time.json ({"step_time_s": s}); None when the
        file is absent. Raises CorruptRunFile (unparsable) or ValueError (no positive number)."""
        p = self.path / STEP_TIME_FILE
        if not p.is_file():
            return None
        data = read_json(p)
        v = data.get("step_time_s") if isinstance(data, dict) else None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or v == float("inf"):
            raise ValueError(f"{p}: needs a positive number under 'step_time_s'")
        return float(v)

    # --- checkpoints --------------------------------------------------------------------

    def model_config(self, option: str = "run") -> Optional[Tuple[str, Dict[str, Any]]]:
        """(checkpoint dir, its model_config.json as a dict) of the newest checkpoint whose
        model_config.json reads, or of the run dir itself when it is a bare checkpoint dir (a
        model_config.json beside model.pt); None when the run has neither.

        Checkpoint policy (moeut.checkpoint.open_checkpoint): an unreadable model_config.json of
        a run's checkpoint is skipped with a warning naming the file. Raises FileNotFoundError
        when no checkpoint's config is readable (`option` names the setting in the message) and
        CheckpointError for an unreadable config of a bare checkpoint dir."""
        from .checkpoint import open_checkpoint, read_checkpoint_file

        def read(ckpt: str) -> Tuple[str, Dict[str, Any]]:
            return ckpt, read_checkpoint_file(os.path.join(ckpt, "model_config.json"))

        if self.checkpoints():
            return open_checkpoint(str(self.path), read, option=option)
        if (self.path / "model_config.json").is_file():
            return read(str(self.path))
        return None
