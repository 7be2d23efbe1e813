"""Shared plumbing of the command-line tools (docs/architecture.md, "Command-line tools").

The one tool style (last section): a `@dataclass` schema beside the tool, each field declared with
`option(default, help=..., lo=/hi=/choices=)`, and `main = typed_tool("<command>", Schema,
summary=..., usage=...)(work)`: a Hydra app over the schema (no conf file), `--help` generated
from it, `work` called with the checked schema instance; `typed_options(Schema, ["key=value"])`
gives tests and scripts the same checked instance. Typed tools: moeut.evaluate, moeut.sweep,
moeut.hf.export, moeut.tools.footprint, moeut.tools.warmup and every `python -m moeut.analysis`
subcommand. train.py (moeut.train) and moeut.prepare_data compose conf/config.yaml
(`CONF_DIR`, from moeut.paths: the clone's, or the copy an installed wheel carries) with its
groups; their schemas (moeut/train_lib/config.py) declare their fields with `option` too and their
`--help` is generated from them (train_lib.config.train_help). moeut.eval.harness_cli hands its
argv to lm-eval's own command line (see its docstring). `path_list_option` expands a list-of-paths
option's glob patterns.

Bad input (raised while composing, validating and checking inputs, before any work) is one line
`<tool>: error: <message naming the option, file or line>` and exit status 1 (`bad_input_exits`,
`exit_bad_input`, `one_line_hydra_errors`); a crash during the work itself keeps its traceback.
`setup_tool_output(<tool>)`, called at every tool's entry point, makes warnings one line
`<tool>: warning: <message>` and keeps third-party progress bars out of log files. One spelling
per concept: precision `PRECISIONS` (fp32 | bf16 | fp16, plus `auto` where it means "pick by
device"), device `auto | cpu | cuda | cuda:N` (`check_device`; `check_device_available` also refuses a GPU
the machine lacks). Output paths are checked before any work (`check_out_dir`, `check_out_file`:
`<option>: <path> is a file, not a directory`). No torch import at module level.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple, Type

from .paths import conf_dir

CONF_DIR = str(conf_dir())  # the one definition: moeut/paths.py (a clone's conf/, or the wheel's copy)


# What a tool reports as bad input (one line, exit 1) rather than a crash (traceback): the errors
# of config validation and input checks. The package's named input errors (CorruptRunFile,
# CheckpointError, DataError, TokenCacheError, TaskFormatError) are ValueErrors.
INPUT_ERRORS: Tuple[Type[BaseException], ...] = (ValueError, FileNotFoundError)


def exit_bad_input(tool: str, err: BaseException) -> NoReturn:
    """Print `<tool>: error: <err>` on stderr and exit with status 1 (raises SystemExit(1)); the
    message of every validation error names the option, file or line, so no traceback is shown.
    A named error class of the package (TokenCacheError, CheckpointError, ...) is kept in the
    line (`<tool>: error: TokenCacheError: ...`); plain ValueError / FileNotFoundError are not."""
    kind = type(err).__name__
    named = "" if type(err) in (ValueError, FileNotFoundError) else f"{kind}: "
    print(f"{tool}: error: {named}{err}", file=sys.stderr)
    raise SystemExit(1)


_PACKAGE_DIR = Path(__file__).resolve().parent


def _own_source(filename: str) -> bool:
    """Whether a warning was issued from this project's code: the moeut package, or the
    repository's scripts (train.py, analysis/, tools/, benchmarks/) in a checkout."""
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    root = _PACKAGE_DIR.parent
    if path.is_relative_to(_PACKAGE_DIR):
        return True
    if not (root / "pyproject.toml").is_file():  # an installed package: no scripts beside it
        return False
    return path.parent == root or any(path.is_relative_to(root / d) for d in ("analysis", "tools", "benchmarks"))


def warning_line(tool: str, message: Any, category: Type[Warning], filename: str, lineno: int) -> str:
    """One line for a warning, as the tools print it: `<tool>: warning: <message>` for the
    project's own warnings (a category other than UserWarning is named first, as in error lines:
    `<tool>: warning: TruncatedLineWarning: ...`); another package's warning also names its
    category and source, `<tool>: warning: DeprecationWarning: <message> (<file>:<line>)`."""
    own = _own_source(filename)
    named = "" if own and category is UserWarning else f"{category.__name__}: "
    where = "" if own else f" ({filename}:{lineno})"
    return f"{tool}: warning: {named}{message}{where}\n"


