"""The backends the CPU tests can run here: every registered one, triton only interpreted."""

import importlib.util
import os

import mgll

TRITON_RUNS_ON_CPU = (
    importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
)
CPU_BACKENDS = [
    b for b in mgll.available_backends() if b != "auto" and (b != "triton" or TRITON_RUNS_ON_CPU)
]
