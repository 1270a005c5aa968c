"""The console: torchao's known, harmless notice about its C++ extensions is filtered by its text
at import; every other torchao message still shows."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pmss_dist import _KnownNotice

SCRIPT = ("import logging, {module}\n"
          "logging.getLogger('torchao').warning('%s ' + 'a message of its own', 'torchao:')\n")


def stderr_of(module: str) -> str:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(module=module)], capture_output=True, text=True,
                          timeout=300).stderr


def test_torchao_notice_is_dropped_and_nothing_else():
    unfiltered = stderr_of("torchao")
    if _KnownNotice.TEXT not in unfiltered:
        pytest.skip("this torch and torchao were built for each other: torchao prints no notice to filter")
    ours = stderr_of("pmss_dist.train.trainer")  # imports torchtune, which imports torchao
    assert _KnownNotice.TEXT not in ours
    assert "torchao: a message of its own" in ours and "torchao: a message of its own" in unfiltered
