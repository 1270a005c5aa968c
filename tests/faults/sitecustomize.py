"""Fault injection for the kill tests, never installed: on PYTHONPATH with
``PMSS_KILL_AT=module:function:N`` (and optionally ``PMSS_KILL_RANK=R``), a process (a torchrun
worker of that rank, or a plain one) SIGKILLs itself when ``module.function`` is called for the
N-th time: a kill at an exact point of a write, as a preemption or an OOM killer would deliver it."""

import os

_spec = os.environ.get("PMSS_KILL_AT")
_rank = os.environ.get("PMSS_KILL_RANK")  # set: only that torchrun worker (never the launcher)
_chosen = _rank is None or ("LOCAL_RANK" in os.environ and os.environ.get("RANK") == _rank)
if _spec and _chosen:
    import importlib
    import signal

    _module, _function, _n = _spec.split(":")
    _target = importlib.import_module(_module)
    _original = getattr(_target, _function)
    _calls = [0]

    def _killing(*args, **kwargs):
        _calls[0] += 1
        if _calls[0] == int(_n):
            os.kill(os.getpid(), signal.SIGKILL)
        return _original(*args, **kwargs)

    setattr(_target, _function, _killing)
