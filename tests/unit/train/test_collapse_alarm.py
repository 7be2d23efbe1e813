"""The collapse alarm (moeut.train_lib.alarm; docs/training.md "Collapse alarm"): its default
thresholds, replayed over the recorded CPU-scale runs of docs/results.md (docs/results_runs/*/
metrics.jsonl), fire on every run whose routing collapsed there and stay silent on every healthy
one; each warning comes once per metric and layer group, also across a resume; a training run
writes the warning to train.log and the event to metrics.jsonl."""
import json
import re
from pathlib import Path

import pytest
import yaml

from moeut.train_lib.alarm import CollapseAlarm
from moeut.train_lib.config import AlarmSchema

REPO = Path(__file__).resolve().parents[3]
RUNS = REPO / "docs" / "results_runs"
# docs/results.md "Why MoEUT stalls at 2e-3": the lr 2e-3 runs of 150 and 610 steps (seeds 0, 1)
# collapsed, lr 4e-3 failed (17 % dead experts); lr 1e-3, the 300-step 2e-3 run (which escaped)
# and the 2e-3 run with warm-up 75 did not; dense models have no routing.
COLLAPSED = {"cpu_result_moeut,train.steps=610", "cpu_result_moeut,train.seed=1",
             "cpu_result_moeut,train.steps=150", "cpu_result_moeut,optim.lr=0.004"}


def _settings(name: str):
    """(optim.warmup, train.steps) of a recorded run: its experiment's values, then its overrides."""
    exp = re.match(r"experiment=([^,]+)", name).group(1)
    conf = yaml.safe_load((REPO / "conf" / "experiment" / f"{exp}.yaml").read_text())
    warmup, steps = conf["optim"]["warmup"], conf["train"]["steps"]
    for key, value in re.findall(r"(optim\.warmup|train\.steps)=(\d+)", name):
        if key == "optim.warmup":
            warmup = int(value)
        else:
            steps = int(value)
    return warmup, steps


def _replay(run_dir: Path, alarm: CollapseAlarm):
    events = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        events += alarm.check(rec["step"], rec)
    return events


def _recorded_runs():
    return sorted(p for p in RUNS.iterdir() if (p / "metrics.jsonl").exists())


def test_the_recorded_runs_cover_both_kinds():
    names = {p.name.split("=", 1)[1] for p in _recorded_runs()}
    assert COLLAPSED <= names
    assert len(names - COLLAPSED) >= 8  # healthy MoEUT and dense runs


@pytest.mark.parametrize("run_dir", _recorded_runs(), ids=lambda p: p.name.split("=", 1)[1])
def test_default_thresholds_fire_on_collapsed_runs_only(run_dir):
    name = run_dir.name.split("=", 1)[1]
    events = _replay(run_dir, CollapseAlarm(AlarmSchema(), *_settings(run_dir.name)))
    if name in COLLAPSED:
        assert any(e.metric == "usage_rel_ppl" for e in events), name
        assert all(e.step <= 100 for e in events if e.metric == "usage_rel_ppl")  # early, as in results.md
    else:
        assert events == [], (name, [e.message() for e in events])


def test_dead_experts_fire_on_the_failed_run_only():
    fired = {p.name: {e.metric for e in _replay(p, CollapseAlarm(AlarmSchema(), *_settings(p.name)))}
             for p in _recorded_runs()}
    assert [n for n, m in fired.items() if "dead_frac" in m] == ["experiment=cpu_result_moeut,optim.lr=0.004"]


