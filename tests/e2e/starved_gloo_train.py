"""`train.py` with gloo's worker threads starved, for tests/e2e/test_train.py.

At each of the training loop's barriers (the last one precedes the process group's teardown), every
thread of the rank is pinned to one core and every thread but the main one is put on SCHED_IDLE, so
the process group's workers run only while the main thread blocks: the order in which a wrong
teardown hangs or aborts (docs/architecture.md, "Process-group teardown"). Run as
`torchrun ... tests/e2e/starved_gloo_train.py <train.py overrides>` from the repository root; Linux only.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # as train.py

from moeut.train_lib import loop  # noqa: E402

_barrier = loop.barrier


def starve_then_barrier() -> None:
    """Starve the rank's other threads (those that exist now), then the loop's barrier."""
    core = min(os.sched_getaffinity(0))
    for tid in map(int, os.listdir("/proc/self/task")):
        try:
            os.sched_setaffinity(tid, {core})
            if tid != os.getpid():
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    _barrier()


loop.barrier = starve_then_barrier

if __name__ == "__main__":
    from moeut.train import main
    main()