def install_warning_format(tool: str) -> None:
    """Make every warning of this process print as one `warning_line` naming `tool` (sets
    `warnings.formatwarning`, which `logging.captureWarnings` also uses) instead of Python's
    `path.py:123: UserWarning: ...` plus a source line. Called by every tool's entry point
    (`setup_tool_output`, also from `bad_input_exits`); library code never calls it."""
    import logging
    import warnings

    def fmt(message, category, filename, lineno, line=None):
        return warning_line(tool, message, category, filename, lineno)
    warnings.formatwarning = fmt
    captured = logging.getLogger("py.warnings")  # logging.captureWarnings: no blank line after each
    if not any(isinstance(f, _StripNewline) for f in captured.filters):
        captured.addFilter(_StripNewline())


def plain_progress_off_tty() -> None:
    """When stderr is not a terminal (a log file, a pipe), turn off the Hugging Face libraries'
    tqdm bars (transformers, huggingface_hub, datasets), whose `\r` frames would fill the log:
    HF_HUB_DISABLE_PROGRESS_BARS=1 and HF_DATASETS_DISABLE_PROGRESS_BARS=1 unless set, and the
    same switch in transformers / huggingface_hub when already imported. The package's own
    progress is a bar only on a terminal anyway (docs/architecture.md)."""
    if sys.stderr.isatty():
        return
    import os
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        if key in os.environ:
            return  # the user chose
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def setup_tool_output(tool: str) -> None:
    """A tool's console output, set once at its entry point: warnings as one line naming `tool`
    (`install_warning_format`) and no third-party progress-bar frames in a log file
    (`plain_progress_off_tty`)."""
    install_warning_format(tool)
    plain_progress_off_tty()


class _StripNewline:
    """Logging filter: a captured warning's text without its trailing newline."""

    def filter(self, record: Any) -> bool:
        """Strip the newline of the warning text, which Python >= 3.11 passes as `record.msg` and
        older versions as `record.args[0]` (always keeps the record)."""
        if isinstance(record.args, tuple) and record.args and isinstance(record.args[0], str):
            record.args = (record.args[0].rstrip("\n"),) + record.args[1:]
        elif not record.args and isinstance(record.msg, str):
            record.msg = record.msg.rstrip("\n")
        return True


@contextlib.contextmanager
def bad_input_exits(tool: str, errors: Tuple[Type[BaseException], ...] = INPUT_ERRORS) -> Iterator[None]:
    """Context manager for a tool's configuration / input-checking phase: an error of `errors`
    raised inside it ends the tool through `exit_bad_input` (one line, exit 1). Wrap only the
    checks that run before any work, so that a real crash later still shows its traceback.
    Also sets up the tool's console output (`setup_tool_output`: one-line warnings, no progress
    frames in a log file)."""
    setup_tool_output(tool)
    try:
        yield
    except errors as err:
        exit_bad_input(tool, err)


def hydra_error_line(err: BaseException) -> str:
    """One line for an error Hydra or OmegaConf raised while composing a tool's config from its
    command line: an unknown key (`train.stepz=5`) becomes `train.stepz: no such option ...`
    (Hydra's own hint, `+train.stepz=5`, would add a key nothing reads), a value of the wrong type
    `optim.lr: Value 'abc' ... could not be converted to Float`, anything else its message's
    lines (without OmegaConf's full_key / object_type and Hydra's search-path listing) joined."""
    text = str(err)
    m = re.match(r"Could not override '([^']+)'", text)
    if m:
        return f"{m.group(1)}: no such option (--help lists the options)"
    m = re.match(r"Error merging override ([^=\s]+)=", text)
    cause = err.__cause__ or err.__context__
    if m and cause is not None:
        return f"{m.group(1)}: {str(cause).splitlines()[0]}"
    m = re.search(r"no viable alternative at input '(.*?)'", text)
    if m and "=" in m.group(1):  # an unquoted value holding '=' (a run dir like experiment=x,optim.lr=y)
        arg = next((a for a in sys.argv[1:] if m.group(1) in a), "")
        key = arg.split("=", 1)[0] if "=" in arg else "a value"
        return (f"{key}: cannot parse {m.group(1)!r}...: quote every value that holds '=' or ',', e.g. "
                f"\"{key if '=' in arg else 'key'}=['/runs/experiment=x,optim.lr=0.001',/runs/y]\" (Hydra's override grammar)")
    skip = ("full_key:", "object_type=", "reference_type=", "Config search path", "provider=")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    out: List[str] = []
    for ln in lines:  # "Available options in 'experiment':" then one option a line -> a, b, c
        if out and out[-1].endswith(":"):
            out[-1] += " " + ln
        elif out and ":" in out[-1] and out[-1].startswith("Available options"):
            out[-1] += ", " + ln
        else:
            out.append(ln)
    return "; ".join(out) or type(err).__name__


