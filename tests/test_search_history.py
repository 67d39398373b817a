import json

import pytest

from bmmstream.errors import BmmError
from bmmstream.search.history import History, JsonlLog, ScoreCache, Trial, cache_key


def test_jsonl_log_appends_and_rereads(tmp_path):
    p = tmp_path / "h.jsonl"
    log = JsonlLog(p)
    log.append({"a": 1})
    log.append({"b": float("nan"), "c": -float("inf")})
    again = JsonlLog(p)
    assert again.records[0] == {"a": 1}
    assert str(again.records[1]["b"]) == "nan" and again.records[1]["c"] == -float("inf")
    assert p.read_text().count("\n") == 2


def test_torn_last_line_is_dropped_and_file_repaired(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"a": 1}\n{"b": 2}\n{"c": 3')  # killed mid-write
    log = JsonlLog(p)
    assert log.records == [{"a": 1}, {"b": 2}]
    assert p.read_text() == '{"a": 1}\n{"b": 2}\n'
    log.append({"d": 4})
    assert [json.loads(line) for line in p.read_text().splitlines()] == [{"a": 1}, {"b": 2}, {"d": 4}]


def test_complete_json_without_newline_counts_as_torn(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"a": 1}\n{"b": 2}')
    assert JsonlLog(p).records == [{"a": 1}]


def test_corrupt_middle_line_is_an_error(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(BmmError, match=r"h.jsonl: line 2 is not a JSON object; the file is corrupt$"):
        JsonlLog(p)


def _trial(i, score=0.5):
    return Trial(i, "search", {"blocks": [{"scale": 1.0, "rho": {"attn_in": 0.1}}]}, "proxy", score, 0.1)


def test_history_round_trip_and_order(tmp_path):
    h = History(tmp_path / "history.jsonl")
    h.append(_trial(0, 0.25))
    h.append(_trial(1, 0.75))
    with pytest.raises(ValueError, match="trial 5 appended after 2 trials"):
        h.append(_trial(5))
    again = History(tmp_path / "history.jsonl")
    assert again.trials == h.trials
    (tmp_path / "bad.jsonl").write_text(json.dumps(_trial(1).to_record()) + "\n")
    with pytest.raises(BmmError, match=r"record 1 has trial index 1, expected 0$"):
        History(tmp_path / "bad.jsonl")


def test_cache_key_depends_on_canonical_params_scorer_and_data():
    p = {"blocks": [{"scale": 1.0, "rho": {"attn_in": 0.1, "mlp_out": 0.2}}]}
    same = {"blocks": [{"rho": {"mlp_out": 0.2000000001, "attn_in": 0.1}, "scale": 1.0}]}
    assert cache_key(p, "s", "d") == cache_key(same, "s", "d")
    assert cache_key(p, "s", "d") != cache_key(p, "s2", "d")
    assert cache_key(p, "s", "d") != cache_key(p, "s", "d2")
    assert cache_key(p, "s", "d") != cache_key(p, "s", "d", context="other experts")
    other = {"blocks": [{"scale": 1.0, "rho": {"attn_in": 0.1001, "mlp_out": 0.2}}]}
    assert cache_key(p, "s", "d") != cache_key(other, "s", "d")


def test_score_cache_persists_first_value(tmp_path):
    c = ScoreCache(tmp_path / "scores.jsonl")
    c.put("k1", 0.5, fidelity="proxy")
    c.put("k1", 0.9)  # ignored: a key has one score
    c.put("k2", -1.0)
    again = ScoreCache(tmp_path / "scores.jsonl")
    assert again.get("k1") == 0.5 and again.get("k2") == -1.0 and again.get("k3") is None
    assert len(again) == 2 and "k1" in again


def test_score_cache_keeps_exact_per_row_scores(tmp_path):
    c = ScoreCache(tmp_path / "scores.jsonl")
    rows = [1 / 3, 0.0, 1.0]
    c.put("k1", 4 / 9, rows, fidelity="full", seconds=0.123456789)
    c.put("k1", 0.1, [0.0])  # ignored with its rows
    c.put("k2", 0.5)
    again = ScoreCache(tmp_path / "scores.jsonl")
    assert again.rows("k1") == rows and again.get("k1") == 4 / 9  # not rounded to 6 digits
    assert again.rows("k2") is None and again.rows("k3") is None
    rec = json.loads((tmp_path / "scores.jsonl").read_text().splitlines()[0])
    assert rec["seconds"] == 0.123457 and rec["rows"] == rows
