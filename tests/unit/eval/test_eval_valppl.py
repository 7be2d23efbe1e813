"""The results table's val PPL column: the run's own validation set wins over extra ones; the
metrics file is read under moeut.rundir's corrupt-line policy."""
import json

import pytest

from moeut.eval.zeroshot import read_val_perplexity
from moeut.rundir import CorruptRunFile, TruncatedLineWarning


def test_main_validation_set_preferred(tmp_path):
    rows = [{"step": 10, "train/loss": 5.0},
            {"step": 200, "validation/val/perplexity": 250.0, "validation/c4/perplexity": 500.0},
            {"step": 610, "validation/val/perplexity": 145.9, "validation/c4/perplexity": 332.9},
            {"step": 610, "garbage/perplexity": 1.0}]
    body = "\n".join(json.dumps(r) for r in rows) + "\n"
    # a cut last line (no newline: the run was killed mid-write) is skipped with a named warning
    (tmp_path / "metrics.jsonl").write_text(body + '{"step": 700, "validation/val/perplexity": 1')
    with pytest.warns(TruncatedLineWarning, match=r"metrics\.jsonl:5: skipping unparsable last line"):
        assert read_val_perplexity(str(tmp_path), 610) == 145.9
    (tmp_path / "metrics.jsonl").write_text(body)
    assert read_val_perplexity(str(tmp_path), 200) == 250.0
    # a checkpoint whose step had no validation gets none: not the later step's 145.9, nor 250.0
    assert read_val_perplexity(str(tmp_path), 300) is None
    assert read_val_perplexity(str(tmp_path)) == 145.9
    # a complete line of garbage is not a crash artefact: an error naming file:line
    (tmp_path / "metrics.jsonl").write_text(body + "not json\n")
    with pytest.raises(CorruptRunFile, match=r"metrics\.jsonl:5: not valid JSON"):
        read_val_perplexity(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "validation/c4/perplexity": 7.0}) + "\n")
    assert read_val_perplexity(str(tmp_path)) == 7.0  # only an extra set: still reported
    (tmp_path / "metrics.jsonl").unlink()
    assert read_val_perplexity(str(tmp_path)) is None  # no metrics file: no value, no error
