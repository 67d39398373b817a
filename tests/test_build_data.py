import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("build_experts", ROOT / "tools" / "build_experts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_split_smaller_than_asked_is_taken_whole_and_said(tmp_path, capsys):
    """`--dec-val 300` on a master split of 200 rows wrote 200 without a word (the dec3 suite's val);
    the builder now says so, naming the task and split, and takes the prefixes it has."""
    b = _builder()
    master = {"t": {"train": [{"text": f"a{i}"} for i in range(3)], "val": [{"text": f"v{i}"} for i in range(2)],
                    "test": [{"text": f"s{i}"} for i in range(4)]}}
    out = b.suite_data(tmp_path, master, ["t"], (2, 5, 1))
    assert {k: len(v) for k, v in out["t"].items()} == {"train": 2, "val": 2, "test": 1}
    assert capsys.readouterr().err.strip().splitlines() == [
        "[data] t/val: 5 rows asked, the master split has 2: taking 2"]
    assert [json.loads(line) for line in (tmp_path / "data" / "t" / "val.jsonl").open()] == master["t"]["val"]
