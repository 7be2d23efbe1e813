"""The collapse alarm (docs/training.md "Collapse alarm"): warns once when a run's logged metrics
look like an expert-routing collapse. It only warns; training goes on unchanged.

Owns `CollapseAlarm`, fed every logged record (the train/ records and the routing metrics of
moeut.analysis.routing, as written to metrics.jsonl), which returns the events to report. Three checks,
each with a `train.alarm.*` threshold (defaults chosen on the CPU-scale runs of docs/results.md,
where they fire on every collapsed run and on none of the healthy ones: tests/unit/train/
test_collapse_alarm.py):

    usage_rel_ppl   moe/g<g>/usage_rel_ppl (expert-usage perplexity / number of experts) below the
                    threshold after the warm-up (optim.warmup): the tokens concentrate on few experts
    dead_frac       moe/g<g>/dead_frac (fraction of experts never selected) at or above the threshold
                    after the warm-up
    (both only over routing windows with at least min_selections selections per expert,
    moe/g<g>/selections_per_expert: with fewer, uniform routing looks collapsed by chance -- at 1.7
    per expert, a fifth of the experts go unselected -- and the first such window is noted once)
    ce_plateau      train/ce fell by less than ce_plateau_drop nats over the last ce_plateau_window x
                    train.steps steps, looked at from the end of the warm-up to ce_plateau_until x
                    train.steps (an early plateau; late in a schedule a flat CE is normal)

Each (metric, layer group) warns once per run: the fired set is part of the training state
(`state_dict`), so a resumed run does not repeat a warning.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

HELP = {  # the options likely to help, named in the warning: what removed the collapse in the screens
    # (docs/results.md "Choosing the options"; a lower router lr made it worse there, so it is not named)
    "usage_rel_ppl": ["model.router_zloss=1e-2", "model.att_router_zloss=1e-2", "a longer optim.warmup",
                      "a lower optim.lr"],
    "dead_frac": ["model.router_zloss=1e-2", "a longer optim.warmup", "model.bias_balance_rate", "a lower optim.lr"],
    "ce_plateau": ["a longer optim.warmup", "model.router_zloss=1e-2", "a lower optim.lr"],
}
# the option each suggestion sets, to tell the user which of them the run already uses
_SUGGESTION_OPTION = re.compile(r"(optim\.groups\.router\.\w+|model\.\w+)")


def suggestions(metric: str, in_use: Dict[str, Any], sigma_moe: bool = True,
                current: Optional[Dict[str, Any]] = None) -> str:
    """The options likely to help with `metric`, less those the run already sets (`in_use`: option
    -> its non-default value), which are named as already set. Without σ-MoE layers (`sigma_moe`
    False: a dense model or another router) the σ-MoE options (`model.*`) are not named. `current`
    (e.g. {"optim.warmup": 75, "optim.lr": 4e-3}) adds the run's value to "a longer/lower <option>"."""
    fresh = [h for h in HELP[metric] if ((m := _SUGGESTION_OPTION.search(h)) is None or m.group(1) not in in_use)
             and (sigma_moe or not h.startswith("model."))]
    fresh = [h + (f" (now {current[h.split()[-1]]:g})" if current and h.split()[-1] in current
                  and h.split()[0] == "a" else "") for h in fresh]
    used = [f"{k}={v}" for k, v in sorted(in_use.items()) if any(k in h for h in HELP[metric])]
    text = ", ".join(fresh) if fresh else "a lower optim.lr"
    if metric == "ce_plateau" and sigma_moe:
        text = "check the moe/ usage metrics; " + text
    return text + (f" (this run already sets {', '.join(used)})" if used else "")
_GROUP_KEY = re.compile(r"^moe/(g\d+)/(usage_rel_ppl|dead_frac)$")


def off_line(cfg) -> Optional[str]:
    """The train.log line of a run whose alarm is switched off (cfg: train.alarm), naming the option
    that did it; None when the alarm is on."""
    if cfg.enabled:
        return None
    return ("[alarm] train.alarm.enabled=false: the collapse alarm is off; a routing collapse or an early "
            "CE plateau is not warned about (docs/training.md \"Collapse alarm\")")


@dataclass
class AlarmEvent:
    """One alarm: `metric` (usage_rel_ppl, dead_frac, ce_plateau), `where` (a layer group "g<g>",
    or "all" for the CE), the step, the value that crossed `threshold`, the option that sets it."""
    metric: str
    where: str
    step: int
    value: float
    threshold: float
    option: str
    in_use: Dict[str, Any] = field(default_factory=dict)  # routing-stability options the run already sets
    sigma_moe: bool = True  # the model has σ-MoE layers (else: no routing wording, no σ-MoE options)
    current: Dict[str, Any] = field(default_factory=dict)  # optim.warmup / optim.lr now, named beside "a longer/lower"

    def message(self) -> str:
        """The train.log line: the metric, the layer group, the value and the options likely to help."""
        what = {"usage_rel_ppl": f"expert-usage perplexity of layer group {self.where} is {self.value:.3f} of "
                                 f"uniform (< {self.option}={self.threshold:g}): tokens concentrate on few experts",
                "dead_frac": f"{self.value:.1%} of the experts of layer group {self.where} are dead "
                             f"(>= {self.option}={self.threshold:g})",
                "ce_plateau": f"training CE fell only {self.value:.3f} nats over the last steps "
                              f"(< {self.option}={self.threshold:g}): an early plateau"}[self.metric]
        cause = "the expert routing may be collapsing" if self.sigma_moe else "the learning rate may be too high"
        return (f"[alarm] WARNING: step {self.step}: {what}; {cause}. "
                f"Likely to help: {suggestions(self.metric, self.in_use, self.sigma_moe, self.current)} "
                f"(docs/training.md \"Routing stability\")")

    def record(self) -> Dict[str, float]:
        """The metrics.jsonl entry: {"alarm/<metric>/<where>": value}."""
        return {f"alarm/{self.metric}/{self.where}": float(self.value)}


