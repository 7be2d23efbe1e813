"""The typed options of the converted tools (moeut.evaluate, moeut.sweep, moeut.hf.export,
moeut.prepare_data, train.py), in process: `moeut.cli.typed_options` parses `key=value` as the
command line does, refuses what the command line refuses naming the option, and the generated
help of the training command lists every schema field, config-group option and preset. The
reference lists are walked from the dataclasses, conf/ and the registry here, not taken from the
help generator."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import torch

from moeut.cli import check_device, help_text, typed_options

REPO = Path(__file__).resolve().parents[3]


def _dotted_fields(schema, prefix=""):
    """Every leaf option of a dataclass schema as a dotted name (independent of moeut.cli)."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(tp):
            out += _dotted_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _schemas():
    from moeut.evaluate import EvaluateOptions
    from moeut.hf.export import HFExportOptions
    from moeut.sweep import SweepOptions
    return {"moeut.evaluate": EvaluateOptions, "moeut.sweep": SweepOptions, "moeut.hf.export": HFExportOptions}


@pytest.mark.parametrize("app", ["moeut.evaluate", "moeut.sweep", "moeut.hf.export"])
def test_generated_help_lists_every_field_once(app):
    schema = _schemas()[app]
    text = help_text(app, "S.", schema, "u")
    starts = [ln.split("=", 1)[0].strip() for ln in text.splitlines() if ln.startswith("  ") and "=" in ln]
    assert sorted(starts) == sorted(_dotted_fields(schema))


def test_evaluate_options_parse_as_the_command_line():
    from moeut.evaluate import EvaluateOptions
    o = typed_options(EvaluateOptions, ["checkpoint=runs/x", "tasks=[piqa,lambada]", "limit=5",
                                        "paths.cbt=/data/CBT", "normalize_by_task.cbt=false",
                                        "perplexity.context_length=32", "dtype=bf16", "device=cuda:1"])
    assert (o.checkpoint, o.tasks, o.limit, o.dtype, o.device) == ("runs/x", ["piqa", "lambada"], 5, "bf16", "cuda:1")
    assert o.paths == {"cbt": "/data/CBT"} and o.normalize_by_task == {"cbt": False}  # mapping keys need no '+'
    assert o.perplexity.context_length == 32 and o.perplexity.split == "test"
    # the defaults are the documented ones (docs/evaluation.md)
    d = typed_options(EvaluateOptions, ["checkpoint=c"])
    assert d.tasks == ["lambada", "blimp", "cbt", "hellaswag", "piqa", "arc_easy", "arc_challenge"]
    assert (d.limit, d.source, d.device, d.dtype, d.batch_size, d.pad_multiple) == (None, "local", "auto", "auto", 16, 1)


@pytest.mark.parametrize("overrides, message", [
    (["tasks=[piqa]"], "checkpoint: required: pass checkpoint=<value> (tool --help lists the options)"),
    (["checkpoint=c", "dtype=float32"], "dtype: must be one of auto | fp32 | bf16 | fp16, got 'float32'"),
    (["checkpoint=c", "dtype=bfloat16"], "dtype: must be one of auto | fp32 | bf16 | fp16, got 'bfloat16'"),
    (["checkpoint=c", "source=web"], "source: must be one of local | hf | auto, got 'web'"),
    (["checkpoint=c", "limit=0"], "limit: must be >= 1, got 0"),
    (["checkpoint=c", "perplexity.stride=0"], "perplexity.stride: must be >= 1, got 0"),
    (["checkpoint=c", "limitt=3"], "limitt: no such option (--help lists the options)"),
    (["checkpoint=c", "+limitt=3"], "limitt: no such option (a '+' override adds a key that nothing reads; "
                                    "tool --help lists the options)"),
    (["checkpoint=c", "+perplexity.paht=x"], "perplexity.paht: no such option (a '+' override adds a key that "
                                             "nothing reads; tool --help lists the options)"),
])
def test_evaluate_bad_options_name_the_option(overrides, message):
    from moeut.evaluate import EvaluateOptions
    with pytest.raises(ValueError) as e:
        typed_options(EvaluateOptions, overrides)
    assert str(e.value) == message


def test_evaluate_device_spelling_is_checked_before_any_work(tmp_path):
    from moeut.evaluate import EvaluateOptions, run
    with pytest.raises(ValueError, match=r"^device: must be auto \| cpu \| cuda \| cuda:N, got 'gpu'$"):
        run(typed_options(EvaluateOptions, [f"checkpoint={tmp_path}", "device=gpu"]))


@pytest.mark.parametrize("value, ok", [("auto", True), ("cpu", True), ("cuda", True), ("cuda:0", True),
                                       ("cuda:12", True), ("gpu", False), ("cuda:", False), ("cuda:x", False),
                                       ("CPU", False), ("mps", False), (None, False), (0, False)])
def test_check_device(value, ok):
    if ok:
        assert check_device(value, "device") == value
    else:
        with pytest.raises(ValueError, match=r"^device: must be auto \| cpu \| cuda \| cuda:N, got "):
            check_device(value, "device")


