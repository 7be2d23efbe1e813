"""Every knock-out row of `moeut.analysis knockout` says where and what it removed, in the same
columns: single experts, hand-given groups and whole branches carry the layer application (l, g, r;
"all" repetitions for scope=unique) and the experts ("all" for a branch, "e+e" for a group) in
knockout.csv, and groups and branches are listed in report.md's table. Checked on a hand-made run
(preset tiny, random windows) against a hand-written forward: the group's loss change and usage."""
import csv
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeut.analysis.evalset import EvalSet
from moeut.analysis.knockout import KnockoutOptions, analyse
from moeut.analysis.probe import run_layers
from moeut.registry import build_model, get_preset

V, T = 256, 12
ORDER = [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]  # tiny: G = 2 unique layers, R = 2 repetitions


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(get_preset("tiny", vocab_size=V)).eval()
    assert list(m.execution_order()) == ORDER
    return m


@pytest.fixture(scope="module")
def windows():
    rng = np.random.default_rng(0)
    return {"a": rng.integers(0, V, (3, T + 1)), "b": rng.integers(0, V, (2, T + 1))}


def evalset(model, windows, out_dir):
    loaded = SimpleNamespace(model=model, config=model.config, path="hand-made/step_0000007", meta={"step": 7})
    return EvalSet(loaded=loaded, run_dir=str(out_dir), out_dir=str(out_dir), run="hand-made", seq_len=T,
                   windows=windows, device=torch.device("cpu"))


def run_knockout(model, windows, out_dir, **kw):
    opts = KnockoutOptions(checkpoint="hand-made", kinds=["mlp"], batch_size=2, knockouts_per_forward=6,
                           device="cpu", formats=["png"], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the max_experts sample note
        analyse(evalset(model, windows, out_dir), opts)
    with open(out_dir / "knockout" / "knockout.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["target"]: r for r in rows}, (out_dir / "report.md").read_text()


@torch.no_grad()
def mean_ce(model, w, knockouts=None):
    x, y = torch.from_numpy(w[:, :-1]), torch.from_numpy(w[:, 1:])
    logits = run_layers(model, x, knockouts=knockouts)[0] if knockouts else model(x).logits
    return float(F.cross_entropy(logits.double().reshape(-1, V), y.reshape(-1)))


@pytest.fixture(scope="module")
def application(model, windows, tmp_path_factory):
    out = tmp_path_factory.mktemp("ko")
    return run_knockout(model, windows, out, max_experts=2, groups=["mlp/1/0+2", "att_v/3/1"])


def test_group_and_branch_rows_carry_where_and_what(application):
    rows, _ = application
    cols = lambda r: (r["what"], r["kind"], r["l"], r["g"], r["r"], r["expert"])  # noqa: E731
    assert cols(rows["group mlp/1/0+2"]) == ("group", "mlp", "1", "1", "0", "0+2")
    assert cols(rows["group att_v/3/1"]) == ("group", "att_v", "3", "1", "1", "1")
    for l, g, r in ORDER:
        row = rows[f"mlp g{g} r{r} all experts"]
        assert cols(row) == ("branch", "mlp", str(l), str(g), str(r), "all") and row["usage"] == "1.00000"
    singles = [r for r in rows.values() if r["what"] == "expert"]
    assert len(singles) == 2 and len(rows) == 2 + 4 + 2
    for row in singles:  # the same columns, all filled: layer application and expert
        l = int(row["l"])
        assert (int(row["g"]), int(row["r"])) == ORDER[l][1:] and 0 <= int(row["expert"]) < 16


def test_group_numbers_match_a_hand_written_forward(model, windows, application):
    rows, _ = application
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[0, 2]] = True
    for name, w in windows.items():
        want = mean_ce(model, w, {1: {"mlp": mask}}) - mean_ce(model, w)
        assert float(rows["group mlp/1/0+2"][f"delta_{name}"]) == pytest.approx(want, abs=2e-6)
    with torch.no_grad():  # usage: the group's share of layer application 1's MLP selections, both sources
        idx = torch.cat([model(torch.from_numpy(w[:, :-1]), collect_routing=True).routing[1].mlp_idx.reshape(-1)
                         for w in windows.values()])
    share = float(((idx == 0) | (idx == 2)).double().mean())
    assert float(rows["group mlp/1/0+2"]["usage"]) == pytest.approx(share, abs=1e-5)


def test_report_table_lists_groups_and_branches(application):
    rows, md = application
    table = {ln.split(" | ")[0][2:]: ln.strip("| ").split(" | ") for ln in md.splitlines() if ln.startswith("| ")}
    assert table["knock-out"][:4] == ["knock-out", "what", "layer application", "usage %"]
    assert table["group mlp/1/0+2"][1:3] == ["group", "g1 r0"]
    assert table["group att_v/3/1"][1:3] == ["group", "g1 r1"]
    for l, g, r in ORDER:
        assert table[f"mlp g{g} r{r} all experts"][1:4] == ["branch", f"g{g} r{r}", "100.00"]
    want = f"{float(rows['group mlp/1/0+2']['delta_a']):+.4f}"
    assert table["group mlp/1/0+2"][4] == want
    assert sum(1 for r in table.values() if r[1] == "expert") == 2  # the single experts (both, top 10)


def test_unique_scope_rows_say_all_repetitions(model, windows, tmp_path):
    rows, md = run_knockout(model, windows, tmp_path, scope="unique", max_experts=1, blocks=False)
    (row,) = rows.values()
    assert (row["what"], row["l"], row["r"]) == ("expert", "all", "all") and row["g"] in ("0", "1")
    assert f"| {row['target']} | expert | g{row['g']} (all r) |" in md
