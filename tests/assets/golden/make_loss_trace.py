"""Write tests/assets/golden/loss_trace_tiny.txt: the per-step training losses and the final validation
loss of the 30-step CPU run of preset `tiny` (experiment=cpu_tiny on the carried C4 sample, one
torch thread), which tests/e2e/test_loss_trace.py compares every change against.

Regenerate only when a change is MEANT to move the numbers (say which and why in the commit):
    python tests/assets/golden/make_loss_trace.py
"""
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
TRACE = Path(__file__).resolve().parent / "loss_trace_tiny.txt"
OVERRIDES = ("train.steps=30", "train.threads=1")


def trace_run():
    """Train the tiny run in a temporary folder; returns (per-step losses, final validation loss)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from moeut.paths import conf_dir
    from moeut.train_lib.config import to_typed
    from moeut.train_lib.loop import train

    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as run_dir:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=["experiment=cpu_tiny", "name=trace", "print_config=false",
                                               f"data.cache_dir={cache}", "train.log_interval=1",
                                               "logger.progress=none", *OVERRIDES])
        res = train(to_typed(cfg), run_dir)
    return [float(x) for x in res["losses"]], float(res["validation"]["validation/val/loss"])


def read_trace(path: Path = TRACE):
    """(per-step losses, validation loss) stored in the trace file."""
    losses, val = [], None
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, value = line.split()
        if key == "val":
            val = float(value)
        else:
            assert int(key) == len(losses) + 1, f"{path}: step {key} out of order"
            losses.append(float(value))
    return losses, val


def main():
    import torch

    sys.path.insert(0, str(REPO))
    losses, val = trace_run()
    lines = ["# Per-step training loss (train/loss, CE + regulariser) of `python train.py experiment=cpu_tiny "
             + " ".join(OVERRIDES) + "`", f"# and its final validation loss; written by tests/assets/golden/make_loss_trace.py "
             f"with torch {torch.__version__}.", "# step loss"]
    lines += [f"{i} {x!r}" for i, x in enumerate(losses, 1)] + [f"val {val!r}"]
    TRACE.write_text("\n".join(lines) + "\n")
    print(json.dumps({"steps": len(losses), "last": losses[-1], "val": val}))


if __name__ == "__main__":
    main()
