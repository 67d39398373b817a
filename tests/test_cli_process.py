"""bmmstream.cli: the `bmm` command's allocator setting returns freed tensors to the system."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import sys, torch
from bmmstream.cli import return_freed_memory
ok = return_freed_memory() if sys.argv[1] == "fix" else None
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024
a = torch.ones(4 << 20); del a           # a freed 16 MiB mapping: glibc's dynamic threshold rises to it
keep = [torch.ones(2 << 20) for _ in range(20)]   # 20 x 8 MiB
before = anon()
del keep[::2]                              # every other one: 80 MiB freed in the middle of the heap
print(ok, round(before - anon()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_go_back_to_the_system_with_the_fixed_threshold():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        ok, returned = out.stdout.split()
        return ok, int(returned)

    ok, returned = run("fix")
    if ok != "True":
        pytest.skip("not glibc")
    assert returned >= 75  # MiB: every freed 8 MiB tensor was its own mapping
    _, returned_default = run("default")
    assert returned_default <= 10  # the control: glibc's default keeps them in its heap


def test_the_cli_applies_it(monkeypatch):
    from typer.testing import CliRunner

    import bmmstream.cli as cli
    from bmmstream.cli import app

    calls = []
    monkeypatch.setattr(cli, "return_freed_memory", lambda: calls.append(1) or True)
    CliRunner().invoke(app, ["plan", "--help"])
    CliRunner().invoke(app, ["status", "/nonexistent"])
    assert calls  # the callback ran before the command
