"""Legend labels of `python -m moeut.analysis curves`: each curve is labelled by what differs between
the runs (the differing overrides, from .hydra/overrides.yaml or a sweep job's folder name), or by
the run dir's name when nothing else differs; the command prints the full run dirs beside the labels.
Expected labels are written by hand."""
import json

import pytest
import yaml

from moeut.analysis.curves import CurvesOptions, legend_labels, plot_curves, split_overrides, work


def make_run(path, overrides=None, n=3):
    path.mkdir(parents=True)
    recs = [{"step": s, "train/loss": 5.0 - s, "train/tokens_seen": 1000 * s} for s in range(1, n + 1)]
    recs.append({"step": n, "validation/val/perplexity": 100.0, "validation/c4/perplexity": 120.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    if overrides is not None:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return str(path)


def test_sweep_jobs_differing_in_one_override(tmp_path):
    a = make_run(tmp_path / "experiment=cpu_result_moeut,optim.lr=0.001")
    b = make_run(tmp_path / "experiment=cpu_result_moeut,optim.lr=0.004")
    assert legend_labels([a, b]) == (["optim.lr=0.001", "optim.lr=0.004"], ["experiment=cpu_result_moeut"])


def test_time_stamp_runs_differing_in_one_saved_override(tmp_path):
    common = ["train.threads=1", "experiment=cpu_small", "optim.lr=0.001"]
    a = make_run(tmp_path / "cpu_small" / "2026-11-30_05-49-25", common + ["train.seed=1"])
    b = make_run(tmp_path / "cpu_small" / "2026-11-30_06-10-02", common[:2] + ["train.seed=2", common[2]])
    assert legend_labels([a, b]) == (["train.seed=1", "train.seed=2"], common)


def test_a_run_without_the_differing_override_says_default(tmp_path):
    a = make_run(tmp_path / "a" / "0", ["experiment=cpu_result_moeut"])
    b = make_run(tmp_path / "b" / "0", ["experiment=cpu_result_moeut", "optim.warmup=75", "train.steps=150"])
    c = make_run(tmp_path / "c" / "0", ["experiment=cpu_result_moeut", "train.steps=150"])
    labels, shared = legend_labels([a, b, c])
    assert labels == ["optim.warmup=default train.steps=default", "optim.warmup=75 train.steps=150", "train.steps=150"]
    assert shared == ["experiment=cpu_result_moeut"]


def test_nothing_differs_gives_the_run_dir_names(tmp_path):
    a = make_run(tmp_path / "results" / "moeut_s0")
    b = make_run(tmp_path / "results" / "dense_params_s0")
    assert legend_labels([a, b]) == (["moeut_s0", "dense_params_s0"], [])
    c = make_run(tmp_path / "x" / "s0", ["train.seed=0"])
    d = make_run(tmp_path / "y" / "s0", ["train.seed=0"])
    assert legend_labels([c, d]) == (["x/s0", "y/s0"], ["train.seed=0"])  # same names: their parents too
    e = make_run(tmp_path / "cpu_small" / "2026-11-30_05-49-25")
    assert legend_labels([e]) == (["cpu_small/2026-11-30_05-49-25"], [])  # one run: a time stamp with its parent


def test_long_path_values_show_their_last_component(tmp_path):
    a = make_run(tmp_path / "a", ["data=local", "data.path=/data/corpora/2026/books_v1"])
    b = make_run(tmp_path / "b", ["data=local", "data.path=/data/corpora/2026/c4_mirror"])
    assert legend_labels([a, b])[0] == ["data.path=.../books_v1", "data.path=.../c4_mirror"]
    c = make_run(tmp_path / "c", ["data.path=/mnt/one/same"])
    d = make_run(tmp_path / "d", ["data.path=/mnt/two/same"])  # the last components agree: kept whole
    assert legend_labels([c, d])[0] == ["data.path=/mnt/one/same", "data.path=/mnt/two/same"]


@pytest.mark.parametrize("name, items", [
    ("experiment=x,optim.lr=0.001", ["experiment=x", "optim.lr=0.001"]),
    ("a=[1,2],b='x,y',c={k:1,j:2}", ["a=[1,2]", "b='x,y'", "c={k:1,j:2}"]),
    ("moeut_s0", []), ("2026-11-30_05-49-25", []), ("a=1,b", []), ("=1", []),
])
def test_split_overrides_by_hand(name, items):
    assert split_overrides(name) == items


def test_the_figure_legend_and_the_printed_key(tmp_path, capsys):
    a = make_run(tmp_path / "experiment=cpu_result_moeut,optim.lr=0.001")
    b = make_run(tmp_path / "experiment=cpu_result_moeut,optim.lr=0.004")
    work(CurvesOptions(runs=[a, b], out=str(tmp_path / "fig"), smooth=1))
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["optim.lr=0.001", a] and out[1].split() == ["optim.lr=0.004", b]
    assert out[2] == "shared by every run: experiment=cpu_result_moeut"
    import matplotlib.figure  # the legend of the figure plot_curves draws: the same labels
    captured = []
    orig = matplotlib.figure.Figure.savefig
    try:
        matplotlib.figure.Figure.savefig = lambda fig, *a, **k: captured.append(fig)
        plot_curves([a, b], str(tmp_path / "g"), smooth_k=1)
    finally:
        matplotlib.figure.Figure.savefig = orig
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in captured[0].axes]
    assert legends == [["optim.lr=0.001", "optim.lr=0.004"]] * 3


def test_compare_plot_labels_points_and_lines_by_what_differs(tmp_path):
    """moeut.analysis compare's figure uses the same labels; its tables keep Run.name (the full name)."""
    import matplotlib.figure

    from moeut.analysis.compare import Run, plot_speed_accuracy
    runs = []
    for lr in ("0.001", "0.004"):
        path = make_run(tmp_path / f"experiment=cpu_result_moeut,optim.lr={lr}")
        runs.append(Run(name=f"experiment=cpu_result_moeut,optim.lr={lr}", path=path, macs_per_token=1e6,
                        tokens_per_step=1e3, step_time=0.5, steps=3, val=[(1, 200.0), (3, 100.0)]))
    captured = []
    orig = matplotlib.figure.Figure.savefig
    try:
        matplotlib.figure.Figure.savefig = lambda fig, *a, **k: captured.append(fig)
        plot_speed_accuracy(runs, "val_ppl", str(tmp_path / "speed"))
    finally:
        matplotlib.figure.Figure.savefig = orig
    axes = captured[0].axes
    assert [t.get_text() for t in axes[0].texts] == ["optim.lr=0.001", "optim.lr=0.004"]
    for ax in axes[1:]:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["optim.lr=0.001", "optim.lr=0.004"]


def test_long_labels_wrap_and_a_panel_without_data_says_so(tmp_path):
    """A label longer than LABEL_WIDTH is wrapped in the legend (same words); a validation key no run
    logged gets a text instead of an empty panel and an empty legend."""
    import matplotlib.figure
    from moeut.analysis.curves import LABEL_WIDTH
    long = ["train.alarm.enabled=false", "optim.grad_clip=null", "train.final_eval=false", "model.router_zloss=0.001"]
    a = make_run(tmp_path / "a", overrides=long)
    b = make_run(tmp_path / "b", overrides=["model.router_zloss=0.01"])
    captured = []
    orig = matplotlib.figure.Figure.savefig
    try:
        matplotlib.figure.Figure.savefig = lambda fig, *x, **k: captured.append(fig)
        plot_curves([a, b], str(tmp_path / "g"), smooth_k=1, val_keys=["validation/val/perplexity", "validation/nope"],
                    val_names=["books", "nothing"])
    finally:
        matplotlib.figure.Figure.savefig = orig
    train_ax, val_ax, empty_ax = captured[0].axes
    texts = [t.get_text() for t in train_ax.get_legend().get_texts()]
    assert texts[0].split() == " ".join(long).split() and all(len(x) <= LABEL_WIDTH for x in texts[0].splitlines())
    assert len(texts[0].splitlines()) > 1
    assert empty_ax.get_legend() is None and not empty_ax.lines
    assert [t.get_text() for t in empty_ax.texts] == ["no run logged\nvalidation/nope"]
    assert val_ax.get_legend() is not None
