"""Zero-shot evaluation speed: `moeut.evaluate`'s scorer vs a simple unpadded, length-sorted scorer.

    python benchmarks/eval_speed.py                                   # CPU, moeut_44m, limit 10
    python benchmarks/eval_speed.py --device cuda --limit 100
    python benchmarks/eval_speed.py --checkpoint runs/x --tasks blimp,piqa --record docs/benchmarks.md

For each task, the same items are scored side by side, ours first then the simple one, `--rounds`
times (median). "ours" is the whole task (`Task.evaluate`: tokenisation, batching, float64 scores,
metrics); "simple" only scores the already tokenised sequences of that run (sort by length, pad to
the batch's longest, one forward, float32 log_softmax, gather), so ratio = ours / simple is an
upper bound on our overhead. Target (issue 17.6): ratio <= 1.5 on every task. Both must agree:
the script fails when any sequence's log-probability differs by more than --tol.

Without --checkpoint the model is a freshly initialised preset (--preset) and the tokenizer a
SentencePiece model trained on the tasks' own texts (--vocab pieces); scores are then meaningless
but timing is what is measured. The task data come from data_dir (default shared/data/eval);
`perplexity` scores LAMBADA's passages as one text (or --text FILE).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moeut.compute import total_params  # noqa: E402
from moeut.eval.scoring import Scorer  # noqa: E402
from moeut.eval.tasks import get_task  # noqa: E402
from moeut.eval.tasks.base import EvalOptions, TaskDataMissing  # noqa: E402


class RecordingScorer(Scorer):
    """Our scorer, keeping the requests and results of each score() call for the comparison."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def score(self, requests, desc="scoring"):
        res = super().score(requests, desc)
        self.calls.append((list(requests), res))
        return res


