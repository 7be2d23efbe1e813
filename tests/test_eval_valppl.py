"""The results table's val PPL column: the run's own validation set wins over extra ones."""
import json

from moeut.eval.zeroshot import read_val_perplexity


def test_main_validation_set_preferred(tmp_path):
    rows = [{"step": 10, "train/loss": 5.0},
            {"step": 200, "validation/val/perplexity": 250.0, "validation/c4/perplexity": 500.0},
            {"step": 610, "validation/val/perplexity": 145.9, "validation/c4/perplexity": 332.9},
            {"step": 610, "garbage/perplexity": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    assert read_val_perplexity(str(tmp_path), 610) == 145.9
    assert read_val_perplexity(str(tmp_path), 200) == 250.0
    assert read_val_perplexity(str(tmp_path)) == 145.9
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "validation/c4/perplexity": 7.0}) + "\n")
    assert read_val_perplexity(str(tmp_path)) == 7.0  # only an extra set: still reported
