"""The expert analyses' own layer loop over a MoEUT model: the model's forward written out layer by
layer (embed, each layer application, head; moeut.lm.LanguageModel.run_forward in eval mode), so that
an analysis can change the depth (R' repetitions of the shared group), knock experts out at chosen
layer applications, or read the residual stream after every application (the logit lens). With none
of these it computes exactly what `model(input_ids)` does (tests/unit/analysis/test_expert_depth.py).

Shapes: B batch, T time, d width, V vocabulary, E experts, H heads.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..lm import ForwardState, layer_schedule

# layer application l -> {"mlp": mask broadcastable to [B, T, E], "att_v"/"att_o": ... to [B, T, H, E]}
Knockouts = Dict[int, Dict[str, torch.Tensor]]


def schedule(model: torch.nn.Module, n_repeats: Optional[int] = None) -> List[Tuple[int, int, int]]:
    """(l, g, r) of every layer application: the model's own order, or with `n_repeats` R'
    repetitions of its G shared layers in the model's layer order. Raises ValueError for R' < 1."""
    if n_repeats is None:
        return list(model.execution_order())
    if n_repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {n_repeats}")
    cfg = model.config
    return layer_schedule(cfg.group_size, n_repeats, cfg.layer_order)


def _set_knockout(layer: torch.nn.Module, masks: Optional[Dict[str, torch.Tensor]]) -> None:
    mlp = {k: v for k, v in (masks or {}).items() if k == "mlp"}
    att = {k: v for k, v in (masks or {}).items() if k in ("att_v", "att_o")}
    unknown = set(masks or {}) - {"mlp", "att_v", "att_o"}
    if unknown:
        raise ValueError(f"knockout kinds must be mlp, att_v or att_o, got {sorted(unknown)}")
    layer.ffn.knockout = mlp or None
    layer.attention.knockout = att or None


@torch.no_grad()
def run_layers(model: torch.nn.Module, input_ids_BT: torch.Tensor, *, n_repeats: Optional[int] = None,
               knockouts: Optional[Knockouts] = None, collect_routing: bool = False,
               after_layer: Optional[Callable[[int, int, int, torch.Tensor], None]] = None
               ) -> Tuple[torch.Tensor, List]:
    """(logits [B, T, V], routing records) of the eval-mode forward of `model` (a MoEUTLM) on
    input_ids [B, T] int64, with `n_repeats` R' repetitions instead of the model's R (None: R),
    experts knocked out at the layer applications of `knockouts` (see `Knockouts`; the masks are
    removed again afterwards), and `after_layer(l, g, r, x_BTd)` called with the residual stream
    after every application (the logit lens). Routing records only when `collect_routing`."""
    if model.training:
        raise ValueError("run_layers: the model must be in eval mode (model.eval())")
    state = ForwardState(False, collect_routing)
    x_BTd = model.embed(input_ids_BT)
    for l, g, r in schedule(model, n_repeats):
        layer = model.unique_layer(g)
        state.new_record(l, g, r)
        x_in = x_BTd
        _set_knockout(layer, (knockouts or {}).get(l))
        try:
            x_BTd = layer(x_BTd, g, l, state, None)
        finally:
            _set_knockout(layer, None)
        if state.record is not None:
            state.finish_record(x_in, x_BTd)
        if after_layer is not None:
            after_layer(l, g, r, x_BTd)
    return model.head(x_BTd), state.records


def token_ce(logits_BTV: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, T] in nats (fp32) of logits [B, T, V] against targets [B, T]."""
    return torch.nn.functional.cross_entropy(logits_BTV.float().transpose(1, 2), y_BT, reduction="none")


def target_rank(logits_BTV: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    """Rank [B, T] int64 of each target among the V logits (0 = the model's top prediction; ties
    count in the target's favour)."""
    tgt = logits_BTV.gather(-1, y_BT[..., None])
    return (logits_BTV > tgt).sum(-1)