def one_line_hydra_errors(tool: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a tool's `@hydra.main` function (put it above `@hydra.main`): an error Hydra
    finds in the command line or the config before the tool's own code runs (an unknown key, a
    value of the wrong type, an unknown config-group option) is one line `<tool>: error: ...`, exit
    status 1 (`hydra_error_line`), instead of Hydra's multi-line report. Errors raised inside the
    tool's function pass through unchanged (a crash keeps its traceback). Called with a composed
    config (tests), it is the plain function."""
    def decorate(app: Callable[..., Any]) -> Callable[..., Any]:
        task_name = getattr(getattr(app, "__wrapped__", app), "__name__", "main")

        @functools.wraps(app)
        def run(*args: Any, **kwargs: Any) -> Any:
            if args or kwargs:
                return app(*args, **kwargs)
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException
            old = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its report
            try:
                return app()
            except (HydraException, OmegaConfBaseException) as err:
                if raised_in(err, task_name):
                    raise
                exit_bad_input(tool, ValueError(hydra_error_line(err)))
            finally:
                if old is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = old
        return run
    return decorate


def raised_in(err: BaseException, *functions: str) -> bool:
    """Whether the traceback of `err` passes through a function named one of `functions` (e.g. a
    start-up validation function called from inside a larger one)."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in functions:
            return True
        tb = tb.tb_next
    return False



def path_list_option(value: Any, key: str, required_hint: str,
                     keep: Optional[Callable[[str], bool]] = None, kept: str = "") -> List[str]:
    """A list-of-paths option (`key=PATH` or `key=[PATH,...]`) as a list of paths: an entry with
    glob characters (`*`, `?`, `[`) expands to its matches, sorted. With `keep`, a pattern's matches
    that fail it (e.g. the summary files written beside run dirs) are left out with one warning
    naming them and `kept` (what the option takes). Raises ValueError naming `key` for a pattern
    that matches nothing (kept), or when the list is empty (the message then ends with
    `required_hint`)."""
    import glob
    items = [value] if isinstance(value, str) else list(value or [])
    out: List[str] = []
    for item in map(str, items):
        if glob.has_magic(item):
            hits = sorted(glob.glob(item))
            if not hits:
                raise ValueError(f"{key}: pattern {item!r} matches nothing")
            left_out = [h for h in hits if keep is not None and not keep(h)]
            named = ", ".join(left_out[:5]) + (" ..." if len(left_out) > 5 else "")
            if len(left_out) == len(hits):
                raise ValueError(f"{key}: pattern {item!r} matches no {kept}, only {named}")
            if left_out:
                warnings.warn(f"{key}: pattern {item!r} also matches {len(left_out)} path(s) that are not "
                              f"{kept}, left out: {named}")
            out += [h for h in hits if h not in left_out]
        else:
            out.append(item)
    if not out:
        raise ValueError(f"{key}: required: {required_hint}")
    return out



# ------------------------------------------------------------------------------------------
# One typed style for every tool: a dataclass schema beside the tool, each field declared with
# `option(...)` (its help text, choices and range in the field's metadata), `--help` generated
# from the schema, bad input one line and exit status 1. docs/architecture.md, "Tools".
# ------------------------------------------------------------------------------------------

HELP_KEY = "help"
CHOICES_KEY = "choices"
REQUIRED = "???"  # OmegaConf's mandatory-value marker: the default of a required option


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           choices: Optional[Sequence[Any]] = None, lo: Optional[float] = None, hi: Optional[float] = None,
           lo_open: bool = False, hi_open: bool = False) -> Any:
    """A schema field: its default (`REQUIRED` for a required option), one line of `help`, and
    optionally the allowed `choices` or numeric range [lo, hi] (open with lo_open/hi_open; each
    item of a list field is checked). Returns a dataclasses.Field for a tool's @dataclass schema."""
    from .validate import in_range

    meta: Dict[str, Any] = {HELP_KEY: help}
    if choices is not None:
        meta[CHOICES_KEY] = tuple(choices)
    if lo is not None or hi is not None:
        meta.update(in_range(lo, hi, lo_open=lo_open, hi_open=hi_open))
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


