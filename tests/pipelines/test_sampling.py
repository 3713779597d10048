"""The audit sample: deterministic per seed, stratified over parts, independent of listing order."""

from __future__ import annotations

from pipelines.sampling import draw, quotas


def test_quotas_follow_each_parts_share_and_sum_to_n():
    q = quotas({"a": 100, "b": 50, "c": 1, "d": 0}, 10)
    assert sum(q.values()) == 10 and q["d"] == 0
    assert q["a"] == 7 and q["b"] == 3  # 6.54 / 3.27 / 0.07 by largest remainder
    assert quotas({"a": 3, "b": 2}, 100) == {"a": 3, "b": 2}  # never more than a part holds
    assert quotas({"a": 3}, 0) == {"a": 0}
    assert quotas({"d": 0, "c": 1, "b": 50, "a": 100}, 10) == q  # the order parts are listed in does not matter


def test_same_seed_same_panel_in_any_order_and_another_seed_rotates():
    keys = [f"img-{i:05d}" for i in range(2000)]
    drawn = {keys[i] for i in draw(keys, 50, "0")}
    assert len(drawn) == 50
    shuffled = keys[::-1]
    assert {shuffled[i] for i in draw(shuffled, 50, "0")} == drawn  # the draw does not depend on row order
    other = {keys[i] for i in draw(keys, 50, "2026-11-29")}
    assert len(drawn & other) < 10  # a date as seed draws another panel
    assert draw(keys, 50, "0") == sorted(draw(keys, 50, "0"))  # positions, in row order


def test_a_larger_sample_contains_the_smaller_one():
    keys = [f"k{i}" for i in range(500)]
    small, large = set(draw(keys, 20, "s")), set(draw(keys, 60, "s"))
    assert small <= large  # raising --sample adds images to tonight's panel, it does not replace them