@pytest.mark.parametrize("spelling", ["float32", "bfloat16", "float16", "none", "fp8"])
def test_scoring_precision_has_one_spelling(spelling):
    from moeut.eval.scoring import resolve_autocast_dtype
    with pytest.raises(ValueError, match=rf"^dtype: must be one of auto \| fp32 \| bf16 \| fp16, got '{spelling}'$"):
        resolve_autocast_dtype(spelling, torch.device("cpu"))
    cpu = torch.device("cpu")
    assert [resolve_autocast_dtype(d, cpu) for d in ("auto", "fp32", "bf16", "fp16")] == \
        [None, None, torch.bfloat16, torch.float16]


def test_sweep_and_export_options():
    from moeut.hf.export import HFExportOptions
    from moeut.sweep import SweepOptions
    s = typed_options(SweepOptions, ["action=dry-run", "sweep=g", 'set=["train.steps=3","hydra.launcher.qos=x"]'])
    assert (s.action, s.sweep, s.set, s.local) == ("dry-run", "g", ["train.steps=3", "hydra.launcher.qos=x"], False)
    for overrides, message in (
            (["action=go"], "action: must be one of list | dry-run | launch, got 'go'"),
            (["+sweep_dir=x"], "sweep_dir: no such option (a '+' override adds a key that nothing reads; "
                               "tool --help lists the options)")):
        with pytest.raises(ValueError) as e:
            typed_options(SweepOptions, overrides)
        assert str(e.value) == message
    with pytest.raises(ValueError) as e:
        typed_options(HFExportOptions, ["checkpoint=c", "out=o", "dtype=bfloat16"])
    assert str(e.value) == "dtype: must be one of null | fp32 | bf16 | fp16, got 'bfloat16'"
    assert typed_options(HFExportOptions, ["checkpoint=c", "out=o"]).dtype is None


def test_train_precision_and_device_spellings():
    from hydra import compose, initialize_config_dir
    from moeut.train_lib.config import to_typed
    for override, message in (("train.device=gpu", "train.device: must be auto | cpu | cuda | cuda:N, got 'gpu'"),
                               ("train.precision=bfloat16",
                                "train.precision: 'bfloat16' is not one of auto, fp32, bf16, fp16")):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["experiment=cpu_tiny", "name=t", override])
        with pytest.raises(ValueError) as e:
            to_typed(cfg)
        assert str(e.value) == message


def test_train_help_lists_every_option_group_and_preset():
    """train.py's generated --help: every leaf field of the training schemas and every model field
    (one line each), every file of each config group in conf/, every registered preset."""
    from moeut.registry import PRESETS
    from moeut.train_lib.config import ModelSchema, TrainConfigSchema, train_help
    text = train_help("train.py")
    option_lines = {ln.split("=", 1)[0].strip() for ln in text.splitlines() if ln.startswith("  ") and "=" in ln}
    expected = {n for n in _dotted_fields(TrainConfigSchema) if n != "model"} | {"model.preset"}
    assert expected - option_lines == set()
    words = set(text.replace(",", " ").split())
    for group in ("experiment", "data", "optim", "train", "logger"):
        files = {p.stem for p in (REPO / "conf" / group).glob("*.yaml") if not p.stem.startswith("base_")}
        assert files and files - words == set(), group
    assert set(PRESETS) - words == set()  # the `model` group: the registry's presets (no files)
    model_fields = {f"model.{f.name}" for f in dataclasses.fields(ModelSchema)} - {"model.preset", "model.overrides"}
    assert model_fields - option_lines == set()  # each with its meaning (test_cli_help.py)
    assert "$CONFIG" not in text  # no Hydra config dump standing in for the listing


def test_prepare_data_help_adds_the_prepare_options():
    from moeut.prepare_data import PrepareOptions
    from moeut.train_lib.config import train_help
    text = train_help("moeut.prepare_data", extra=PrepareOptions, extra_prefix="prepare.", multirun=False)
    for name in _dotted_fields(PrepareOptions):
        assert any(ln.startswith(f"  prepare.{name}=") for ln in text.splitlines()), name
    assert "-m (multirun)" not in text and "-m (multirun)" in train_help("train.py")


def test_harness_cli_device_spelling():
    """moeut.eval.harness_cli: `--device auto` becomes the device that exists (as no --device does);
    any other spelling than auto | cpu | cuda | cuda:N is refused naming --device."""
    from moeut.eval.harness_cli import check_device as harness_check, with_default_device
    base = ["run", "--model", "moeut", "--model_args", "checkpoint=x"]
    assert with_default_device(base + ["--device", "auto"], cuda_available=False) == base + ["--device", "cpu"]
    assert with_default_device(base + ["--device=auto"], cuda_available=True) == base + ["--device", "cuda"]
    assert with_default_device(base + ["--device", "cpu"], cuda_available=True) == base + ["--device", "cpu"]
    harness_check(base + ["--device", "cpu"], cuda_available=False)
    harness_check(base + ["--device", "cuda:1"], cuda_available=True)
    for bad in (["--device", "mps"], ["--device=gpu"]):
        with pytest.raises(ValueError, match=r"^--device: must be auto \| cpu \| cuda \| cuda:N, got "):
            harness_check(base + bad, cuda_available=True)
    with pytest.raises(ValueError, match=r"^--device: must be auto \| cpu \| cuda \| cuda:N, got 'xla'$"):
        harness_check(["run", "--model_args", "checkpoint=x,device=xla"], cuda_available=True)
