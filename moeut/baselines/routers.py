"""Old import path of the softmax-routed MoE MLPs (Switch/GShard, DeepSeekMoE; SPEC 8.5, 8.6).

They live in `moeut.softmax_moe` (outside the baselines package, so that the core MoEUT model does
not depend on it) and the MLP factory `build_moe_mlp` in `moeut.model`. This module only re-exports
them; neither of those modules imports `moeut.baselines`, so there is no import cycle.
"""
from __future__ import annotations

from ..model import build_moe_mlp
from ..softmax_moe import (DeepSeekMoE, SwitchMoE, capacity_keep_mask, deepseek_balance_loss,
                           deepseek_device_balance_loss, expert_capacity, router_z_loss, switch_balance_loss)

__all__ = ["DeepSeekMoE", "SwitchMoE", "build_moe_mlp", "capacity_keep_mask", "deepseek_balance_loss",
           "deepseek_device_balance_loss", "expert_capacity", "router_z_loss", "switch_balance_loss"]
