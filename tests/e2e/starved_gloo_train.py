"""`train.py` with gloo's worker threads starved, for tests/e2e/test_train.py.

Once DDP wraps the model, every thread of the rank is pinned to one core and every thread but the
main one is put on SCHED_IDLE, so the process group's workers run only while the main thread
blocks: the order in which a wrong teardown hangs or aborts (docs/architecture.md,
"Process-group teardown"). Run as `torchrun ... tests/e2e/starved_gloo_train.py <train.py overrides>`
from the repository root; Linux only.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # as train.py

_DDP = torch.nn.parallel.DistributedDataParallel


class StarvedWorkersDDP(_DDP):
    """DistributedDataParallel that starves the rank's other threads once built."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        core = min(os.sched_getaffinity(0))
        for tid in map(int, os.listdir("/proc/self/task")):
            os.sched_setaffinity(tid, {core})
            if tid != os.getpid():
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


torch.nn.parallel.DistributedDataParallel = StarvedWorkersDDP

if __name__ == "__main__":
    from moeut.train import main
    main()
