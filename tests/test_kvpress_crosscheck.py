"""The kvpress cross-check's own logic (benchmarks/kvpress_crosscheck.py): answer agreement, table rows and the kept findings section. kvpress itself is not needed."""

from __future__ import annotations


import pytest
from benchmark_modules import load_benchmark

@pytest.fixture(scope="module")
def xc():
    return load_benchmark("kvpress_crosscheck")


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
    meta = {"kvpress_version": "0", "kvpress_transformers": "0", "namm_transformers": "0",
            "model": "m", "tasks": ["passkey"], "length": 64, "samples": 1, "budget": 0.5}
    xc.write_results(out, [], meta)
    md = out.with_suffix(".md")
    assert "## Findings" in md.read_text()
    md.write_text(md.read_text().replace("(to be written)", "SnapKV differs because of its window."))
    xc.write_results(out, [], meta)
    assert "SnapKV differs because of its window." in md.read_text()
    assert out.with_suffix(".json").exists()


def test_table_only_reads_finished_namm_arms_and_marks_the_table_partial(xc, tmp_path):
    from namm.tasks import Sample

    group = [Sample(id=f"p{i}", prompt="x", answers=["1"], max_new_tokens=4, metric="string_match_all")
             for i in range(3)]

    def write_arm(name: str, ids: list[str]) -> None:
        out = tmp_path / "namm" / "passkey" / name
        out.mkdir(parents=True)
        (out / "metrics.json").write_text('{"kv_fraction": 0.5, "schedule": "progressive"}')
        (out / "predictions.jsonl").write_text("".join(
            f'{{"id": "{i}", "score": {1.0 if i == "p0" else 0.0}, "prediction": " 1"}}\n' for i in ids))

    write_arm("full-query-aware", ["p0", "p1", "p2"])
    write_arm("snapkv-0.5-query-aware", ["p0", "p1", "p2"])
    write_arm("snapkv-0.25-query-aware", ["p0", "p1", "p2"])  # another budget: not this table's
    write_arm("tova-0.5-query-aware", ["p0"])  # unfinished: left out
    arms = xc.namm_arms_on_disk({"passkey": group}, tmp_path, 0.5)
    assert set(arms) == {("passkey", "query-aware", "full"), ("passkey", "query-agnostic", "full"),
                         ("passkey", "query-aware", "snapkv")}
    assert arms[("passkey", "query-aware", "snapkv")].scores == [100.0, 0.0, 0.0]
    meta = {"kvpress_version": "0", "kvpress_transformers": "0", "namm_transformers": "0",
            "model": "m", "tasks": ["passkey"], "length": 64, "samples": 3, "partial": True, "budget": 0.5}
    xc.write_results(tmp_path / "kvpress", [], meta)
    assert "**Partial table**" in (tmp_path / "kvpress.md").read_text()
    xc.write_results(tmp_path / "kvpress", [], {**meta, "partial": False})
    assert "**Partial table**" not in (tmp_path / "kvpress.md").read_text()


def test_a_table_is_partial_until_every_arm_of_both_sides_is_in(xc):
    side = {"n": 1, "score": 0.0, "score_ci": (0.0, 0.0), "kv_fraction": 0.5, "schedule": None}
    rows = [{"task": "passkey", "protocol": protocol, "press": press, "policy": policy, "kvpress": side,
             **({"namm": side} if policy else {})}
            for protocol in xc.PROTOCOLS for press, policy in xc.PAIRS
            if not (press == "KVzip" and protocol == "query-aware")]
    assert not xc.is_partial(rows, ["passkey"])
    assert xc.is_partial(rows[1:], ["passkey"])  # a row missing
    assert xc.is_partial(rows, ["passkey", "niah_single"])  # a task missing
    without_namm = [dict(r) for r in rows]
    del without_namm[1]["namm"]
    assert xc.is_partial(without_namm, ["passkey"])


def test_both_sides_keep_the_same_share_at_any_budget(xc, tmp_path):
    command = xc.kvpress_command("py", tmp_path / "p.json", tmp_path / "m", tmp_path / "rows.jsonl", False, 0.25)
    assert command[command.index("--ratio") + 1] == "0.75"  # kvpress removes what namm does not keep
    assert xc.rows_path(tmp_path, 0.25) != xc.rows_path(tmp_path, 0.5)
    arms = {xc.namm_arm_dir(tmp_path, "passkey", "query-aware", "snapkv", b) for b in (0.25, 0.5)}
    assert len(arms) == 2
    assert xc.namm_arm_dir(tmp_path, "passkey", "query-aware", "full", 0.25) == \
        xc.namm_arm_dir(tmp_path, "passkey", "query-aware", "full", 0.5)