def test_hand_computed_events_each_once_and_not_again_after_a_resume():
    cfg = AlarmSchema()
    alarm = CollapseAlarm(cfg, warmup=10, total_steps=100)  # CE window round(0.08 * 100) = 8 steps
    assert alarm.check(10, {"moe/g0/usage_rel_ppl": 0.1, "moe/g0/dead_frac": 0.5}) == []  # in the warm-up
    ev = alarm.check(12, {"moe/g0/usage_rel_ppl": 0.69, "moe/g1/usage_rel_ppl": 0.7, "moe/g1/dead_frac": 0.1})
    assert [(e.metric, e.where, e.value) for e in ev] == [("usage_rel_ppl", "g0", 0.69), ("dead_frac", "g1", 0.1)]
    assert "train.alarm.usage_rel_ppl=0.7" in ev[0].message() and "model.router_zloss=1e-2" in ev[0].message()
    assert "layer group g0" in ev[0].message() and "layer group g1" in ev[1].message()
    assert ev[0].record() == {"alarm/usage_rel_ppl/g0": 0.69}
    assert alarm.check(13, {"moe/g0/usage_rel_ppl": 0.2}) == []  # once per metric and group
    # CE: 5.0 at step 12, 4.9 at step 20 (8 steps later): drop 0.1 < 0.2 -> plateau
    assert alarm.check(12, {"train/ce": 5.0}) == []
    saved = alarm.state_dict()
    ev = alarm.check(20, {"train/ce": 4.9})
    assert [(e.metric, e.where, e.step) for e in ev] == [("ce_plateau", "all", 20)]
    assert ev[0].value == pytest.approx(0.1)
    resumed = CollapseAlarm(cfg, warmup=10, total_steps=100)
    resumed.load_state_dict(json.loads(json.dumps(alarm.state_dict())))
    assert resumed.check(30, {"moe/g0/usage_rel_ppl": 0.2, "train/ce": 4.9}) == []
    again = CollapseAlarm(cfg, warmup=10, total_steps=100)  # from the state before the plateau fired
    again.load_state_dict(saved)
    assert [e.metric for e in again.check(20, {"train/ce": 4.9})] == ["ce_plateau"]
    # a falling CE (drop 0.3 over the window) and a plateau after ce_plateau_until never fire
    late = CollapseAlarm(cfg, warmup=0, total_steps=100)
    assert late.check(0, {"train/ce": 6.0}) + late.check(8, {"train/ce": 5.7}) == []
    assert late.check(30, {"train/ce": 5.7}) == [] and late.check(38, {"train/ce": 5.7}) == []
    off = CollapseAlarm(AlarmSchema(enabled=False), warmup=0, total_steps=100)
    assert off.check(5, {"moe/g0/usage_rel_ppl": 0.0}) == []


def test_a_run_warns_in_train_log_and_metrics_once_across_a_resume(cache_dir, tmp_path):
    from test_train import run
    over = ["train.steps=8", "train.routing_interval=2", "train.routing_every=1", "optim.warmup=0",
            "train.alarm.usage_rel_ppl=1.0", "train.alarm.ce_plateau_until=0", "train.val_interval=100", "train.save_interval=4"]
    run(cache_dir, tmp_path, *over, "train.stop_at=4")
    run(cache_dir, tmp_path, *over)
    log = (tmp_path / "train.log").read_text()
    lines = [ln for ln in log.splitlines() if "[alarm] WARNING" in ln]
    groups = sorted(re.search(r"layer group (g\d+)", ln).group(1) for ln in lines)
    assert groups and groups == sorted(set(groups)), lines  # one warning per layer group, not repeated
    assert all("train.alarm.usage_rel_ppl=1" in ln for ln in lines)
    assert all(" WARNING " in ln.split("[alarm]")[0] for ln in lines), lines  # logged at level WARNING
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [(r["step"], k) for r in recs for k in r if k.startswith("alarm/")]
    assert sorted(k for _, k in events) == sorted(f"alarm/usage_rel_ppl/{g}" for g in groups)
    assert all(s == 2 for s, _ in events)  # the first routing record after the warm-up


def test_advice_leaves_out_the_options_the_run_already_sets():
    """The warning names only options the run does not use yet, and says which it already sets."""
    from moeut.train_lib.alarm import suggestions
    plain = suggestions("usage_rel_ppl", {})
    assert plain == "model.router_zloss=1e-2, model.att_router_zloss=1e-2, a longer optim.warmup, a lower optim.lr"
    used = suggestions("usage_rel_ppl", {"model.router_zloss": 0.01, "optim.groups.router.lr_mult": 0.5})
    assert used == ("model.att_router_zloss=1e-2, a longer optim.warmup, a lower optim.lr "
                    "(this run already sets model.router_zloss=0.01)")  # lr_mult is not advice: not named
    dead = suggestions("dead_frac", {"model.bias_balance_rate": 0.001})
    assert dead == ("model.router_zloss=1e-2, a longer optim.warmup, a lower optim.lr "
                    "(this run already sets model.bias_balance_rate=0.001)")
    alarm = CollapseAlarm(AlarmSchema(), warmup=0, total_steps=100, in_use={"model.router_zloss": 0.01})
    (event,) = [e for e in alarm.check(10, {"moe/g0/usage_rel_ppl": 0.1}) if e.metric == "usage_rel_ppl"]
    assert "this run already sets model.router_zloss=0.01" in event.message()


