"""moeut.analysis.collapse: the probed run is the real run (bit-exact losses against an unprobed
run of the same config), the gradient split adds up to the total gradient, and the probe's
statistics and the "what moves first" detection against hand computations."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeut.analysis import collapse as col

TINY = ["experiment=cpu_tiny", "train.steps=6", "train.threads=1", "train.routing_every=1",
        "train.routing_interval=2"]


@pytest.fixture
def tiny_tc(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEUT_CACHE", str(tmp_path / "cache"))
    return lambda extra=(): col.compose_train_config(TINY + list(extra))


def test_probed_run_losses_equal_an_unprobed_run_bit_for_bit(tiny_tc):
    probed = col.probed_run(tiny_tc(), 4, split_every=1, probes=True, log=lambda m: None)
    plain = col.probed_run(tiny_tc(), 4, split_every=0, probes=False, log=lambda m: None)
    assert plain["loss"].tolist() == probed["loss"].tolist()  # exact, not approx
    assert plain["grad_norm"].tolist() == probed["grad_norm"].tolist()
    assert np.all(np.isfinite(probed["loss"])) and len(probed["loss"]) == 4
    # the side pass's CE + reg gradient is the real step's gradient (the tensor hook's), fp32 order aside
    errs = [v for k, v in probed.items() if k.endswith("/split_err")]
    assert errs and max(float(np.nanmax(e)) for e in errs) < 1e-5


def test_gradient_split_sums_to_the_total_gradient(tiny_tc):
    from moeut.registry import build_model
    tc = tiny_tc()
    torch.manual_seed(0)
    model = build_model(tc.model).train()
    window = torch.randint(0, tc.model.vocab_size, (4, 17))
    rng = torch.get_rng_state()
    split = col.split_gradients(model, window, None, torch.device("cpu"))
    assert torch.get_rng_state().equal(rng)  # the side pass leaves the run's random stream as it was
    assert set(split) == set(col.gate_params(model)) and len(split) == 3 * tc.model.group_size
    # the reference: one plain backward of CE + reg (what train_step does), and of each term alone
    out = model(window[:, :-1])
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), window[:, 1:].flatten())
    (ce + out.reg_loss).backward()
    for name, p in col.gate_params(model).items():
        total = split[name]["ce"] + split[name]["reg"]
        torch.testing.assert_close(total, p.grad, rtol=1e-5, atol=1e-8)
        assert split[name]["reg"].norm() > 0  # the entropy regulariser reaches every gate
    model.zero_grad()
    out = model(window[:, :-1])
    out.reg_loss.backward()
    for name, p in col.gate_params(model).items():
        torch.testing.assert_close(split[name]["reg"], p.grad, rtol=1e-5, atol=1e-10)


def test_gate_probe_statistics_by_hand():
    probe = col.GateProbe({"mlp": 2, "att_v": 1, "att_o": 1})
    z = torch.tensor([[[0.0, 1.0, -1.0, 2.0], [3.0, -2.0, 0.5, 0.0]]])  # [B=1, T=2, E=4]
    probe.record("mlp", 0, z)
    s = probe.summary()
    v = z.flatten().double()
    assert s["mlp_g0/z_mean"] == pytest.approx(float(v.mean()))
    assert s["mlp_g0/z_std"] == pytest.approx(float(v.std(unbiased=False)))
    assert s["mlp_g0/z_max"] == 3.0
    sig = lambda x: 1 / (1 + math.exp(-x))
    chosen = [sig(2.0), sig(1.0), sig(3.0), sig(0.5)]  # top-2 of each token
    assert s["mlp_g0/gate_mean"] == pytest.approx(sum(chosen) / 4)
    assert s["mlp_g0/gate_min"] == pytest.approx(sig(0.5))
    # selections: experts 3, 1, 0, 2 once each -> uniform usage, perplexity / E = 1
    assert s["mlp_g0/usage"] == pytest.approx(1.0)
    probe.record("mlp", 0, torch.tensor([[[5.0, 4.0, -9.0, -9.0]]]))
    # experts 0 and 1 twice each -> p = (1/2, 1/2, 0, 0): perplexity 2 of 4
    assert probe.summary()["mlp_g0/usage"] == pytest.approx(0.5)


def test_first_departure_by_hand():
    steps = np.arange(1, 21, dtype=float)
    lo = {"step": steps, "loss": np.full(20, 7.0), "mlp_g0/z_std": np.ones(20), "mlp_g0/z_mean": np.zeros(20),
          "x.ffn.expert_sel/rel_update": np.full(20, 0.01)}
    hi = {"step": steps, "loss": np.full(20, 7.0), "mlp_g0/z_std": np.where(steps >= 8, 2.0, 1.0),
          "mlp_g0/z_mean": np.where(steps >= 16, 0.5, 0.01),  # near zero: measured against the std (1)
          "x.ffn.expert_sel/rel_update": np.full(20, 0.02)}  # 2x: explained by the lr ratio alone
    hi["loss"][[3, 12, 13, 14]] = 9.0  # one isolated blip (step 4) then three in a row from step 13
    rows = col.first_departure(lo, hi, 0.25, lr_ratio=2.0)
    table = {r["quantity"]: r["first_step"] for r in rows}
    assert table["mlp/z_std"] == 8
    assert table["mlp/z_mean"] == 16
    assert table["loss"] == 13
    assert table["expert_sel/rel_update"] is None
    assert [r["quantity"] for r in rows][:3] == ["mlp/z_std", "loss", "mlp/z_mean"]  # sorted by first step
    z = next(r for r in rows if r["quantity"] == "mlp/z_std")
    assert z["low"][10] == 1.0 and z["high"][10] == 2.0 and 30 not in z["low"]
