"""Run logging on rank 0: always `metrics.jsonl` in the run dir, optionally wandb, and progress
output (a tqdm bar on a TTY, one plain line per log interval otherwise, e.g. SLURM logs).

Every record is one JSON line `{"step": s, "time": t, key: value, ...}`; analysis rebuilds curves
from this file without the wandb API. Figures (routing heatmaps) go to wandb as images and to
`<run_dir>/routing/` as PNG files.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional


class RunLogger:
    def __init__(self, run_dir: str, *, enabled: bool = True, wandb_mode: str = "disabled",
                 project: str = "moeut", entity: Optional[str] = None, name: Optional[str] = None,
                 group: Optional[str] = None, tags=(), config: Optional[Dict[str, Any]] = None,
                 wandb_id: Optional[str] = None, progress: str = "auto", total_steps: int = 0,
                 initial_step: int = 0):
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb = None
        self.wandb_id = wandb_id
        self.bar = None
        self._metrics = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if wandb_mode != "disabled":
            import wandb
            # config must be a plain container (passing a DictConfig is a known footgun)
            self.wandb = wandb.init(project=project, entity=entity, name=name, group=group, tags=list(tags),
                                    dir=run_dir, config=config, id=wandb_id, resume="allow", mode=wandb_mode)
            self.wandb_id = self.wandb.id
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "lines"
        self.progress = progress
        if progress == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Dict[str, Any], line: bool = False) -> None:
        """Write one record; `line=True` also prints it (or updates the bar's postfix)."""
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items() if v is not None}
        rec = {"step": step, "time": time.time(), **clean}
        self._metrics.write(json.dumps(rec, allow_nan=True) + "\n")
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
        if line:
            short = {k.split("/")[-1] if k.startswith("train/") else k: v for k, v in clean.items()}
            text = " ".join(f"{k}={_fmt(v)}" for k, v in short.items())
            if self.bar is not None:
                self.bar.set_postfix_str(text[:200])
            elif self.progress == "lines":
                print(f"[step {step}] {text}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log_figure(self, step: int, key: str, fig) -> None:
        """Save a matplotlib Figure as PNG under run_dir/routing/ and log it to wandb."""
        if not self.enabled:
            return
        out = os.path.join(self.run_dir, "routing")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"{key.replace('/', '_')}_step{step:07d}.png")
        fig.savefig(path, dpi=80)
        if self.wandb is not None:
            import wandb
            self.wandb.log({key: wandb.Image(path)}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)
