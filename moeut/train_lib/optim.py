"""The optimiser of a run (SPEC 4.1) and its optional per-parameter-group settings
(docs/training.md "Routing stability").

Owns `param_group_name` (which of the groups "router", "norm", "embedding" or "other" a parameter
belongs to), `build_optimizer` (AdamW over every parameter: one group when every
`optim.groups.<group>` option is at its default, the paper's setting; otherwise one group per
non-empty parameter group, each with its own weight decay, learning-rate multiplier and warm-up)
and `group_lr` (the learning rate of a group at a step, which `schedule.set_lr` applies).

    router     the routing/gate weights: sigma-MoE `expert_sel` (W_S), SwitchHead `sel_v` / `sel_o`,
               Switch `router`, DeepSeekMoE `centroids`, SUT's MLPRouter (hidden and out layers)
    norm       every parameter of a normalisation layer (LayerNorm weight and bias)
    embedding  the token embedding table(s) (nn.Embedding; the untied head is "other")
    other      everything else

Sources: a separate router optimiser group (e.g. marin-community/marin issue #5478); no weight decay
on non-matmul weights (nanoGPT's configure_optimizers); the router warm-up is ours (docs/results.md).
Per-group settings are stored in each param group's dict (`name`, `lr_mult`, `warmup`), so they
are saved with the optimiser's state in checkpoints; a resume sets every configured param-group
value again and names each one that changed (`reapply_group_settings`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..compute import total_params

GROUPS = ("router", "norm", "embedding")  # the configurable groups (optim.groups.<name>); the rest is "other"
ROUTER_PARAM_NAMES = ("expert_sel", "sel_v", "sel_o", "router", "centroids")


def _is_router_module(m: nn.Module) -> bool:
    from moeut.baselines.sut import MLPRouter  # SUT's router is a small MLP: all its parameters route
    return isinstance(m, MLPRouter)


def param_group_name(model: nn.Module) -> Dict[str, str]:
    """{parameter name (as in model.named_parameters()): group} for every parameter of `model`,
    group one of "router", "norm", "embedding", "other" (module docstring)."""
    out: Dict[str, str] = {}
    for mname, m in model.named_modules():
        router_module = _is_router_module(m)
        for pname, _ in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if router_module or pname in ROUTER_PARAM_NAMES:
                group = "router"
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(m).__name__:
                group = "norm"
            elif isinstance(m, nn.Embedding):
                group = "embedding"
            else:
                group = "other"
            out.setdefault(full, group)
    # A parameter under an MLPRouter belongs to a submodule (hidden/out): mark the whole subtree.
    for mname, m in model.named_modules():
        if _is_router_module(m):
            for pname, _ in m.named_parameters():
                out[f"{mname}.{pname}" if mname else pname] = "router"
    return out


def groups_at_default(groups_cfg) -> bool:
    """True when every optim.groups.<group> option is at its default (lr_mult 1, weight_decay null,
    warmup 0): the optimiser is then the paper's single group (SPEC 4.1)."""
    return all(getattr(groups_cfg, g).lr_mult == 1.0 and getattr(groups_cfg, g).weight_decay is None
               and getattr(groups_cfg, g).warmup == 0 for g in GROUPS)


