"""Compute accounting (SPEC §9): the authors' MAC table, parameter closed forms vs built models,
active parameters vs hand counts and vs an enumeration of the real modules, FLOPs conventions,
peak/MFU helpers and the step-time probe."""
import dataclasses

import pytest
import torch

from moeut import compute as C
from moeut.baselines.dense import DenseConfig
from moeut.model_config import MoEUTConfig
from moeut.registry import PRESET_PARAMS, PRESETS, build_model, get_preset
from moeut.baselines.dense import MoETransformerConfig
from moeut.baselines.sut import SUTConfig
from param_formula import param_count_formula

# SPEC 9.2 table: per-token forward MACs at T = 1024 (millions, one decimal) and their ratio.
PAPER_TABLE = {
    "44m": (45.1, 51.3, 0.88), "126m": (92.3, 138.4, 0.67), "244m": (158.5, 264.8, 0.60),
    "319m": (210.2, 353.0, 0.60), "728m": (482.9, 802.2, 0.60), "1040m": (683.8, 1132.5, 0.60),
}


@pytest.mark.parametrize("size", sorted(PAPER_TABLE))
def test_paper_macs_table(size):
    moeut, dense, ratio = PAPER_TABLE[size]
    m = C.macs_per_token(get_preset(f"moeut_{size}"), 1024)
    d = C.macs_per_token(get_preset(f"dense_{size}"), 1024)
    assert round(m / 1e6, 1) == moeut
    assert round(d / 1e6, 1) == dense
    assert round(m / d, 2) == ratio


def test_paper_macs_244m_per_layer_exact():
    cfg = get_preset("moeut_244m")
    assert C.attention_macs_paper(cfg, 1024) == 4_216_832 * 1024
    assert C.mlp_macs_paper(cfg, 1024) == 4_590_592 * 1024
    assert C.model_macs_paper(cfg, 1024) == 18 * (4_216_832 + 4_590_592) * 1024
    assert C.training_macs(cfg, 1024, 64, 10) == C.model_macs_paper(cfg, 1024) * 640


def test_macs_tiny_dense_by_hand():
    cfg = DenseConfig(d_model=8, n_layers=2, n_heads=2, d_head=4, d_ff=16, vocab_size=10)
    T = 3
    # attention 2*H*dh*T^2 + 4*d*H*dh*T = 2*2*4*9 + 4*8*2*4*3 = 144 + 768; MLP 2*8*16*3 = 768
    assert C.model_macs_paper(cfg, T) == 2 * (144 + 768 + 768)
    assert C.macs_per_token(cfg, T, include_head=True) == 2 * (144 + 768 + 768) / 3 + 80


def test_macs_tiny_moeut_by_hand():
    cfg = get_preset("tiny")  # d 64, L 4, H 2, dh 16, E_att 4, k 2, N_E 16, K 4, d_exp 32
    T = 8
    att = 2 * 2 * 16 * 64 + 6 * 64 * 2 * 16 * 8 + 2 * 2 * 2 * 8 * 16 + 2 * 4 * 64 * 8  # 4096+98304+1024+4096
    mlp = 2 * 8 * 64 * 32 * 4 + 8 * 64 * 16  # 131072 + 8192
    assert att == 107_520 and mlp == 139_264
    assert C.model_macs_paper(cfg, T) == 4 * (att + mlp)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_formula_matches_built_model(name):
    cfg = get_preset(name)
    assert param_count_formula(cfg) == C.total_params(cfg)
    if name in PRESET_PARAMS and PRESET_PARAMS[name] % 10_000:  # exact [code] values (not rounded ones)
        assert C.total_params(cfg) == PRESET_PARAMS[name]


def test_active_params_tiny_moeut_by_hand():
    cfg = get_preset("tiny")
    att = 2 * 64 * 2 * 16 + 2 * 2 * 64 * 2 * 16 + 2 * 2 * 4 * 64  # 4096 + 8192 + 1024
    mlp = 2 * 4 * 64 * 32 + 16 * 64  # 16384 + 1024
    assert C.active_params(cfg) == 4 * (att + mlp) + 64 * 512 == 155_648
    assert C.active_params(cfg, include_head=False) == 122_880


