"""bmmstream.cli: the `bmm` command's allocator setting returns freed tensors to the system."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, cwd=ROOT)
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
    assert CliRunner().invoke(app, ["plan", "--help"]).exit_code == 0
    r = CliRunner().invoke(app, ["status", "/nonexistent"])
    assert r.exit_code == 2 and r.output.startswith("error: ")
    assert len(calls) == 2  # the callback ran before each command
