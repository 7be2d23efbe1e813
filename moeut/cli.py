"""Shared plumbing of the Hydra command-line tools (issue 16, item 5: one config style).

Every command-line tool of the package is a Hydra app over a file of the conf/ directory
(`CONF_DIR`, from moeut.paths: the clone's, or the copy an installed wheel carries):
`@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="<tool>")`, with a
`run(cfg)` that does the work (callable from tests with `compose("<tool>", [...])`), no Hydra
output folder or log file (`hydra.output_subdir: null`, `hydra.run.dir: .`,
`hydra/job_logging: stdout`) and a `hydra.help.template` listing every option, so `--help` says
what the tool does. Tools: train.py (moeut.train), moeut.evaluate, moeut.prepare_data, moeut.analyze,
moeut.sweep, moeut.hf.export, moeut.kernels.footprint, moeut.kernels.warmup (the `python -m
moeut.analysis` subcommands use `typed_tool`, below). The exception is
moeut.eval.harness_cli, which hands its argv to lm-eval's own command line (see its docstring).

The helpers here turn a composed config into plain values and check them, with errors that name
the option (`batch: expected an integer >= 1, got 'x'`), and `bad_input_exits` / `exit_bad_input`
turn such an error (raised while composing, validating and checking inputs, before any work) into
one line `<tool>: error: <message>` and exit status 1, as every tool reports bad input; a crash
during the work itself keeps its traceback. `setup_tool_output(<tool>)`, called at every tool's
entry point, makes warnings one line `<tool>: warning: <message>` and keeps third-party progress
bars out of log files. No torch import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, NoReturn, Optional, Sequence, Tuple, Type

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
        """Strip the newline of the warning text in `record.args` (always keeps the record)."""
        if isinstance(record.args, tuple) and record.args and isinstance(record.args[0], str):
            record.args = (record.args[0].rstrip("\n"),) + record.args[1:]
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


def tool_options(cfg: Any, config_name: str, required: Sequence[str] = ()) -> Dict[str, Any]:
    """The options of a composed tool config as a plain dict (interpolations resolved, `hydra`
    dropped).

    `cfg` is the DictConfig a `@hydra.main` function receives (or `compose(config_name)`); the
    known options are the keys of conf/<config_name>.yaml. Raises ValueError naming the option for
    a key the file does not have (`+typo=1` gets past Hydra's struct check) and for a `required`
    option left at `???` (or null), with how to pass it."""
    from omegaconf import OmegaConf

    known = set(_file_keys(config_name))
    for key in required:
        if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg[key] is None:
            raise ValueError(f"{key}: required: pass {key}=<value> (python -m ... --help lists the options)")
    opts = OmegaConf.to_container(cfg, resolve=True)
    opts.pop("hydra", None)
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} (conf/{config_name}.yaml); known: {sorted(known)}")
    return opts


def _file_keys(config_name: str) -> List[str]:
    """Top-level keys of conf/<config_name>.yaml, less `defaults` and `hydra`."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(Path(CONF_DIR) / f"{config_name}.yaml")
    return [k for k in raw.keys() if k not in ("defaults", "hydra")]


def int_option(opts: Dict[str, Any], key: str, lo: Optional[int] = 1) -> Optional[int]:
    """`opts[key]` as an int >= `lo` (None stays None). A whole-number string ("64") is accepted,
    as the old key=value parsers did. Raises ValueError `key: expected an integer >= lo, got v`."""
    v = opts.get(key)
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = int(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        bound = f" >= {lo}" if lo is not None else ""
        raise ValueError(f"{key}: expected an integer{bound}, got {opts.get(key)!r}")
    return v


def bool_option(opts: Dict[str, Any], key: str) -> bool:
    """`opts[key]` as a bool (Hydra parses `key=true` / `key=false`; the strings are accepted too).
    Raises ValueError `key: expected true or false, got v` for anything else."""
    v = opts.get(key)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise ValueError(f"{key}: expected true or false, got {v!r}")


def float_option(opts: Dict[str, Any], key: str, lo: Optional[float] = None, allow_none: bool = False) -> Optional[float]:
    """`opts[key]` as a float >= `lo` (an int or a numeric string is accepted; None only with
    `allow_none`). Raises ValueError `key: expected a number >= lo, got v`."""
    v = opts.get(key)
    if v is None and allow_none:
        return None
    x = None
    if not isinstance(v, bool) and isinstance(v, (int, float, str)):
        try:
            x = float(v)
        except ValueError:
            x = None
    if x is None or x != x or (lo is not None and x < lo):
        bound = f" >= {lo}" if lo is not None else ""
        raise ValueError(f"{key}: expected a number{bound}{' or null' if allow_none else ''}, got {v!r}")
    return x


def str_option(opts: Dict[str, Any], key: str, allow_none: bool = False) -> Optional[str]:
    """`opts[key]` as a string (a number Hydra parsed from `key=5` is turned back into text; None
    only with `allow_none`). Raises ValueError `key: expected a string, got v` for a list, a
    mapping or a boolean."""
    v = opts.get(key)
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"{key}: expected a string{' or null' if allow_none else ''}, got {v!r}")
    return str(v)


def choice_option(opts: Dict[str, Any], key: str, choices: Iterable[str], allow_none: bool = False) -> Optional[str]:
    """`opts[key]` checked against `choices`. Raises ValueError `key: expected one of [...], got v`."""
    v = opts.get(key)
    choices = list(choices)
    if v is None and allow_none:
        return None
    if v not in choices:
        raise ValueError(f"{key}: expected one of {choices}{' or null' if allow_none else ''}, got {v!r}")
    return v


def str_list_option(opts: Dict[str, Any], key: str) -> List[str]:
    """`opts[key]` as a list of strings: a list, or one comma-separated string (`a,b` quoted on the
    command line, the old key=value form). None/empty -> []. Raises ValueError naming `key` for
    other types or non-string items."""
    v = opts.get(key)
    if v is None or v == "":
        return []
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v):
        return list(v)
    raise ValueError(f"{key}: expected a list of names, e.g. {key}=[a,b], got {v!r}")