def _active_by_enumeration(model, cfg) -> float:
    """Independent reference: walk the real modules; a bank of E experts with k active per token
    counts k/E of its parameters; gates/routers count fully; each application of a shared layer
    counts again; head weight counts; embedding, norms and biases do not."""
    total = model.lm_head.weight.numel()
    if isinstance(cfg, MoEUTConfig):
        for layer in model.transformer.layers:
            a = layer.attention
            n = a.q.weight.numel() + a.k.weight.numel() + a.sel_v.numel() + a.sel_o.numel()
            n += (a.v.numel() + a.o.numel()) * cfg.att_k / cfg.att_n_experts
            f = layer.ffn
            if cfg.mlp_type == "deepseek":
                n += f.centroids.numel() + f.shared_keys.numel() + f.shared_values.numel()
                n += (f.experts.keys.numel() + f.experts.values.numel()) * f.k_routed / f.n_routed
            elif cfg.mlp_type == "switch":
                n += f.router.numel() + (f.experts.keys.numel() + f.experts.values.numel()) * cfg.ff_k / cfg.ff_n_experts
            else:
                n += f.expert_sel.numel() + (f.keys.numel() + f.values.numel()) * cfg.ff_k / cfg.ff_n_experts
            total += n * cfg.n_repeats
        return total
    for layer in model.layers:  # dense / moe_transformer (no sharing unless naive UT)
        a = layer.attention
        n = a.q.weight.numel() + a.kv.weight.numel() + a.o.weight.numel()
        f = layer.ffn
        if hasattr(f, "up"):
            n += f.up.weight.numel() + f.down.weight.numel()
        else:
            n += f.router.numel() + (f.experts.keys.numel() + f.experts.values.numel()) * cfg.ff_k / cfg.ff_n_experts
        total += n * cfg.n_repeats
    return total


@pytest.mark.parametrize("name", ["tiny", "mini", "cpu_sigma_moe", "cpu_switch", "cpu_deepseek",
                                  "cpu_moeut_deepseek", "cpu_dense", "cpu_naive_ut", "cpu_du_every2"])
