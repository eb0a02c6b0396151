"""The kvpress cross-check's own logic (benchmarks/kvpress_crosscheck.py): paired differences,
answer agreement, table rows and the kept findings section. kvpress itself is not needed."""

from __future__ import annotations


import pytest
from benchmark_modules import load_benchmark

@pytest.fixture(scope="module")
def xc():
    return load_benchmark("kvpress_crosscheck")


def test_paired_difference_is_paired(xc):
    # identical arms: the difference is exactly 0 with a degenerate interval
    diff, ci = xc.paired_difference([100.0, 0.0, 100.0], [100.0, 0.0, 100.0])
    assert diff == 0.0 and ci == (0.0, 0.0)
    # one arm better on every prompt by 100: the interval sits at +100
    diff, ci = xc.paired_difference([100.0] * 4, [0.0] * 4)
    assert diff == 100.0 and ci == (100.0, 100.0)
    with pytest.raises(ValueError):
        xc.paired_difference([1.0], [1.0, 2.0])


def test_agreement(xc):
    assert xc.agreement([" 123", "4"], ["123 ", "5"]) == 0.5
    assert xc.agreement(None, ["a"]) is None


def test_table_rows_flags_only_real_differences(xc):
    same = xc.Arm([100.0, 0.0] * 12, 0.5, "prompt-end", ["a", "b"] * 12)
    better = xc.Arm([100.0] * 24, 0.5, "progressive", ["a"] * 24)
    namm_arms = {("passkey", "query-aware", "snapkv"): same, ("passkey", "query-aware", "tova"): better}
    kv_arms = {("passkey", "query-aware", "SnapKV"): same, ("passkey", "query-aware", "TOVA"): same,
               ("passkey", "query-aware", "KVzip"): same}
    rows = {r["press"]: r for r in xc.table_rows(namm_arms, kv_arms, ["passkey"])}
    assert rows["SnapKV"]["beyond_noise"] is False and rows["SnapKV"]["same_answer"] == 1.0
    assert rows["TOVA"]["beyond_noise"] is True and rows["TOVA"]["difference"] == pytest.approx(50.0)
    assert "namm" not in rows["KVzip"] and rows["KVzip"]["policy"] is None
    table = xc.markdown(list(rows.values()))
    assert "**beyond noise**" in table and "– (no counterpart)" in table
    assert len(table.splitlines()) == 2 + len(rows)


def test_findings_survive_a_rewrite(xc, tmp_path):
    out = tmp_path / "kvpress"
    meta = {"wall_minutes": 1.0, "kvpress_version": "0", "kvpress_transformers": "0", "namm_transformers": "0",
            "model": "m", "tasks": ["passkey"], "length": 64, "samples": 1}
    xc.write_results(out, [], meta)
    md = out.with_suffix(".md")
    assert "## Findings" in md.read_text()
    md.write_text(md.read_text().replace("(to be written)", "SnapKV differs because of its window."))
    xc.write_results(out, [], meta)
    assert "SnapKV differs because of its window." in md.read_text()
    assert out.with_suffix(".json").exists()
