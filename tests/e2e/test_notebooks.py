"""The analysis notebooks: only the jupytext notebooks of analysis/ are executed (not the plain
scripts next to them, issue 14.5), and the notebook commands of docs/analysis.md run as written on
CPU with the dev extras (issue 17). Needs no ../shared data."""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moeut.analysis import notebooks as Z

REPO = Path(__file__).resolve().parents[2]
ANALYSIS = REPO / "analysis"


def test_only_jupytext_notebooks_are_sources():
    # Independent reference: the committed .ipynb files are exactly the paired notebooks.
    paired = {p.stem for p in ANALYSIS.glob("*.ipynb")}
    assert paired >= {"expert_usage", "attention_and_norms"}
    assert {Path(p).stem for p in Z.notebook_sources()} == paired
    scripts = [p for p in ANALYSIS.glob("*.py") if p.stem not in paired]
    assert not any(Z.is_notebook_source(str(p)) for p in scripts)
    # a plain script is not a notebook source
    assert not Z.is_notebook_source(str(REPO / "moeut" / "analysis" / "compare.py"))


def test_execute_notebooks_refuses_a_plain_script(tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("jupytext")
    with pytest.raises(ValueError, match=r"not jupytext notebook sources: .*compare\.py"):
        Z.execute_notebooks(str(tmp_path), str(tmp_path / "out"), [str(REPO / "moeut" / "analysis" / "compare.py")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no jupytext notebook sources"):
        Z.notebook_sources(str(tmp_path))


def test_notebook_paths_resolve_from_where_the_user_stands(tmp_path, monkeypatch):
    from moeut.analysis.stats import notebook_dirs, user_path
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "stats").mkdir()
    monkeypatch.chdir(ANALYSIS)  # where a notebook kernel runs
    env = {"PWD": str(tmp_path), "MOEUT_RUN_DIR": "runs/x"}
    assert notebook_dirs(env) == (str(tmp_path / "runs" / "x"), str(tmp_path / "runs" / "x" / "analysis"))
    env["MOEUT_ANALYSIS_DIR"] = "stats"
    assert notebook_dirs(env)[1] == str(tmp_path / "stats")
    assert user_path("/abs/p", env) == "/abs/p"
    assert user_path("runs/x", {}) == str(ANALYSIS / "runs" / "x")  # no $PWD: the current directory
    with pytest.raises(FileNotFoundError, match=r"^MOEUT_RUN_DIR=runs/y: no such directory \(" + re.escape(str(tmp_path))):
        notebook_dirs({"PWD": str(tmp_path), "MOEUT_RUN_DIR": "runs/y"})
    with pytest.raises(ValueError, match="MOEUT_RUN_DIR: not set"):
        notebook_dirs({"PWD": str(tmp_path)})


def _doc_commands():
    """The runnable notebook commands of docs/analysis.md's Notebooks section (jupyter lab is
    interactive, jupytext --sync rewrites the repository: both are left out)."""
    text = (REPO / "docs" / "analysis.md").read_text()
    section = text[text.index("## Notebooks"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    cmds = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [c for c in cmds if c and "jupyter lab" not in c and "--sync" not in c]


@pytest.mark.slow
def test_documented_notebook_commands_run(tmp_path):
    pytest.importorskip("nbconvert")  # `jupytext --execute` needs it (in the dev extras)
    import torch

    from moeut.checkpoint import save_checkpoint
    from moeut.registry import build_model, get_preset
    from moeut.data.tokenizer import train_tokenizer
    words = "the cat dog bird sat ran over under a mat tree house river red green small big old".split()

    def text(n, seed):
        r = random.Random(seed)
        return " ".join(" ".join(r.choice(words) for _ in range(r.randint(5, 12))).capitalize() + "."
                        for _ in range(n))
    tok = train_tokenizer([text(20, s) for s in range(40)], vocab_size=160, hard_vocab_limit=False)
    torch.manual_seed(0)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size)
    # A directory laid out like the repository root, so the documented commands run literally
    # (relative `runs/x`, `analysis/...`) from a cwd that is not analysis/.
    (tmp_path / "analysis").symlink_to(ANALYSIS, target_is_directory=True)
    run = tmp_path / "runs" / "x"
    save_checkpoint(run / "checkpoints", 5, build_model(cfg), cfg, tokenizer=tok)
    with open(run / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "train/loss": 5.0 - step, "moe/g0/usage_rel_ppl": 0.9}) + "\n")
    (tmp_path / "valid.txt").write_text(text(200, 7))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    env.pop("MOEUT_RUN_DIR", None), env.pop("MOEUT_ANALYSIS_DIR", None)
    # the statistics the notebooks read ("analyse the run first")
    subprocess.run([sys.executable, "-m", "moeut.analysis", "routing", "checkpoint=runs/x", "data.path=valid.txt",
                    "seq_len=16", "max_tokens=1024", "batch_size=8", "device=cpu", "figures.formats=[png]",
                    "figures.dpi=30"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)

    cmds = _doc_commands()
    assert any("execute_notebooks=true" in c for c in cmds) and any("jupytext --execute" in c for c in cmds), cmds
    for cmd in cmds:  # as written in the docs
        res = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{cmd}\n{res.stderr[-3000:]}"
    out_nb = run / "analysis" / "expert_usage.ipynb"  # the jupytext command's -o
    executed = sorted((run / "analysis" / "notebooks").glob("*.ipynb")) + [out_nb]
    assert {p.name for p in executed} == {"attention_and_norms.ipynb", "expert_usage.ipynb"}
    for path in executed:
        nb = json.loads(path.read_text())
        outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o["output_type"] == "error"], path
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{path}: no figure rendered"
