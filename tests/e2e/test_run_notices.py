"""What a training run says once at its start: a validation sample shorter than data.valid_tokens
whose tail also misses a window is one warning (both numbers in it), the training stream is one
warning (its window tail and the sampler's remainder), and a collapse alarm switched off by
train.alarm.enabled=false is one train.log line naming the option."""
import warnings

import pytest

from test_train import run

SEQ, VALID_TOKENS = 32, 100_000  # the C4 sample (the cpu_tiny validation set) holds fewer tokens


@pytest.fixture(scope="module")
def started(cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")  # a repeated warning would be shown, not deduplicated
        res = run(cache_dir, run_dir, "train.steps=4", "train.stop_at=1", f"data.valid_tokens={VALID_TOKENS}",
                  "train.alarm.enabled=false", "train.final_eval=false", "train.val_interval=1000")
    return run_dir, [str(x.message) for x in w], res


def _stream(message: str) -> str:
    return message.split(": ", 1)[0]


def test_each_stream_is_warned_about_once(started):
    _, msgs, res = started
    data = [m for m in msgs if "/tokens/" in _stream(m)]  # warnings about a token stream of the cache
    streams = [_stream(m) for m in data]
    assert len(streams) == len(set(streams)), data
    (valid,) = [m for m in data if "-validation-" in _stream(m)]
    assert f"fewer than the {VALID_TOKENS + 1:,} asked for (data.valid_tokens, validation set 'val'); using all of them" in valid
    n = int(valid.split(" holds ")[1].split(" tokens")[0].replace(",", ""))
    tail = (n - 1) % SEQ
    assert (f"; the last {tail} of {n - 1:,} tokens (the whole stream) do not fill a window of data.seq_len={SEQ}"
            in valid) == (tail > 0), valid
    assert not any("do not fill a window" in m or "never sampled" in m for m in msgs if m not in data), msgs


def test_switched_off_alarm_is_one_line_naming_the_option(started):
    run_dir, _, _ = started
    log = (run_dir / "train.log").read_text()
    lines = [ln for ln in log.splitlines() if "[alarm]" in ln]
    assert len(lines) == 1 and "train.alarm.enabled=false: the collapse alarm is off" in lines[0], lines


def test_an_alarm_that_is_on_says_nothing(cache_dir, tmp_path):
    run(cache_dir, tmp_path, "train.steps=4", "train.stop_at=1", "train.final_eval=false", "train.val_interval=1000")
    assert "[alarm]" not in (tmp_path / "train.log").read_text()
