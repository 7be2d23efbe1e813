"""Baselines (SPEC §8): every variant trains on real text; balance, z- and MIM losses equal hand
computations on fixed routings; capacity drops exactly the overflow; SUT halting is a distribution;
KV cache, causality, init and checkpoints for the new architectures."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from moeut.baselines.dense import DenseLM, MoETransformerConfig, MoETransformerLM
from moeut.baselines.routers import (DeepSeekMoE, SwitchMoE, capacity_keep_mask, deepseek_balance_loss,
                                     deepseek_device_balance_loss, expert_capacity, router_z_loss,
                                     switch_balance_loss)
from moeut.baselines.sut import MIMAccumulator, SUTConfig, SUTLM, mim_loss
from moeut.checkpoint import load_model, save_checkpoint
from moeut.baselines.dense import DenseConfig
from moeut.registry import BASELINE_PRESETS, build_model, get_preset
from moeut.model import ForwardState, KVCache

V = 512

# Test-size versions of every variant (d 64, 4 layer applications, vocabulary 512).
SMALL = {
    "dense": DenseConfig(d_model=64, n_layers=4, n_heads=2, d_head=32, d_ff=256, vocab_size=V),
    "naive_ut": DenseConfig(d_model=96, n_layers=4, n_heads=3, d_head=32, d_ff=384, vocab_size=V, group_size=1),
    "sigma_moe": get_preset("tiny", group_size=4, att_n_experts=1, att_k=1),
    "switch_top2": get_preset("tiny", group_size=4, att_n_experts=1, att_k=1, mlp_type="switch", ff_k=2),
    "switch_top1_capacity": get_preset("tiny", group_size=4, att_n_experts=1, att_k=1, mlp_type="switch", ff_k=1,
                                       moe_capacity_factor=1.25),
    "deepseek": get_preset("tiny", group_size=4, att_n_experts=1, att_k=1, mlp_type="deepseek", moe_n_shared=1,
                           moe_device_groups=3, moe_device_balance_weight=0.05),
    "moeut_switch": get_preset("tiny", mlp_type="switch"),
    "moeut_deepseek": get_preset("tiny", mlp_type="deepseek", moe_n_shared=1),
    "du_every2": MoETransformerConfig(d_model=64, n_layers=4, n_heads=2, d_head=32, d_ff=256, ff_n_experts=4,
                                      ff_k=2, ff_expert_size=128, moe_every=2, moe_capacity_factor=2.0,
                                      vocab_size=V),
    "sut": SUTConfig(d_model=64, n_layers=4, ff_n_experts=8, ff_expert_size=32, ff_k=2, att_n_experts=4,
                     att_expert_size=64, att_k=2, d_head=32, max_relative_positions=8, vocab_size=V,
                     sample_topk=1),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread is 5-20x faster than two
    # when the other core is busy (measured), and never slower at these sizes.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def c4_stream(small_tokenizer, c4_texts):
    ids = []
    for text in c4_texts[300:600]:
        ids.extend(small_tokenizer.encode(text))
    assert small_tokenizer.vocab_size <= V
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------------------------
# Training on real text
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SMALL))
def test_variant_trains_on_real_text(name, c4_stream):
    torch.manual_seed(0)
    model = build_model(SMALL[name])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    B, T, steps = 8, 32, 40
    windows = c4_stream[: (c4_stream.numel() // (T + 1)) * (T + 1)].view(-1, T + 1)
    assert windows.shape[0] >= B * steps
    losses = []
    for step in range(steps):
        w = windows[step * B:(step + 1) * B]  # fresh text every step
        out = model(w[:, :-1])
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), w[:, 1:].flatten())
        assert torch.isfinite(out.reg_loss) and out.reg_loss.dim() == 0
        (ce + out.reg_loss).backward()
        if step == 0:  # routers, gates, halting head, shared experts: everything learns
            missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not missing, f"{name}: no/non-finite gradient for {missing}"
        opt.step()
        opt.zero_grad()
        losses.append(ce.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.5, f"{name}: CE {first:.3f} -> {last:.3f}"
    model.eval()
    with torch.no_grad():
        assert model(windows[:2, :-1]).reg_loss.item() == 0.0  # eval: exactly 0


def _meta_params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(get_preset(name)).parameters())


def test_baseline_presets_build_on_meta():
    """Every baseline preset builds with the closed-form count, and the matches its table comments
    claim (moeut/baselines/__init__.py) hold exactly."""
    from moeut.compute import active_params
    from param_formula import param_count_formula
    n = {name: _meta_params(name) for name in BASELINE_PRESETS}
    for name in BASELINE_PRESETS:
        assert n[name] == param_count_formula(get_preset(name)), name
    for size in ("44m", "244m"):
        # Switch router E x d = σ-MoE's gate E x d: only the routing differs.
        assert n[f"switch_{size}"] == _meta_params(f"sigma_moe_{size}")
        assert n[f"moeut_switch_{size}"] == _meta_params(f"moeut_{size}")
        # DeepSeekMoE: same experts; the K_s shared experts have no router row.
        cfg = get_preset(f"deepseek_{size}")
        assert n[f"deepseek_{size}"] == _meta_params(f"sigma_moe_{size}") - cfg.n_layers * cfg.moe_n_shared * cfg.d_model
        cfg = get_preset(f"moeut_deepseek_{size}")
        assert n[f"moeut_deepseek_{size}"] == _meta_params(f"moeut_{size}") - cfg.group_size * cfg.moe_n_shared * cfg.d_model
    # DeepSeekMoE 2B validation model (SPEC 8.5): 2.0B total, 0.3B activated.
    assert abs(n["deepseek_2b"] - 2.0e9) <= 0.05e9
    assert abs(active_params(get_preset("deepseek_2b")) - 0.3e9) <= 0.02e9


def test_naive_ut_is_one_shared_layer_matched_to_moeut():
    for name, target in (("naive_ut_44m", 44_345_792), ("naive_ut_244m", 243_326_784)):
        cfg = get_preset(name)
        assert cfg.group_size == 1 and cfg.n_layers in (16, 18)
        with torch.device("meta"):
            n = sum(p.numel() for p in DenseLM(cfg).parameters())
        assert abs(n - target) <= cfg.d_model, (name, n, target)  # d_ff step = 2d+1 parameters


def test_dense_init_rescaled_trunc_normal():
    cfg = SMALL["dense"]
    model = DenseLM(cfg)
    for layer in model.layers:
        for lin in (layer.attention.q, layer.attention.kv, layer.attention.o, layer.ffn.up, layer.ffn.down):
            want = math.sqrt(2.0 / (cfg.n_layers * lin.weight.shape[1]))
            assert abs(lin.weight.std().item() - want) < 1e-6 * want + 1e-9
            # trunc-normal(+-2) rescaled: no entry beyond 2 std of the *draw*; loose check of the tail
            assert lin.weight.abs().max().item() <= 2.0 * want / 0.85
        for lin in (layer.ffn.up, layer.ffn.down):
            assert torch.all(lin.bias == 0)


# ------------------------------------------------------------------------------------------
# Balance, z-loss, capacity
# ------------------------------------------------------------------------------------------

def test_switch_balance_loss_hand_values():
    E = 4
    uniform = torch.full((8, E), 1 / E)
    assert switch_balance_loss(uniform, torch.arange(8) % E).item() == pytest.approx(1.0, abs=1e-7)
    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), E).float()
    assert switch_balance_loss(collapsed, torch.zeros(8, dtype=torch.long)).item() == pytest.approx(E)
    # f = [3/4, 1/4], P = [0.6, 0.4] -> 2 * (0.45 + 0.10) = 1.1
    p = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    assert switch_balance_loss(p, torch.tensor([0, 0, 1, 0])).item() == pytest.approx(1.1, abs=1e-6)


def test_router_z_loss_hand_value():
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    want = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(z).item() == pytest.approx(want, rel=1e-6)


def test_deepseek_balance_losses_hand_values():
    N_routed, K = 6, 2
    uniform = torch.full((6, N_routed), 1 / N_routed)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5]])  # every expert twice
    assert deepseek_balance_loss(uniform, idx).item() == pytest.approx(1.0, abs=1e-6)  # alpha1 * 1 = alpha1
    collapsed = torch.zeros(6, N_routed)
    collapsed[:, :2] = 0.5
    idx_c = torch.tensor([[0, 1]] * 6)
    assert deepseek_balance_loss(collapsed, idx_c).item() == pytest.approx(N_routed / K, abs=1e-6)  # maximum
    # Device level, D = 3 groups {0,1},{2,3},{4,5}: collapsed -> f'_0 = 3, P'_0 = 1 -> 3.
    assert deepseek_device_balance_loss(collapsed, idx_c, 3).item() == pytest.approx(3.0, abs=1e-6)
    assert deepseek_device_balance_loss(uniform, idx, 3).item() == pytest.approx(1.0, abs=1e-6)


def _state():
    return ForwardState(training=True, collect_routing=False)


def test_switch_module_aux_losses_on_uniform_router():
    cfg = get_preset("tiny", mlp_type="switch", ff_k=2)
    moe = SwitchMoE(cfg)
    moe.reset_parameters(cfg)
    with torch.no_grad():
        moe.router.zero_()  # every token: p = 1/E exactly
    state = _state()
    x = torch.randn(2, 5, cfg.d_model)
    moe(x, x, 0, state)
    E = cfg.ff_n_experts
    # P_e = 1/E for every e, so E * sum_e f_e / E = 1 whatever the ties chose.
    assert state.aux_losses["balance_g0"].item() == pytest.approx(cfg.moe_balance_weight, rel=1e-6)
    assert state.aux_losses["zloss_g0"].item() == pytest.approx(cfg.moe_zloss_weight * math.log(E) ** 2, rel=1e-6)
    eval_state = ForwardState(training=False, collect_routing=False)
    moe(x, x, 0, eval_state)
    assert eval_state.aux_losses == {}


def test_switch_gates_renormalised_top2_and_raw_top1():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(z, -1)[0]
    for k in (1, 2):
        moe = SwitchMoE(get_preset("tiny", mlp_type="switch", ff_k=k, ff_n_experts=4))
        _, idx, gate = moe.route(z)
        assert idx[0].tolist() == [0, 1][:k]
        want = [p[0].item()] if k == 1 else [(p[0] / (p[0] + p[1])).item(), (p[1] / (p[0] + p[1])).item()]
        assert gate[0].tolist() == pytest.approx(want, rel=1e-6)


def test_deepseek_gates_not_renormalised_and_shared_always_on():
    cfg = get_preset("tiny", mlp_type="deepseek", moe_n_shared=2, ff_n_experts=10, ff_k=5)
    moe = DeepSeekMoE(cfg)
    moe.reset_parameters(cfg)
    assert moe.n_routed == 8 and moe.k_routed == 3
    z = torch.randn(6, 8)
    s, idx, gate = moe.route(z)
    probs = torch.softmax(z, -1)  # softmax over the 8 routed experts only
    torch.testing.assert_close(gate, probs.gather(-1, idx))  # raw affinities: no renormalisation
    torch.testing.assert_close(gate.sort(-1).values, probs.topk(3, -1).values.sort(-1).values)
    assert torch.all(gate.sum(-1) < 1.0)
    # Output = shared FFN + sum of gated routed experts, checked against an explicit loop.
    x = torch.randn(1, 6, cfg.d_model)
    y = moe(x, x, 0, _state())[0]
    s, idx, gate = moe.route(F.linear(x[0], moe.centroids).float())
    for t in range(6):
        want = F.relu(x[0, t] @ moe.shared_keys) @ moe.shared_values
        for j in range(3):
            e = idx[t, j]
            want = want + gate[t, j] * (F.relu(x[0, t] @ moe.experts.keys[e]) @ moe.experts.values[e])
        torch.testing.assert_close(y[t], want, rtol=1e-4, atol=1e-5)


def test_expert_capacity_rule():
    assert expert_capacity(10, 2.0, 4) == 8  # ceil(5) = 5 -> next multiple of 4
    assert expert_capacity(16, 1.0, 4) == 4
    assert expert_capacity(17, 1.0, 4) == 8


def test_capacity_drops_exactly_the_overflow():
    # 6 tokens, top-2, 3 experts, capacity 2. Priority: all first choices (token order), then seconds.
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [1, 2]])
    keep = capacity_keep_mask(idx, 3, 2)
    # first choices: e0 <- t0, t1 (t2 dropped); e1 <- t3, t5; e2 <- t4.
    # second choices: e1 full (t0 dropped, t2 dropped); e2 <- t1 (2nd slot); e0 full (t3, t4 dropped);
    # e2 full for t5.
    want = torch.tensor([[True, False], [True, True], [False, False], [True, False], [True, False], [True, False]])
    assert torch.equal(keep, want)
    # Naive loop oracle on a random routing.
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(40)])
    keep = capacity_keep_mask(idx, 5, 7)
    load = [0] * 5
    want = torch.zeros(40, 2, dtype=torch.bool)
    for j in range(2):
        for t in range(40):
            e = idx[t, j].item()
            if load[e] < 7:
                want[t, j] = True
                load[e] += 1
    assert torch.equal(keep, want)


def test_capacity_groups_and_padding_against_a_loop():
    """Groups are independent, each with its own capacity; padded tokens take no slot and are never
    kept (issue 14.3). Oracle: the priority loop per group over the real tokens only."""
    g = torch.Generator().manual_seed(2)
    G, N, K, E = 3, 30, 2, 4
    idx = torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]) for _ in range(G)])
    valid = torch.rand(G, N, generator=g) > 0.3
    n_real = valid.sum(-1)
    cap = expert_capacity(n_real, 1.0, E)
    assert cap.tolist() == [expert_capacity(int(n), 1.0, E) for n in n_real]  # tensor = int rule
    keep = capacity_keep_mask(idx, E, cap, valid)
    want = torch.zeros(G, N, K, dtype=torch.bool)
    for b in range(G):
        load = [0] * E
        for j in range(K):
            for t in range(N):
                e = idx[b, t, j].item()
                if valid[b, t] and load[e] < cap[b]:
                    want[b, t, j] = True
                    load[e] += 1
    assert torch.equal(keep, want)
    assert keep.any() and not keep.all()


def test_switch_capacity_groups_per_sequence_in_eval_per_batch_in_training():
    cfg = get_preset("tiny", mlp_type="switch", ff_k=2, ff_n_experts=4, moe_capacity_factor=1.0)
    moe = SwitchMoE(cfg)
    moe.reset_parameters(cfg)
    z = torch.randn(3 * 10, 4, generator=torch.Generator().manual_seed(0))
    moe.eval()
    _, idx, gate = moe.route(z, seq_len=10)
    for b in range(3):  # each sequence alone gives its own rows
        _, idx_b, gate_b = moe.route(z[b * 10:(b + 1) * 10], seq_len=10)
        assert torch.equal(idx[b * 10:(b + 1) * 10], idx_b) and torch.equal(gate[b * 10:(b + 1) * 10], gate_b)
    moe.train()
    _, idx_t, gate_t = moe.route(z, seq_len=10)  # one group of 30 tokens: capacity 8, not 3 x 8
    keep = capacity_keep_mask(idx_t, 4, expert_capacity(30, 1.0, 4))
    assert torch.equal(gate_t > 0, keep) and not torch.equal(gate_t > 0, gate > 0)


def test_switch_module_drops_tokens_to_zero_output():
    cfg = get_preset("tiny", mlp_type="switch", ff_k=1, ff_n_experts=4, moe_capacity_factor=0.5)
    moe = SwitchMoE(cfg)
    moe.reset_parameters(cfg)
    with torch.no_grad():  # router sends every token to expert 0 (x has a positive first coordinate)
        moe.router.zero_()
        moe.router[0, 0] = 100.0
    x = torch.randn(1, 16, cfg.d_model)
    x[..., 0] = x[..., 0].abs() + 1
    cap = expert_capacity(16, 0.5, 4)  # = 4
    state = ForwardState(training=True, collect_routing=True)
    from moeut.outputs import RoutingRecord
    state.record = RoutingRecord(l=0, g=0, r=0)
    y = moe(x, x, 0, state)[0]
    assert torch.all(y[cap:] == 0)  # tokens 4..15 overflowed expert 0: MoE output exactly 0
    assert torch.all(y[:cap].abs().sum(-1) > 0)
    assert torch.all(state.record.mlp_gate[0, cap:] == 0) and torch.all(state.record.mlp_gate[0, :cap] > 0)


# ------------------------------------------------------------------------------------------
# SUT
# ------------------------------------------------------------------------------------------

def test_mim_loss_equals_hand_computed_entropies():
    p = [[0.5, 0.5, 0.0], [0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]
    n = len(p)
    h_cond = sum(-sum(q * math.log(q) for q in row if q > 0) for row in p) / n
    marg = [sum(row[e] for row in p) / n for e in range(3)]
    h_marg = -sum(m * math.log(m) for m in marg)
    assert mim_loss(torch.tensor(p)).item() == pytest.approx(h_cond - h_marg, abs=1e-6)
    # The accumulator over two "steps" with a halted row masked out equals the loss over active rows.
    acc = MIMAccumulator()
    acc.add(torch.tensor(p[:2]), torch.tensor([True, True]))
    acc.add(torch.tensor(p[2:] + [[0.0, 0.0, 1.0]]), torch.tensor([True, True, False]))
    assert acc.loss().item() == pytest.approx(h_cond - h_marg, abs=1e-6)
    # One-hot, evenly spread routing: H(E|X) = 0, H(E) = log 3 -> -log 3 (the minimum).
    assert mim_loss(torch.eye(3)).item() == pytest.approx(-math.log(3), abs=1e-6)


def _sut_with_varied_halting(**kw):
    cfg = dataclasses.replace(SMALL["sut"], n_layers=12, **kw)
    model = SUTLM(cfg)
    with torch.no_grad():  # default init gives alpha = 0.5 everywhere; make it position dependent
        model.halt.w2.weight.normal_(0, 2.0)
    return model


def test_sut_halting_probabilities_sum_to_one():
    model = _sut_with_varied_halting().train()
    out = model(torch.randint(0, V, (3, 20)), return_halting=True)
    halting = out.reg_terms["halting"]  # [L, B, T]
    assert halting.shape == (12, 3, 20)
    assert torch.all(halting >= 0)
    torch.testing.assert_close(halting.sum(0), torch.ones(3, 20), rtol=0, atol=1e-5)
    # Some positions halted before the last step (remaining mass < 0.001), and none after halting.
    last_step = (halting > 0).float().cumsum(0).argmax(0)
    assert (last_step < 11).any()
    depth = (halting * torch.arange(1, 13).view(-1, 1, 1)).sum(0).mean()
    assert out.reg_terms["act/expected_depth"].item() == pytest.approx(depth.item(), rel=1e-5)
    # At init (zero W2): alpha = 0.5, p_l = 0.5^l, halts once 0.5^l < 1e-3 i.e. after step 10.
    fresh = SUTLM(dataclasses.replace(SMALL["sut"], n_layers=12))
    h = fresh(torch.randint(0, V, (1, 5)), return_halting=True).reg_terms["halting"][:, 0, 0]
    want = [0.5 ** l for l in range(1, 11)]
    want[-1] += 0.5 ** 10
    torch.testing.assert_close(h, torch.tensor(want + [0.0, 0.0]), rtol=1e-5, atol=1e-7)


def test_sut_reg_loss_is_mim_plus_act():
    model = _sut_with_varied_halting(sample_topk=0).train()
    out = model(torch.randint(0, V, (2, 12)), return_halting=True)
    t = out.reg_terms
    torch.testing.assert_close(out.reg_loss.detach(), t["aux/mim_att"] + t["aux/mim_mlp"] + t["aux/act"])
    assert t["aux/act"].item() == pytest.approx(0.01 * t["act/expected_depth"].item(), rel=1e-5)
    assert -math.log(8) * 0.001 - 1e-6 <= t["aux/mim_mlp"].item() <= 1e-6  # -log N_E <= -I(X;E) <= 0


# ------------------------------------------------------------------------------------------
# Causality, KV cache, routing records, checkpoints
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dense", "naive_ut", "du_every2", "sut", "moeut_deepseek"])
def test_kv_cache_matches_full_forward(name):
    cfg = SMALL[name]
    if isinstance(cfg, SUTConfig):
        cfg = dataclasses.replace(cfg, sample_topk=0)
    if isinstance(cfg, MoETransformerConfig):
        # Capacity dropping is not causal (a token's second choice can lose its slot to a later
        # token's first choice), so cached decoding equals the full forward only when dropless.
        cfg = dataclasses.replace(cfg, moe_capacity_factor=0.0)
    model = build_model(cfg).eval()
    if isinstance(model, SUTLM):
        with torch.no_grad():
            model.halt.w2.weight.normal_(0, 2.0)
    ids = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache()
        parts = [model(ids[:, :5], cache=cache).logits]
        for t in range(5, 13, 3):
            parts.append(model(ids[:, t:t + 3], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["dense", "sut", "du_every2"])
def test_causal(name):
    cfg = SMALL[name]
    if isinstance(cfg, SUTConfig):
        cfg = dataclasses.replace(cfg, sample_topk=0)
    if isinstance(cfg, MoETransformerConfig):
        cfg = dataclasses.replace(cfg, moe_capacity_factor=0.0)  # see test_kv_cache_matches_full_forward
    model = build_model(cfg).eval()
    ids = torch.randint(0, V, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % V
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_generate_runs_for_baselines():
    for name in ("dense", "sut", "du_every2"):
        cfg = SMALL[name]
        if isinstance(cfg, SUTConfig):
            cfg = dataclasses.replace(cfg, sample_topk=0)
        model = build_model(cfg).eval()
        ids = torch.randint(0, V, (2, 4))
        out = model.generate(ids, 5, greedy=True)
        assert out.shape == (2, 9) and torch.equal(out[:, :4], ids)
        with torch.no_grad():  # each cached greedy token is the argmax of a full forward over its prefix
            for t in range(4, 9):
                assert torch.equal(model(out[:, :t]).logits[:, -1].argmax(-1), out[:, t]), (name, t)


def test_routing_records_for_new_mlps():
    for name, k_rec in (("moeut_deepseek", 4), ("switch_top2", 2), ("sut", 2)):
        model = build_model(SMALL[name]).eval()
        with torch.no_grad():
            out = model(torch.randint(0, V, (2, 7)), collect_routing=True)
        assert len(out.routing) == 4
        rec = out.routing[0]
        assert rec.mlp_idx.shape == (2, 7, k_rec) and rec.mlp_idx.dtype == torch.int32
        assert rec.mlp_gate.shape == (2, 7, k_rec) and rec.in_norm.shape == (2, 7)
        assert int(rec.mlp_idx.max()) < SMALL[name].ff_n_experts
        if name == "moeut_deepseek":  # shared expert 0 in every token's set with gate 1; routed ids >= 1
            assert torch.all(rec.mlp_idx[..., 0] == 0) and torch.all(rec.mlp_gate[..., 0] == 1)
            assert torch.all(rec.mlp_idx[..., 1:] >= 1)
    # The training loop's routing metrics accept these records.
    from moeut.analysis.routing import RoutingStats
    for name in ("moeut_deepseek", "sut", "du_every2"):
        model = build_model(SMALL[name]).eval()
        stats = RoutingStats.from_config(model.config)
        with torch.no_grad():
            stats.update(model(torch.randint(0, V, (2, 7)), collect_routing=True).routing)
        assert all(math.isfinite(v) for v in stats.compute().values() if isinstance(v, float))
    dense = build_model(SMALL["dense"]).eval()
    rec = dense(torch.randint(0, V, (1, 5)), collect_routing=True).routing[3]
    assert rec.mlp_idx is None and rec.update_norm.shape == (1, 5) and (rec.l, rec.g, rec.r) == (3, 3, 0)


@pytest.mark.parametrize("name", ["sut", "du_every2", "naive_ut", "deepseek"])
def test_checkpoint_round_trip(name, tmp_path):
    cfg = SMALL[name]
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "checkpoints", 3, model, cfg)
    loaded = load_model(path)
    assert type(loaded.model) is type(model) and loaded.config == cfg
    ids = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(ids).logits, model(ids).logits)


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="moe_n_shared"):
        get_preset("tiny", mlp_type="deepseek", moe_n_shared=4)
    with pytest.raises(ValueError, match="moe_device_groups"):
        get_preset("tiny", mlp_type="deepseek", moe_n_shared=1, moe_device_groups=4)
    with pytest.raises(ValueError, match="att_expert_size"):
        dataclasses.replace(SMALL["sut"], att_expert_size=48)
    with pytest.raises(ValueError, match="moe_every"):
        dataclasses.replace(SMALL["du_every2"], moe_every=5)
    with pytest.raises(ValueError, match="moe_capacity_factor"):
        get_preset("tiny", mlp_type="switch", moe_capacity_factor=-1.0)
