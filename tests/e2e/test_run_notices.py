"""What a training run says once at its start: a validation sample shorter than data.valid_tokens
whose tail also misses a window is one warning (both numbers in it), the training stream is one
warning (its window tail and the sampler's remainder), and each safeguard that is on by default and
switched off (train.alarm.enabled=false, optim.grad_clip=null, train.final_eval=false) is one
train.log line naming the option, and so are the routing-stability options a run sets (off by
default); a run that switches none off and sets none has none of these lines."""
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
                  "train.alarm.enabled=false", "optim.grad_clip=null", "train.final_eval=false",
                  "train.val_interval=1000", "model.router_zloss=1e-3", "optim.groups.router.warmup=3")
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


OFF = ["[alarm] train.alarm.enabled=false: the collapse alarm is off",
       "[optim] optim.grad_clip=null: gradient clipping is off",
       "[train] train.final_eval=false: no validation at the end of training (only every train.val_interval=1000 steps)",
       "[train] routing-stability options: optim.groups.router.warmup=3, model.router_zloss=0.001 "
       "(docs/training.md \"Routing stability\")"]


def test_switched_off_safeguards_are_one_line_each_naming_the_option(started):
    run_dir, _, _ = started
    log = (run_dir / "train.log").read_text().splitlines()
    for text in OFF:
        assert sum(text in ln for ln in log) == 1, (text, log)
    assert sum("[alarm]" in ln for ln in log) == 1


def test_a_run_that_switches_nothing_off_says_nothing(cache_dir, tmp_path):
    run(cache_dir, tmp_path, "train.steps=2", "train.val_interval=1000")  # with the final validation
    log = (tmp_path / "train.log").read_text()
    assert not any(text.split(":")[0] in log for text in OFF), log
