"""Range checks for numeric config options, generated from the dataclass schemas.

A numeric field declares its range in its own metadata, next to its default:

    batch_size: int = field(default=64, metadata=at_least(1))
    dropout: float = field(default=0.0, metadata=in_range(0, 1, hi_open=True))
    betas: List[float] = field(default_factory=..., metadata=in_range(0, 1, hi_open=True))  # each item

`check_ranges(obj, "train")` walks a dataclass instance (nested dataclasses too) and raises
ValueError naming the option's dotted path (`train.batch_size: must be >= 1, got 0`). `None`
passes (Optional options mean "default/off"). `numeric_fields(cls)` lists every numeric option
of a schema, so a test can require that each one declares a range (tests/unit/train/test_train_setup.py).
No Hydra, no torch: usable by every entry point (train, evaluate, analysis, sweep).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

RANGE_KEY = "range"


@dataclass(frozen=True)
class Range:
    """A numeric interval: bounds lo/hi (None = unbounded on that side), each closed unless
    lo_open/hi_open. Stored in a dataclass field's metadata under RANGE_KEY."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False  # lo itself is out of range
    hi_open: bool = False

    def contains(self, v: float) -> bool:
        """True if `v` lies in the interval; NaN never does."""
        if isinstance(v, float) and math.isnan(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def describe(self) -> str:
        """The interval as used in error messages: "in [0, 1)", ">= 1", "> 0", "<= 5" or "any number"."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "any number"

    def outside(self) -> List[float]:
        """Values just outside the range (for tests): below lo / above hi."""
        out = []
        if self.lo is not None:
            out.append(self.lo if self.lo_open else self.lo - 1)
        if self.hi is not None:
            out.append(self.hi if self.hi_open else self.hi + 1)
        return out


def in_range(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
             hi_open: bool = False) -> Dict[str, Range]:
    """Field metadata declaring the allowed range (closed unless *_open)."""
    return {RANGE_KEY: Range(lo, hi, lo_open, hi_open)}


def at_least(lo: float) -> Dict[str, Range]:
    """Field metadata: the value must be >= lo."""
    return in_range(lo)


def positive() -> Dict[str, Range]:
    """Field metadata: the value must be > 0."""
    return in_range(0, lo_open=True)


def field_range(f: dataclasses.Field) -> Optional[Range]:
    """The Range declared in a dataclass field's metadata, or None when it declares none."""
    return f.metadata.get(RANGE_KEY) if f.metadata else None


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _numeric_kind(tp: Any) -> Optional[str]:
    """'scalar' for int/float, 'items' for a list of them, else None."""
    tp = _strip_optional(tp)
    if tp in (int, float):
        return "scalar"
    if typing.get_origin(tp) in (list, List, tuple, Tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if args and all(_strip_optional(a) in (int, float) for a in args):
            return "items"
    return None


def _hints(cls: type) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward reference: fall back to the raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def numeric_fields(cls: type, prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field, str]]:
    """(dotted name, field, 'scalar' | 'items') for every numeric option of schema `cls`,
    descending into nested dataclass fields."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = _strip_optional(hints.get(f.name, f.type))
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, name)
            continue
        kind = _numeric_kind(tp)
        if kind:
            yield name, f, kind


def check_value(name: str, value: Any, rng: Range) -> None:
    """Raise ValueError `name: must be ..., got value` when a number is out of `rng`."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not rng.contains(value):
        raise ValueError(f"{name}: must be {rng.describe()}, got {value!r}")


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Check every numeric field of dataclass instance `obj` against its declared range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, name)
            continue
        rng = field_range(f)
        if rng is None or value is None:
            continue
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                check_value(f"{name}[{i}]", v, rng)
        else:
            check_value(name, value, rng)


def check_mapping(values: Dict[str, Any], ranges: Dict[str, Range], prefix: str = "") -> None:
    """The same check for a plain mapping of options (configs without a dataclass schema)."""
    for key, rng in ranges.items():
        v = values.get(key)
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                check_value(f"{name}[{i}]", x, rng)
        else:
            check_value(name, v, rng)