# One spelling per concept across the tools: precision and device.
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICE_HELP = "auto (cuda if torch sees a GPU, else cpu) | cpu | cuda | cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(value: Any, name: str = "device") -> str:
    """`value` if it is a device spelt `auto | cpu | cuda | cuda:N`; raises ValueError
    `<name>: must be auto | cpu | cuda | cuda:N, got <value>` otherwise (no torch import)."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise ValueError(f"{name}: must be auto | cpu | cuda | cuda:N, got {value!r}")
    return value


def check_device_available(value: Any, name: str = "device") -> str:
    """`value` (`check_device`'s spelling) if this machine can run on it; raises ValueError
    `<name>: <value> requested but CUDA is not available` for cuda / cuda:N without a GPU, and
    `<name>: cuda:N requested but this machine has K CUDA device(s)` for an index it lacks. The one
    device check of every tool that takes a device, run before any work (imports torch)."""
    check_device(value, name)
    if not value.startswith("cuda"):
        return value
    import torch
    if not torch.cuda.is_available():
        raise ValueError(f"{name}: {value} requested but CUDA is not available")
    if ":" in value and int(value.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"{name}: {value} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return value


def _blocking_file(path: str) -> Optional[str]:
    """The first existing path among `path` and its parents that is not a directory (what makes
    creating `path` as a directory fail), or None."""
    p = Path(os.path.abspath(os.path.expanduser(path)))
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            return None if q.is_dir() else str(q)
    return None


def check_out_dir(path: Any, name: str) -> Any:
    """`path` if it can be an output directory (an existing directory, or creatable: its first
    existing ancestor is a directory); None passes. Raises ValueError `<name>: <path> is a file, not
    a directory` (the blocking path as named: `path` itself or the parent that is a file), so that a
    tool refuses before any work rather than failing when it writes. No writes."""
    if path is None or path == "":
        return path
    blocking = _blocking_file(str(path))
    if blocking is not None:
        shown = str(path) if os.path.abspath(os.path.expanduser(str(path))) == blocking else blocking
        raise ValueError(f"{name}: {shown} is a file, not a directory")
    return path


def check_out_file(path: Any, name: str, prefix: bool = False) -> Any:
    """`path` if a file can be written there: its parent directory exists or can be created
    (`check_out_dir`); a plain output file (`prefix=False`) must not be an existing directory.
    With `prefix=True` `path` is a name prefix (OUT.png, OUT_x.md): only its parent is checked.
    None passes. Raises ValueError naming `name` and the path (`... is a file, not a directory` /
    `... is a directory, not a file`). No writes."""
    if path is None or path == "":
        return path
    full = os.path.abspath(os.path.expanduser(str(path)))
    if not prefix and os.path.isdir(full):
        raise ValueError(f"{name}: {path} is a directory, not a file")
    blocking = _blocking_file(os.path.dirname(full))
    if blocking is not None:
        raise ValueError(f"{name}: {blocking} is a file, not a directory")
    return path


def type_label(tp: Any) -> str:
    """INT / FLOAT / BOOL / STR / PATH-like label of a field's annotation (Optional stripped)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return type_label(args[0]) if len(args) == 1 else "VALUE"
    if origin in (list, List, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return f"[{type_label(item)},...]"
    if origin in (dict, Dict):
        return "{KEY:VALUE}"
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(tp, "VALUE")


def _default_text(f: dataclasses.Field) -> Optional[str]:
    """How a field's default reads in --help (None for a required option)."""
    if f.default is not dataclasses.MISSING:
        if f.default == REQUIRED:
            return None
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
    else:
        return None
    if dataclasses.is_dataclass(v):
        return ""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def schema_options(schema: type, prefix: str = "") -> List[Tuple[str, str, Optional[str], str]]:
    """(dotted name, type label, default text or None if required, help with choices/range) for
    every option of dataclass `schema`, descending into nested dataclass fields. Raises TypeError
    for a field declared without help text (every option must say what it does)."""
    from .validate import field_range

    hints = typing.get_type_hints(schema)
    rows: List[Tuple[str, str, Optional[str], str]] = []
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        tp = hints.get(f.name, f.type)
        inner = tp
        if typing.get_origin(tp) is typing.Union:
            inner = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        if dataclasses.is_dataclass(inner):
            rows += schema_options(inner, f"{name}.")
            continue
        text = f.metadata.get(HELP_KEY) if f.metadata else None
        if not text:
            raise TypeError(f"{schema.__name__}.{f.name}: option without help text (declare it with moeut.cli.option)")
        extra = []
        if f.metadata.get(CHOICES_KEY):
            extra.append("one of " + " | ".join("null" if c is None else str(c) for c in f.metadata[CHOICES_KEY]))
        rng = field_range(f)
        if rng is not None:
            extra.append(rng.describe())
        if extra:
            text = f"{text} ({'; '.join(extra)})"
        rows.append((name, type_label(tp), _default_text(f), text))
    return rows


def format_options(rows: Sequence[Tuple[str, str, Optional[str], str]]) -> List[str]:
    """The `--help` lines of option rows (schema_options): `  name=TYPE  [(required)] help [default: d]`."""
    width = max((len(f"{n}={t}") for n, t, _, _ in rows), default=0)
    lines = []
    for name, label, default, text in rows:
        head = f"  {f'{name}={label}'.ljust(width)}  "
        when = "(required) " if default is None else ""
        tail = "" if default in (None, "") else f" [default: {default}]"
        lines.append(f"{head}{when}{text}{tail}")
    return lines


def help_text(app: str, summary: str, schema: type, usage: str, notes: str = "") -> str:
    """The `--help` text of a tool, generated from its schema: the summary, usage, one entry per
    option (name=TYPE, default or `(required)`, help, choices/range), `notes`, and the exit status."""
    lines = [summary.strip(), "", f"Usage: {usage}", "", "Options:", *format_options(schema_options(schema))]
    if notes.strip():
        lines += ["", notes.strip()]
    lines += ["", EXIT_STATUS_LINE, f"Hydra's own flags: --hydra-help, --cfg job. ({app})"]
    return "\n".join(lines)


EXIT_STATUS_LINE = "Exit status: 0 done; 1 bad input (one line naming the option, file or line)."


def help_node(app: str, text: str) -> Dict[str, Any]:
    """A `hydra/help` config-group node showing `text` verbatim as `app --help` (`$` doubled for
    Hydra's string.Template, `${` escaped for OmegaConf)."""
    return {"app_name": app, "header": "", "footer": "",
            "template": text.replace("$", "$$").replace("$${", "$\\${")}


def check_options(obj: Any, prefix: str = "") -> None:
    """Check every field of schema instance `obj` against its declared range and choices.
    Raises ValueError `<option>: must be ..., got <value>` naming the dotted option."""
    from .validate import check_ranges

    check_ranges(obj, prefix)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_options(value, name)
            continue
        choices = f.metadata.get(CHOICES_KEY) if f.metadata else None
        if choices is None:
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v not in choices:
                shown = " | ".join("null" if c is None else str(c) for c in choices)
                raise ValueError(f"{name}: must be one of {shown}, got {v!r}")


def _missing_options(cfg: Any, schema: type, prefix: str = "") -> List[str]:
    """Dotted names of the required options still at `???` in the composed config."""
    from omegaconf import OmegaConf

    out: List[str] = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints.get(f.name, f.type)
        if typing.get_origin(tp) is typing.Union:
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        if dataclasses.is_dataclass(tp):
            if f.name in cfg and cfg[f.name] is not None:
                out += _missing_options(cfg[f.name], tp, f"{prefix}{f.name}.")
        elif OmegaConf.is_missing(cfg, f.name):
            out.append(f"{prefix}{f.name}")
    return out


def _open_mappings(node: Any, schema: type) -> Any:
    """`node` (the structured config of `schema`) with every dict-typed option open to new keys,
    so `paths.cbt=/data/CBT` sets an entry without Hydra's `+` (the keys of a mapping option are
    the user's, e.g. task names); returns `node`."""
    from omegaconf import OmegaConf

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints.get(f.name, f.type)
        if typing.get_origin(tp) is typing.Union:
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        if typing.get_origin(tp) in (dict, Dict) and node[f.name] is not None:
            OmegaConf.set_struct(node[f.name], False)
        elif dataclasses.is_dataclass(tp) and node[f.name] is not None:
            _open_mappings(node[f.name], tp)
    return node


def _register(app: str, schema: type, summary: str, usage: str, notes: str) -> str:
    """Store `schema` and the tool's generated help in Hydra's ConfigStore under the config name
    of `app` (e.g. `moeut_evaluate`); returns that name. Idempotent."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    name = app.replace(" ", "_").replace(".", "_").replace("/", "_")
    cs = ConfigStore.instance()
    cs.store(name=f"{name}_schema", node=_open_mappings(OmegaConf.structured(schema), schema))
    cs.store(group="hydra/help", name=name, node=help_node(app, help_text(app, summary, schema, usage, notes)))
    cs.store(name=name, node={
        "defaults": [f"{name}_schema", "_self_", {"override hydra/job_logging": "stdout"},
                     {"override hydra/help": name}],
        "hydra": {"output_subdir": None, "run": {"dir": "."}, "job": {"chdir": False}}})
    return name


def _unknown_options(cfg: Any, schema: type, prefix: str = "") -> List[str]:
    """Dotted names of the keys of the composed config that `schema` does not declare (what a
    `+key=value` override added), depth first; mappings typed as dicts take any key."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out: List[str] = []
    for key in cfg.keys():
        if key == "hydra" and not prefix:
            continue
        if key not in fields:
            out.append(f"{prefix}{key}")
            continue
        tp = hints.get(key, fields[key].type)
        if typing.get_origin(tp) is typing.Union:
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        if dataclasses.is_dataclass(tp) and cfg[key] is not None:
            out += _unknown_options(cfg[key], tp, f"{prefix}{key}.")
    return out


def _checked(cfg: Any, schema: type, app: str) -> Any:
    """The schema instance of a composed tool config, its required options present and every
    option within its range and choices. Raises ValueError naming the option."""
    from omegaconf import OmegaConf

    extra = _unknown_options(cfg, schema)
    if extra:  # `+key=value` gets past Hydra's check; nothing would read it
        raise ValueError(f"{extra[0]}: no such option (a '+' override adds a key that nothing reads; "
                         f"{app} --help lists the options)")
    missing = _missing_options(cfg, schema)
    if missing:
        raise ValueError(f"{missing[0]}: required: pass {missing[0]}=<value> ({app} --help lists the options)")
    opts = OmegaConf.to_object(cfg)
    check_options(opts)
    return opts


def typed_options(schema: type, overrides: Sequence[str] = (), app: str = "tool") -> Any:
    """The checked instance of `schema` for command-line `overrides` (`key=value`, parsed as the
    tool's command line parses them): what `typed_tool`'s `main` hands to its work function, for
    tests and scripts (`moeut.evaluate.run(typed_options(EvalOptions, ["checkpoint=..."]))`).
    Raises ValueError naming the option (unknown key, wrong type, required, out of range)."""
    from hydra import compose, initialize
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    name = _register(app, schema, "", app, "")
    GlobalHydra.instance().clear()
    try:
        with initialize(version_base="1.3", config_path=None):
            cfg = compose(config_name=name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(hydra_error_line(err)) from None
    finally:
        GlobalHydra.instance().clear()
    return _checked(cfg, schema, app)


def typed_tool(app: str, schema: type, *, summary: str, usage: str, notes: str = "") -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """Decorate `work(opts)` into a tool's `main()`: a Hydra app whose config is `schema` (no YAML
    file: the schema and its defaults are the config, registered in Hydra's ConfigStore as
    `<app>`), with `--help` generated from the schema (help_text), no output folder or log file,
    Hydra errors and bad input as one line `<app>: error: ...` and exit status 1, and `work`
    called with the checked schema instance. `app` is the command's name as the user types it,
    e.g. `moeut.evaluate` or `moeut.analysis summary`."""
    def decorate(work: Callable[[Any], Any]) -> Callable[[], Any]:
        @functools.wraps(work)
        def main() -> Any:
            import hydra
            import warnings

            previous_format = warnings.formatwarning  # called in-process (a notebook): give it back
            setup_tool_output(app)
            name = _register(app, schema, summary, usage, notes)
            result: Dict[str, Any] = {}

            @one_line_hydra_errors(app)
            @hydra.main(version_base="1.3", config_path=None, config_name=name)
            def _hydra_main(cfg: Any) -> None:
                with bad_input_exits(app):
                    opts = _checked(cfg, schema, app)
                result["value"] = work(opts)

            try:
                _hydra_main()
            finally:
                warnings.formatwarning = previous_format
            return result.get("value")
        main.__doc__ = f"`{usage}`: {summary.strip().splitlines()[0]}"
        return main
    return decorate
