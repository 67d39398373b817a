"""Fixtures for the Hub streaming tests: the loopback server over tiny model folders.

Import the fixtures into a test module (`from hub_fixtures import hub, hub_env, ...`); the server
module lives in tools/ and is loaded by path so no package install is needed.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_server_module():
    """tools/hub_server.py as a module (registered once in sys.modules)."""
    name = "bmm_tools_hub_server"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "hub_server.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def serve_suite(root: Path, suite, org: str = "org") -> dict[str, Path]:
    """Link the suite's folders under root/org/ as repos base, expert_0.. ; returns repo_id -> folder."""
    (root / org).mkdir(parents=True, exist_ok=True)
    repos = {}
    for folder in [suite.base, *suite.experts]:
        link = root / org / folder.name
        if not link.exists():
            link.symlink_to(folder, target_is_directory=True)
        repos[f"{org}/{folder.name}"] = folder
    return repos


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test's own, online mode, no token from the environment."""
    import huggingface_hub.constants as hfc

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)
    return cache


@pytest.fixture
def hub(tiny_llama_suite, tmp_path, hub_env, monkeypatch):
    """A running loopback Hub serving org/base and org/expert_0..2; HF_ENDPOINT points at it."""
    mod = load_server_module()
    root = tmp_path / "hub-root"
    serve_suite(root, tiny_llama_suite)
    srv = mod.HubServer(root).start()
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    try:
        yield srv
    finally:
        srv.stop()