def test_active_params_match_module_enumeration(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = build_model(cfg)
    assert C.active_params(cfg) == pytest.approx(_active_by_enumeration(model, cfg), abs=1e-6)


def test_sut_active_params_by_hand():
    cfg = SUTConfig(d_model=8, n_layers=3, ff_n_experts=4, ff_expert_size=6, ff_k=2, att_n_experts=3,
                    att_expert_size=4, att_k=2, d_head=2, vocab_size=10)
    att = 2 * 8 * 4 + 2 * 2 * 8 * 4 + 64 + 3 * 8  # shared K,V + k experts' Q,O + router
    mlp = 2 * 2 * 8 * 6 + 64 + 4 * 8
    halt = 64 + 16
    assert C.active_params(cfg) == 3 * (att + mlp + halt) + 80


def test_flops_conventions():
    cfg = get_preset("dense_44m")
    # Dense: both conventions are the same count (full T^2, head included, no router).
    assert C.flops_per_token(cfg, 1024, "paper") == pytest.approx(C.flops_per_token(cfg, 1024, "nanogpt"))
    m = get_preset("moeut_44m")
    want = 6 * C.active_params(m) + 12 * 16 * 4 * 82 * 1024
    assert C.flops_per_token(m, 1024, "nanogpt") == want
    assert C.flops_per_token(m, 1024, "paper") == 6 * (C.macs_per_token(m, 1024) + 412 * 8000)
    with pytest.raises(ValueError, match="convention"):
        C.flops_per_token(m, 1024, "palm")


def test_deepseek_2b_preset_reproduces_paper_totals():
    """DeepSeekMoE Table 1: 2.0B total / 0.3B activated, 4.3T FLOPs per 2K tokens; the dense
    backbone 0.2B and 2.9T. Checks the [verify] FFN-width choice of the preset."""
    cfg = get_preset("deepseek_2b")
    assert C.total_params(cfg) / 1e9 == pytest.approx(2.0, abs=0.05)
    assert C.active_params(cfg) / 1e9 == pytest.approx(0.3, abs=0.02)
    assert C.flops_per_token(cfg, 2048) * 2048 / 1e12 == pytest.approx(4.3, abs=0.1)
    dense = DenseConfig(d_model=1280, n_layers=9, n_heads=10, d_head=128, d_ff=5120)
    assert C.total_params(dense) / 1e9 == pytest.approx(0.2, abs=0.01)
    assert C.flops_per_token(dense, 2048) * 2048 / 1e12 == pytest.approx(2.9, abs=0.05)


def test_peak_flops_and_mfu():
    assert C.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert C.peak_flops("NVIDIA H200") == 989e12
    assert C.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert C.peak_flops("Tesla V100") is None
    assert C.peak_flops("cpu") is None
    assert C.mfu(1e5, 3e8, 989e12) == pytest.approx(1e5 * 3e8 / 989e12)
    assert C.mfu(1e5, 3e8, None) is None


def test_measure_step_time_runs_and_updates(monkeypatch):
    torch.set_num_threads(1)
    cfg = DenseConfig(d_model=32, n_layers=2, n_heads=2, d_head=16, d_ff=64, vocab_size=64)
    model = build_model(cfg)
    before = model.lm_head.weight.detach().clone()
    r = C.measure_step_time(model, torch.randint(0, 64, (2, 17)), n_warmup=1, n_iters=3)
    assert r["step_time_s"] > 0 and r["tokens_per_s"] == pytest.approx(32 / r["step_time_s"])
    assert not torch.equal(before, model.lm_head.weight)
    with pytest.raises(ValueError, match="batch"):
        C.measure_step_time(model, torch.randint(0, 64, (17,)))


def test_summarize_keys():
    s = C.summarize(get_preset("sut_44m"))
    assert set(s) == {"params_total", "params_active", "macs_per_token", "macs_per_token_with_head",
                      "flops_per_token", "flops_per_token_nanogpt"}
    assert 44e6 < s["params_total"] < 45e6


# ------------------------------------------------------------------------------------------
# analysis/compare.py on fabricated run dirs
# ------------------------------------------------------------------------------------------

import importlib.util
import json
import math
import sys
from pathlib import Path


def _compare_module():
    path = Path(__file__).resolve().parents[1] / "analysis" / "compare.py"
    spec = importlib.util.spec_from_file_location("analysis_compare", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["analysis_compare"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _fake_run(root, name, cfg, vals, tokens_per_step, tps=None, step_time_json=None, eval_tasks=None, bad_tail=False):
    from moeut.checkpoint import save_checkpoint
    run = root / name
    with torch.device("meta"):
        model = build_model(cfg)
    # Only the config is read by compare.py: save an empty state dict through the real writer.
    model.state_dict = lambda: {}
    last = max(s for s, _ in vals)
    save_checkpoint(run / "checkpoints", last, model, cfg, meta={"tokens_seen": last * tokens_per_step})
    with open(run / "metrics.jsonl", "w") as f:
        for s, p in vals:
            rec = {"step": s, "time": 1.0 * s, "train/loss": math.log(p), "train/tokens_seen": s * tokens_per_step}
            if tps:
                rec["train/tokens_per_s"] = tps
            f.write(json.dumps(rec) + "\n")
            f.write(json.dumps({"step": s, "validation/val/perplexity": p}) + "\n")
        if bad_tail:
            f.write('{"step": 999, "validation/val/perp')  # killed mid-write
    if step_time_json is not None:
        (run / "step_time.json").write_text(json.dumps({"step_time_s": step_time_json}))
    if eval_tasks is not None:
        (run / "eval").mkdir()
        (run / "eval" / "results_step_0000100.json").write_text(
            json.dumps({"step": 100, "tasks": eval_tasks, "table_row": {}}))  # as moeut.evaluate writes
    return run


def test_interpolate_log_by_hand():
    cmp = _compare_module()
    pts = [(10.0, 100.0), (1000.0, 40.0)]
    assert cmp.interpolate_log(pts, 100.0) == pytest.approx(70.0)  # halfway in log space
    assert cmp.interpolate_log(pts, 10.0) == 100.0
    assert math.isnan(cmp.interpolate_log(pts, 5.0)) and math.isnan(cmp.interpolate_log(pts, 2000.0))


def test_compare_tables_from_run_dirs(tmp_path, capsys):
    cmp = _compare_module()
    dense_cfg = get_preset("cpu_dense", vocab_size=512)
    moe_cfg = get_preset("cpu_sigma_moe", vocab_size=512)
    a = _fake_run(tmp_path, "dense", dense_cfg, [(50, 100.0), (100, 50.0)], 64, tps=640.0,
                  eval_tasks={"piqa": {"accuracy": 0.6}, "arc_easy": {"accuracy": 0.4, "n": 100}}, bad_tail=True)
    b = _fake_run(tmp_path, "moe", moe_cfg, [(10, 150.0), (50, 80.0), (100, 40.0)], 64, step_time_json=0.4)
    # the cut last line of dense's metrics.jsonl: skipped, named, counted (moeut.rundir policy)
    with pytest.warns(UserWarning, match=r"dense/metrics\.jsonl:5: skipping unparsable last line.*1 line skipped"):
        res = cmp.compare([str(a), str(b)], str(tmp_path / "out"), seq_len=32)
    ra, rb = res["_runs"]
    assert ra.params == C.total_params(dense_cfg) and rb.params == C.total_params(moe_cfg)
    assert ra.macs_per_token == C.macs_per_token(dense_cfg, 32)
    assert (ra.step_time, ra.step_time_source) == (pytest.approx(0.1), "tokens/s")  # 64 tokens / 640 tok/s
    assert (rb.step_time, rb.step_time_source) == (0.4, "measured")
    assert ra.final_ppl == 50.0 and ra.steps == 100 and ra.tokens == 6400
    assert ra.eval["eval/mean_acc"] == pytest.approx(0.5) and ra.eval["piqa/accuracy"] == 0.6
    # Iso-MAC: the budget is the smaller final training-MAC count; the other run is interpolated.
    macs = {r.name: r.macs_per_token * 6400 for r in (ra, rb)}
    low, high = sorted(macs, key=macs.get)
    assert res["mac_budget"] == pytest.approx(macs[low])
    r_high = ra if high == "dense" else rb
    pts = [(r_high.macs_per_token * 64 * s, p) for s, p in r_high.val]
    x = macs[low]
    want = float("nan")
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            want = y0 + (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) * (y1 - y0)
    got = {d["name"]: d["val_ppl_at_mac_budget"] for d in res["runs"]}
    assert got[high] == pytest.approx(want) if math.isfinite(want) else math.isnan(got[high])
    # Iso-step-time: dense 100 x 0.1 s = 10 s, moe 100 x 0.4 s = 40 s -> budget 10 s = moe step 25,
    # between step 10 (4 s, ppl 150) and step 50 (20 s, ppl 80).
    assert res["time_budget"] == pytest.approx(10.0)
    w = (math.log(10) - math.log(4)) / (math.log(20) - math.log(4))
    by_name = {d["name"]: d for d in res["runs"]}
    assert by_name["moe"]["val_ppl_at_time_budget"] == pytest.approx(150 + w * (80 - 150))
    assert by_name["dense"]["val_ppl_at_time_budget"] == pytest.approx(50.0)
    # Iso-parameter groups: 0.92M vs 1.32M parameters (vocabulary 512) are 43 % apart.
    assert len(cmp.iso_param_groups([ra, rb], 0.05)) == 2 and len(cmp.iso_param_groups([ra, rb], 0.5)) == 1
    for f in ("summary.md", "summary.csv", "summary.json", "iso_param.md", "iso_mac.md", "iso_step_time.md",
              "speed_accuracy.png", "speed_accuracy.pdf"):
        assert (tmp_path / "out" / f).stat().st_size > 0, f
    assert "| moe |" in (tmp_path / "out" / "iso_step_time.md").read_text()


def test_compare_missing_config_names_the_dir(tmp_path):
    cmp = _compare_module()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        cmp.load_run(str(tmp_path / "empty"))