def path_list_option(value: Any, key: str, required_hint: str) -> List[str]:
    """A list-of-paths option (`key=PATH` or `key=[PATH,...]`) as a list of paths: an entry with
    glob characters (`*`, `?`, `[`) expands to its matches, sorted. Raises ValueError naming `key`
    for a pattern that matches nothing, or when the list is empty (the message then ends with
    `required_hint`)."""
    import glob
    items = [value] if isinstance(value, str) else list(value or [])
    out: List[str] = []
    for item in map(str, items):
        if glob.has_magic(item):
            hits = sorted(glob.glob(item))
            if not hits:
                raise ValueError(f"{key}: pattern {item!r} matches nothing")
            out += hits
        else:
            out.append(item)
    if not out:
        raise ValueError(f"{key}: required: {required_hint}")
    return out


def compose(config_name: str, overrides: Sequence[str] = ()) -> Any:
    """Compose conf/<config_name>.yaml with command-line style `overrides`, as the tool's
    `@hydra.main` would (for tests and scripts: `moeut.sweep.run(compose("sweep", [...]))`).
    Returns the DictConfig (with its `hydra` node removed). Hydra's errors (unknown key, bad
    override syntax) propagate."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


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


def _type_label(tp: Any) -> str:
    """INT / FLOAT / BOOL / STR / PATH-like label of a field's annotation (Optional stripped)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_label(args[0]) if len(args) == 1 else "VALUE"
    if origin in (list, List, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return f"[{_type_label(item)},...]"
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
        rows.append((name, _type_label(tp), _default_text(f), text))
    return rows


def help_text(app: str, summary: str, schema: type, usage: str, notes: str = "") -> str:
    """The `--help` text of a tool, generated from its schema: the summary, usage, one entry per
    option (name=TYPE, default or `(required)`, help, choices/range), `notes`, and the exit status."""
    rows = schema_options(schema)
    width = max((len(f"{n}={t}") for n, t, _, _ in rows), default=0)
    lines = [summary.strip(), "", f"Usage: {usage}", "", "Options:"]
    for name, label, default, text in rows:
        head = f"  {f'{name}={label}'.ljust(width)}  "
        when = "(required) " if default is None else ""
        tail = "" if default in (None, "") else f" [default: {default}]"
        lines.append(f"{head}{when}{text}{tail}")
    if notes.strip():
        lines += ["", notes.strip()]
    lines += ["", "Exit status: 0 done; 1 bad input (one line naming the option, file or line).",
              f"Hydra's own flags: --hydra-help, --cfg job. ({app})"]
    return "\n".join(lines)


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
            from hydra.core.config_store import ConfigStore
            from omegaconf import OmegaConf

            setup_tool_output(app)
            name = app.replace(" ", "_").replace(".", "_")
            cs = ConfigStore.instance()
            cs.store(name=f"{name}_schema", node=schema)
            cs.store(group="hydra/help", name=name,
                     node={"app_name": app, "header": "", "footer": "",
                           "template": help_text(app, summary, schema, usage, notes).replace("${", "\\${")})
            cs.store(name=name, node={
                "defaults": [f"{name}_schema", "_self_", {"override hydra/job_logging": "stdout"},
                             {"override hydra/help": name}],
                "hydra": {"output_subdir": None, "run": {"dir": "."}, "job": {"chdir": False}}})
            result: Dict[str, Any] = {}

            @one_line_hydra_errors(app)
            @hydra.main(version_base="1.3", config_path=None, config_name=name)
            def _hydra_main(cfg: Any) -> None:
                with bad_input_exits(app):
                    missing = _missing_options(cfg, schema)
                    if missing:
                        raise ValueError(f"{missing[0]}: required: pass {missing[0]}=<value> ({app} --help lists the options)")
                    opts = OmegaConf.to_object(cfg)
                    check_options(opts)
                result["value"] = work(opts)

            _hydra_main()
            return result.get("value")
        main.__doc__ = f"`{usage}`: {summary.strip().splitlines()[0]}"
        return main
    return decorate