def build_optimizer(model: nn.Module, o_cfg) -> Tuple[torch.optim.Optimizer, str]:
    """AdamW over every parameter of `model` with optim.lr/betas/eps/weight_decay (SPEC 4.1), and
    a one-line description of its parameter groups for train.log. o_cfg: the `optim` options
    (OptimSchema). With every optim.groups.<g> at its default: one group (the paper's optimiser).
    Otherwise one param group per non-empty group of `param_group_name`, in the order router,
    norm, embedding, other, each with weight_decay (the group's, or optim.weight_decay when
    null), `lr_mult` and `warmup` (see `group_lr`)."""
    common = dict(lr=o_cfg.lr, betas=tuple(o_cfg.betas), eps=o_cfg.eps, weight_decay=o_cfg.weight_decay)
    if groups_at_default(o_cfg.groups):
        n = total_params(model)
        return (torch.optim.AdamW(model.parameters(), **common),
                f"[optim] AdamW, one parameter group ({n:,} parameters; optim.groups.* at their defaults)")
    names = param_group_name(model)
    members: Dict[str, List[nn.Parameter]] = {g: [] for g in GROUPS + ("other",)}
    for name, p in model.named_parameters():
        members[names[name]].append(p)
    param_groups, parts = [], []
    for g in GROUPS + ("other",):
        if not members[g]:
            continue
        s = getattr(o_cfg.groups, g, None)
        wd = o_cfg.weight_decay if s is None or s.weight_decay is None else s.weight_decay
        lr_mult = 1.0 if s is None else s.lr_mult
        warmup = 0 if s is None else s.warmup
        param_groups.append({"params": members[g], "name": g, "weight_decay": wd, "lr_mult": lr_mult,
                             "warmup": warmup})
        n = sum(p.numel() for p in members[g])
        parts.append(f"{g}: {len(members[g])} tensors, {n:,} parameters, lr x{lr_mult:g}, weight decay {wd:g}"
                     + (f", warm-up {warmup} steps" if warmup else ""))
    return torch.optim.AdamW(param_groups, **common), "[optim] AdamW parameter groups: " + "; ".join(parts)


def group_lr(lr: float, group: dict, step: Optional[int]) -> float:
    """The learning rate of param group `group` at optimiser step `step` (0-based) when the
    schedule gives `lr`: lr x group["lr_mult"] (default 1), times (step + 1) / group["warmup"]
    while step + 1 < warmup (a ramp on top of the schedule; none when step is None)."""
    out = lr * group.get("lr_mult", 1.0)
    warmup = group.get("warmup", 0)
    if warmup and step is not None and step + 1 < warmup:
        out = out * (step + 1) / warmup
    return out


# Param-group keys a resume does not set back to the configured value: "params" (the tensors) and
# "lr" (set before every step from the schedule, train_lib.schedule.set_lr; a changed optim.lr is
# reported with the other changed options, train_lib.start.resume_config_changes).
NOT_REAPPLIED = ("params", "lr")
# The options behind the param-group keys the run's config sets (the others, e.g. amsgrad or fused,
# are fixed by build_optimizer and torch's defaults, not options).
KEY_OPTION = {"betas": "optim.betas", "eps": "optim.eps", "weight_decay": "optim.weight_decay"}


def _same(a, b) -> bool:
    """Equal param-group values, a tuple equal to the list with the same items (betas)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _show(v) -> str:
    """A param-group value as the option is written: a tuple as a list, None as null."""
    if isinstance(v, tuple):
        v = list(v)
    return "null" if v is None else repr(v)


def reapply_group_settings(optimizer: torch.optim.Optimizer, configured: List[dict], warn) -> None:
    """After loading a checkpoint's optimiser state, which restores every saved param-group
    hyperparameter (betas, eps, weight_decay, lr_mult, warmup, amsgrad, ...), set each group's
    configured value again, so that the optimiser runs what the run's config records, and call
    `warn(message)` once per changed option naming it and both values: optim.betas, optim.eps,
    optim.weight_decay, optim.groups.<group>.<key>, or for a key no option sets (amsgrad, foreach,
    fused, ...) the optimiser's key. `lr` is not set here (see NOT_REAPPLIED). configured: the
    freshly built optimiser's param_groups without params, in the same order (the group split
    itself is checked by TrainState.load_state_dict)."""
    said = set()
    for now, cfg in zip(optimizer.param_groups, configured):
        name = cfg.get("name")
        for key, value in cfg.items():
            if key in NOT_REAPPLIED or key == "name" or (key in now and _same(now[key], value)):
                continue
            if key in ("lr_mult", "warmup") or (key == "weight_decay" and name in GROUPS):
                option = f"optim.groups.{name}.{key}"
            elif key in KEY_OPTION:
                option = KEY_OPTION[key]
            else:
                option = f"AdamW {key} (set by the code, not an option)"
            old = _show(now[key]) if key in now else "absent (an older checkpoint)"
            msg = (f"{option}: the checkpoint's optimiser was trained with {old}, now {_show(value)} "
                   f"(the new value applies from the resumed step)")
            if msg not in said:  # one line per option, not per param group
                said.add(msg)
                warn(msg)
            now[key] = value