@torch.no_grad()
def simple_score(model, requests, batch_size, device, autocast_dtype):
    """The reference: sort by length, pad to the batch's longest, one forward, gather."""
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].ids))
    out = [0.0] * len(requests)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        T = max(len(requests[i].ids) for i in idx)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        for b, i in enumerate(idx):
            x[b, :len(requests[i].ids)] = torch.tensor(requests[i].ids)
        x = x.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x).logits
        lp = torch.log_softmax(logits.float(), -1)
        want = [r.want_argmax for r in (requests[i] for i in idx)]
        if any(want):
            logits.argmax(-1).cpu()
        per = []
        for b, i in enumerate(idx):
            r = requests[i]
            n, c = len(r.ids), r.score_from
            per.append(lp[b, c - 1:n - 1].gather(-1, x[b, c:n, None]).sum())
        for i, v in zip(idx, torch.stack(per).cpu().tolist()):
            out[i] = v
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="lambada,blimp,hellaswag,piqa,arc_easy,perplexity")
    ap.add_argument("--limit", type=int, default=10, help="items per task (per paradigm for BLiMP)")
    ap.add_argument("--data_dir", default="")
    ap.add_argument("--text", default=None, help="text file for the perplexity task")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--preset", default="moeut_44m")
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--pad_multiple", type=int, default=1, help="ours; 128 = the paper's layout")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-3, help="max |logprob difference| per sequence")
    ap.add_argument("--record", default=None, help="append a section to this markdown file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]

    opts = EvalOptions(data_dir=args.data_dir, limit=args.limit)
    items = {}
    for name in tasks:
        if name == "perplexity":
            continue
        try:
            items[name] = get_task(name).load(opts)
        except TaskDataMissing as e:
            print(f"{name}: skipped ({e})")
    if "perplexity" in tasks:
        if args.text:
            text = open(args.text, encoding="utf-8").read()
        else:
            lam = get_task("lambada").load(EvalOptions(data_dir=args.data_dir, limit=20 * args.limit))
            text = "\n\n".join(it["text"] for it in lam)
        items["perplexity"] = [text]
        opts.perplexity = {"context_length": 256, "stride": 128}

    if args.checkpoint:
        from moeut.checkpoint import load_model
        loaded = load_model(args.checkpoint)
        model, tok, label = loaded.model, loaded.tokenizer, args.checkpoint
    else:
        from moeut.registry import build_model, get_preset
        from moeut.data.tokenizer import train_tokenizer
        texts = []  # tokenizer training text: up to 200 items of each task (more than --limit)
        big = EvalOptions(data_dir=args.data_dir, limit=max(args.limit, 200))
        for name in items:
            its = items[name] if name == "perplexity" else get_task(name).load(big)
            for it in its:
                if isinstance(it, str):
                    texts.append(it)
                elif isinstance(it, dict):
                    texts.append(it["text"])
                else:
                    texts.append(it.context + " " + " ".join(it.options))
        tok = train_tokenizer(texts, vocab_size=args.vocab)
        torch.manual_seed(0)
        model = build_model(get_preset(args.preset, vocab_size=tok.vocab_size))
        label = f"{args.preset} (random init), tokenizer {tok.vocab_size} pieces"
    model = model.to(device).eval()
    n_params = total_params(model)

    rows = []
    for name, its in items.items():
        task = get_task(name)
        t_ours, t_simple, max_diff, n_seq, n_tok = [], [], 0.0, 0, 0
        for _ in range(args.rounds):
            scorer = RecordingScorer(model, device=str(device), batch_size=args.batch_size,
                                     pad_multiple=args.pad_multiple, progress=False)
            sync(device)
            t0 = time.perf_counter()
            task.evaluate(its, scorer, tok, opts)
            sync(device)
            t_ours.append(time.perf_counter() - t0)
            reqs = [r for call in scorer.calls for r in call[0]]
            ours = [x.logprob for call in scorer.calls for x in call[1]]
            t0 = time.perf_counter()
            simple = simple_score(model, reqs, args.batch_size, device, scorer.autocast_dtype)
            sync(device)
            t_simple.append(time.perf_counter() - t0)
            max_diff = max(max_diff, max(abs(a - b) for a, b in zip(ours, simple)))
            n_seq, n_tok = len(reqs), sum(len(r.ids) for r in reqs)
        to, ts = statistics.median(t_ours), statistics.median(t_simple)
        rows.append((name, len(its), n_seq, n_tok, to, ts, to / ts, max_diff))
        print(f"{name:12s} items {len(its):6d} seqs {n_seq:6d} tokens {n_tok:8d}  ours {to:8.3f}s  "
              f"simple {ts:8.3f}s  ratio {to / ts:5.2f}  max|dlogp| {max_diff:.2e}", flush=True)

    bad = [r[0] for r in rows if r[7] > args.tol]
    slow = [r[0] for r in rows if r[6] > 1.5]
    print(f"target ratio <= 1.5: {'met' if not slow else 'NOT met for ' + ', '.join(slow)}")
    if args.record:
        dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"CPU {cpu_name()} ({os.cpu_count()} cores visible, shared with other jobs), "
                    f"{args.threads} thread(s)")
        lines = [f"\n## Zero-shot evaluation speed (ours vs simple scorer), {datetime.date.today()}\n",
                 f"- device: {dev}; torch {torch.__version__}; python {platform.python_version()}",
                 f"- model: {label}, {n_params:,} parameters; batch {args.batch_size}; ours pad_multiple "
                 f"{args.pad_multiple}; limit {args.limit}; median of {args.rounds} rounds",
                 f"- command: python benchmarks/eval_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}",
                 "",
                 "| task | items | sequences | tokens | ours s | simple s | ours / simple | max abs logp diff |",
                 "|---|---|---|---|---|---|---|---|"]
        for name, ni, ns, nt, to, ts, ratio, md in rows:
            lines.append(f"| {name} | {ni} | {ns} | {nt} | {to:.3f} | {ts:.3f} | {ratio:.2f} | {md:.1e} |")
        lines.append(f"\nTarget ours / simple <= 1.5 on every task: {'met' if not slow else 'not met: ' + ', '.join(slow)}.\n")
        with open(args.record, "a") as f:
            f.write("\n".join(lines) + "\n")
    if bad:
        sys.exit(f"scores differ by more than --tol={args.tol} on: {', '.join(bad)}")
    return rows


if __name__ == "__main__":
    main()