class CollapseAlarm:
    """The alarm of one run. cfg: train.alarm (AlarmSchema); warmup: optim.warmup (steps);
    total_steps: train.steps; lr: optim.lr (named in the advice). `check(step, record)` returns the
    new events of a logged record."""

    def __init__(self, cfg, warmup: int, total_steps: int, in_use: Optional[Dict[str, Any]] = None,
                 sigma_moe: bool = True, lr: Optional[float] = None):
        self.cfg, self.warmup, self.total_steps, self.sigma_moe = cfg, warmup, total_steps, sigma_moe
        self.current = {"optim.warmup": warmup, **({"optim.lr": lr} if lr is not None else {})}
        self.in_use = dict(in_use or {})  # option -> value of the routing-stability options this run sets
        self.window = max(1, round(cfg.ce_plateau_window * total_steps))
        self.fired: set = set()
        self.notes: List[str] = []  # train.log lines that are not warnings (pop_notes)
        self.ce: List[Tuple[int, float]] = []  # (step, train/ce) of the last `window` steps and one before

    def _event(self, metric: str, where: str, step: int, value: float, option: str) -> List[AlarmEvent]:
        if (metric, where) in self.fired:
            return []
        self.fired.add((metric, where))
        return [AlarmEvent(metric, where, step, value, getattr(self.cfg, option.rsplit(".", 1)[-1]), option,
                           self.in_use, self.sigma_moe, self.current)]

    def check(self, step: int, record: Dict[str, Any]) -> List[AlarmEvent]:
        """The events a logged record (metric name -> value, at optimiser step `step`) triggers,
        each (metric, layer group) once per run; none when train.alarm.enabled is false."""
        if not self.cfg.enabled:
            return []
        events: List[AlarmEvent] = []
        after_warmup = step > self.warmup
        for key, value in sorted(record.items()):
            m = _GROUP_KEY.match(key)
            if m is None or not isinstance(value, (int, float)) or not after_warmup:
                continue
            where, metric = m.groups()
            if self._too_few(step, where, record.get(f"moe/{where}/selections_per_expert")):
                continue
            if metric == "usage_rel_ppl" and value < self.cfg.usage_rel_ppl:
                events += self._event(metric, where, step, value, "train.alarm.usage_rel_ppl")
            if metric == "dead_frac" and value >= self.cfg.dead_frac:
                events += self._event(metric, where, step, value, "train.alarm.dead_frac")
        ce = record.get("train/ce")
        if isinstance(ce, (int, float)):
            events += self._check_ce(step, float(ce))
        return events

    def _too_few(self, step: int, where: str, per_expert: Any) -> bool:
        """Whether layer group `where`'s window has too few selections per expert to judge (noted once)."""
        if not isinstance(per_expert, (int, float)) or per_expert >= self.cfg.min_selections:
            return False
        if ("few_selections", where) not in self.fired:
            self.fired.add(("few_selections", where))
            self.notes.append(f"[alarm] step {step}: the routing window of layer group {where} holds {per_expert:.1f} "
                              f"selections per expert (< train.alarm.min_selections={self.cfg.min_selections:g}): "
                              "its usage and dead-expert checks skip such windows (a longer train.routing_interval "
                              "or a smaller train.routing_every collects more)")
        return True

    def pop_notes(self) -> List[str]:
        """The notes since the last call (train.log lines at INFO), in order."""
        notes, self.notes = self.notes, []
        return notes

    def _check_ce(self, step: int, ce: float) -> List[AlarmEvent]:
        self.ce.append((step, ce))
        before = [(s, v) for s, v in self.ce if s <= step - self.window]
        if before:  # keep the newest point at least `window` steps back, and everything after it
            self.ce = [p for p in self.ce if p[0] >= before[-1][0]]
        if not before or before[-1][0] < self.warmup or step > self.cfg.ce_plateau_until * self.total_steps:
            return []
        drop = before[-1][1] - ce
        if drop < self.cfg.ce_plateau_drop:
            return self._event("ce_plateau", "all", step, drop, "train.alarm.ce_plateau_drop")
        return []

    def state_dict(self) -> Dict[str, Any]:
        """The fired (metric, group) pairs and the CE history, for the checkpoint."""
        return {"fired": sorted(list(p) for p in self.fired), "ce": [list(p) for p in self.ce]}

    def load_state_dict(self, d: Dict[str, Any]) -> None:
        """Restore `state_dict()` (a resumed run does not repeat a warning)."""
        self.fired = {tuple(p) for p in d.get("fired", [])}
        self.ce = [(int(s), float(v)) for s, v in d.get("ce", [])]