def test_advice_names_the_runs_warmup_and_lr():
    """'a longer optim.warmup' / 'a lower optim.lr' carry the run's values, so a run that already
    warms up for 75 steps is not told to warm up as if it had none (hand-written expected line)."""
    from moeut.train_lib.alarm import suggestions
    assert suggestions("dead_frac", {"model.router_zloss": 0.01}, current={"optim.warmup": 75, "optim.lr": 4e-3}) == (
        "a longer optim.warmup (now 75), model.bias_balance_rate, a lower optim.lr (now 0.004) "
        "(this run already sets model.router_zloss=0.01)")
    alarm = CollapseAlarm(AlarmSchema(), warmup=75, total_steps=600, lr=2e-3)
    (event,) = [e for e in alarm.check(80, {"moe/g1/dead_frac": 0.5})]
    assert "model.router_zloss=1e-2, a longer optim.warmup (now 75), model.bias_balance_rate, " \
           "a lower optim.lr (now 0.002) (docs/" in event.message()


def test_without_sigma_moe_the_advice_names_no_expert_options():
    """A dense model (or another router) gets no σ-MoE options and no routing wording: a CE plateau
    there is a learning-rate matter (hand-written expected lines)."""
    from moeut.train_lib.alarm import suggestions
    assert suggestions("ce_plateau", {}, sigma_moe=False) == "a longer optim.warmup, a lower optim.lr"
    assert suggestions("ce_plateau", {}) == ("check the moe/ usage metrics; a longer optim.warmup, "
                                             "model.router_zloss=1e-2, a lower optim.lr")
    alarm = CollapseAlarm(AlarmSchema(), warmup=0, total_steps=100, sigma_moe=False)
    events = []
    for step, ce in [(2, 7.0), (4, 6.99), (6, 6.98), (8, 6.97), (10, 6.96), (12, 6.95)]:
        events += alarm.check(step, {"train/ce": ce})
    (event,) = events
    assert event.metric == "ce_plateau"
    assert ("the learning rate may be too high. Likely to help: a longer optim.warmup (now 0), a lower optim.lr "
            "(docs/") in event.message()
    assert "expert" not in event.message() and "model." not in event.message()


def test_windows_with_too_few_selections_are_noted_not_judged():
    """Uniform routing over 1.7 selections per expert leaves e^-1.7 = 18 % of the experts unselected
    by chance: such a window is not judged. It is noted once per layer group (not a warning, nothing
    in metrics.jsonl); a window with enough selections is judged as before; a record without the
    count (older runs) is judged as before."""
    alarm = CollapseAlarm(AlarmSchema(), warmup=0, total_steps=100)
    few = {"moe/g0/usage_rel_ppl": 0.69, "moe/g0/dead_frac": 0.18, "moe/g0/selections_per_expert": 1.7}
    assert alarm.check(10, few) == [] and alarm.check(20, few) == []
    assert alarm.pop_notes() == [
        "[alarm] step 10: the routing window of layer group g0 holds 1.7 selections per expert "
        "(< train.alarm.min_selections=10): its usage and dead-expert checks skip such windows "
        "(a longer train.routing_interval or a smaller train.routing_every collects more)"]
    assert alarm.pop_notes() == []
    enough = {**few, "moe/g0/selections_per_expert": 10.0}
    assert sorted(e.metric for e in alarm.check(30, enough)) == ["dead_frac", "usage_rel_ppl"]
    legacy = CollapseAlarm(AlarmSchema(), warmup=0, total_steps=100)
    assert sorted(e.metric for e in legacy.check(10, {k: v for k, v in few.items() if "selections" not in k})) == \
        ["dead_frac", "usage_rel_ppl"]
    # a resumed run does not repeat the note
    resumed = CollapseAlarm(AlarmSchema(), warmup=0, total_steps=100)
    resumed.load_state_dict(alarm.state_dict())
    assert resumed.check(40, few) == [] and resumed.pop_notes() == []
