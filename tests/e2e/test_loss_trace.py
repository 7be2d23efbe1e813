"""The golden CPU loss trace: the 30-step tiny run (tokenizer training, data pipeline, model,
regulariser, AdamW, schedule, validation) reproduces tests/assets/golden/loss_trace_tiny.txt step by step.
It guards refactors that must not move any number; the tolerance covers float summation order
across thread counts and CPUs (measured: 5e-7 between 1 and 2 threads), far below what any change
to the computation gives."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("make_loss_trace", Path(__file__).resolve().parents[1] / "assets" / "golden" / "make_loss_trace.py")
_trace = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_trace)
TRACE, read_trace, trace_run = _trace.TRACE, _trace.read_trace, _trace.trace_run

ATOL = 2e-5  # nats


@pytest.fixture(scope="module")
def run_and_golden():
    return trace_run(), read_trace(TRACE)


def test_every_step_matches_the_golden_trace(run_and_golden):
    (losses, _), (golden, _) = run_and_golden
    assert len(golden) == 30 and len(losses) == len(golden)
    bad = [(i + 1, a, b) for i, (a, b) in enumerate(zip(losses, golden)) if abs(a - b) > ATOL]
    assert not bad, f"steps whose loss moved (step, now, golden): {bad[:5]}"


def test_validation_loss_matches_the_golden_trace(run_and_golden):
    (_, val), (_, golden_val) = run_and_golden
    assert golden_val is not None and abs(val - golden_val) <= ATOL, (val, golden_val)


def test_the_trace_is_a_learning_curve():
    """The file is what its header says: 30 losses from ln(512) at init, falling by > 1 nat."""
    golden, val = read_trace(TRACE)
    assert abs(golden[0] - 6.238) < 0.2 and golden[-1] < golden[0] - 1.0 and val < golden[0]
