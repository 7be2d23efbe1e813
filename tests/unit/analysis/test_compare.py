"""`python -m moeut.analysis compare` (SPEC 9.4) on fabricated run dirs: parameter/MAC counts
against moeut.compute, step-time sources, the iso-MAC and iso-step-time interpolation by hand."""
import json
import math

import pytest
import torch

from moeut import compute as C
from moeut.analysis import compare as cmp
from moeut.registry import build_model, get_preset



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
    pts = [(10.0, 100.0), (1000.0, 40.0)]
    assert cmp.interpolate_log(pts, 100.0) == pytest.approx(70.0)  # halfway in log space
    assert cmp.interpolate_log(pts, 10.0) == 100.0
    assert math.isnan(cmp.interpolate_log(pts, 5.0)) and math.isnan(cmp.interpolate_log(pts, 2000.0))


def test_compare_tables_from_run_dirs(tmp_path, capsys):
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
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        cmp.load_run(str(tmp_path / "empty"))
