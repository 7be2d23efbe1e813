"""A torch.profiler profile of training steps train.profile.start..end (docs/training.md "Profiles").

Writes, into <run dir>/profile/ (rank 0 only): trace.json (Chrome trace: chrome://tracing or
https://ui.perfetto.dev; each profiled step is one `train_step` range), top_ops.md (torch's
key_averages table sorted by self CUDA time on CUDA, self CPU time on CPU) and
memory_timeline.json (the profiler's allocator events, CPU and CUDA alike: every allocation and
free with its timestamp and the allocator's total, and per step the peak and final total).
Steps are the logged step numbers: step n is the step after which the log says [step n].
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

STEP_MARKER = "train_step"  # the record_function range around each profiled step


def memory_timeline(trace: Dict[str, Any]) -> Dict[str, Any]:
    """From a Chrome trace dict (`trace.json`): {"events": [[ts_us, bytes, total_allocated, device], ...]
    (the profiler's [memory] events in time order), "steps": [{"step", "start_us", "end_us",
    "peak_bytes", "end_bytes", "n_events"}, ...] (one per `train_step#<n>` range: the largest and the last
    allocator total among the memory events inside it; None when it has none)}."""
    evs = trace.get("traceEvents", [])
    mem = sorted(([e["ts"], e["args"].get("Bytes", 0), e["args"].get("Total Allocated", 0),
                   str(e["args"].get("Device Type", ""))] for e in evs
                  if e.get("name") == "[memory]" and "args" in e), key=lambda r: r[0])
    steps = []
    for e in sorted((e for e in evs if e.get("name", "").startswith(STEP_MARKER + "#") and e.get("ph") == "X"),
                    key=lambda e: e["ts"]):
        t0, t1 = e["ts"], e["ts"] + e.get("dur", 0)
        inside = [m[2] for m in mem if t0 <= m[0] <= t1]
        steps.append({"step": int(e["name"].split("#", 1)[1]), "start_us": t0, "end_us": t1,
                      "peak_bytes": max(inside) if inside else None, "end_bytes": inside[-1] if inside else None,
                      "n_events": len(inside)})
    return {"events": mem, "steps": steps}


class StepProfiler:
    """Profiles the steps `start`..`end` (logged step numbers; end None = start; start None = off)
    on `device` and writes <run_dir>/profile/ when `end` is done, or at `close` with the steps
    profiled so far (a run stopped inside the window; `log` says which). Disabled (a no-op) when
    `enabled` is False (ranks other than 0)."""

    def __init__(self, start: Optional[int], end: Optional[int], run_dir: str, device: torch.device,
                 enabled: bool = True, log: Callable[[str], None] = print):
        self.start = start if enabled else None
        self.end = end if end is not None else start
        self.out = os.path.join(run_dir, "profile")
        self.device = device
        self.log = log
        self.prof: Optional[profile] = None
        self.step: Optional[int] = None
        self.steps: List[int] = []

    def before_step(self, step: int) -> None:
        """Call before the step that will be logged as `step`: starts the profiler inside the window."""
        if self.prof is not None:
            self.step = step
            return
        if self.start is None or not self.start <= step <= self.end:
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.prof = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False)
        self.prof.start()
        self.step = step

    def marker(self):
        """The `train_step#<n>` range around the step while profiling (else a null context)."""
        if self.prof is None or self.step is None:
            return contextlib.nullcontext()
        return record_function(f"{STEP_MARKER}#{self.step}")

    def after_step(self, step: int) -> None:
        """Call after the step logged as `step`: writes the files after the window's last step."""
        if self.prof is None:
            return
        self.steps.append(step)
        if step >= self.end:
            self._finish()

    def close(self) -> None:
        """Write what was profiled when the run stopped inside the window."""
        if self.prof is not None:
            self.log(f"[profile] WARNING: the run stopped inside train.profile ({self.start}..{self.end}): "
                     f"writing steps {self.steps[0] if self.steps else '-'}..{self.steps[-1] if self.steps else '-'}")
            self._finish()

    def _finish(self) -> None:
        prof, self.prof = self.prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.stop()
        os.makedirs(self.out, exist_ok=True)
        trace_path = os.path.join(self.out, "trace.json")
        prof.export_chrome_trace(trace_path)
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        steps = f"{self.steps[0]}..{self.steps[-1]}" if self.steps else "none"
        with open(os.path.join(self.out, "top_ops.md"), "w") as f:
            f.write(f"# Top operators, steps {steps} (sorted by {sort}; device {self.device})\n\n```\n{table}\n```\n")
        with open(trace_path) as f:
            timeline = memory_timeline(json.load(f))
        with open(os.path.join(self.out, "memory_timeline.json"), "w") as f:
            json.dump({"device": str(self.device), "steps_profiled": self.steps, **timeline}, f)
        self.log(f"[profile] steps {steps}: {self.out}/trace.json, top_ops.md, memory_timeline.json")
