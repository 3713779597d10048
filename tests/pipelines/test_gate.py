"""The regression gate: parsing a thresholds file, and rules against this run's and the previous run's figures."""

from __future__ import annotations

import math

import pytest

from pipelines import gate

GOOD = """
absolute:
  - integrity.changed == 0
  - integrity.missing == 0
  - psnr.mean >= 20
  - bpp.mean <= 0.1
relative:            # against the previous run
  - lpips.mean: {worse_by_at_most: 0.01}
  - psnr.mean: {worse_by_at_most: 0.5}
"""


def rules(text: str) -> list[gate.Rule]:
    return gate.load_rules(text, "t.yaml")


def one(rule_yaml: str, figures: dict, previous: dict | None = None, previous_run: str | None = None) -> dict:
    result = gate.evaluate(rules(rule_yaml), figures, previous, previous_run)
    assert len(result["rules"]) == 1
    return result["rules"][0]


# ---- parsing ----

def test_parses_the_documented_example():
    parsed = rules(GOOD)
    assert [(r.kind, r.figure, r.op, r.threshold, r.lower_is_better) for r in parsed] == [
        ("absolute", "integrity.changed", "==", 0, True),
        ("absolute", "integrity.missing", "==", 0, True),
        ("absolute", "psnr.mean", ">=", 20, False),
        ("absolute", "bpp.mean", "<=", 0.1, True),
        ("relative", "lpips.mean", None, 0.01, True),
        ("relative", "psnr.mean", None, 0.5, False),
    ]
    assert parsed[2].text == "psnr.mean >= 20"
    assert parsed[4].text == "lpips.mean: {worse_by_at_most: 0.01}"


@pytest.mark.parametrize("op", ["==", "!=", "<=", ">=", "<", ">"])
def test_every_operator_parses_with_or_without_spaces(op):
    assert rules(f"absolute: ['ssim.mean{op}0.5', 'ssim.mean {op} -1e-3']")[1].op == op


def test_empty_file_and_empty_sections_have_no_rules():
    assert rules("") == [] and rules("# nothing\n") == [] and rules("absolute:\nrelative: []\n") == []
    assert gate.evaluate([], {"psnr.mean": 1.0}, None, None)["passed"] is None


@pytest.mark.parametrize("figure, lower", [
    ("psnr.mean", False), ("psnr.pooled", False), ("ssim.mean", False), ("ms_ssim.mean", False),
    ("lpips.mean", True), ("dists.median", True), ("niqe.mean", True), ("fid", True), ("kid", True),
    ("bpp.mean", True), ("integrity.changed", True), ("integrity.untracked", True),
    ("jpeg.psnr.mean", False), ("webp.ms_ssim.mean", False), ("avif.lpips.mean", True), ("jpeg.bpp.mean", True),
])
def test_direction_follows_the_metric(figure, lower):
    assert gate.direction(figure) is lower


@pytest.mark.parametrize("text, expected", [
    ("- psnr.mean >= 20", "expected a mapping with 'absolute' and/or 'relative' lists, got a list"),
    ("absolut:\n  - psnr.mean >= 20", "unknown key 'absolut' (expected absolute, relative)"),
    ("absolute: psnr.mean >= 20", "absolute: expected a list of rules, got a string"),
    ("absolute:\n  - psnr.mean => 20", "absolute rule 1 'psnr.mean => 20': expected 'FIGURE OP NUMBER'"),
    ("absolute:\n  - psnr.mean >= 20 dB", "absolute rule 1 'psnr.mean >= 20 dB': expected 'FIGURE OP NUMBER'"),
    ("absolute:\n  - psnr.mean >= twenty", "absolute rule 1 'psnr.mean >= twenty': threshold 'twenty' is not a number"),
    ("absolute:\n  - psnr.mean >= nan", "threshold 'nan' is not a number"),
    ("absolute:\n  - psnr.mean >= 1e999", "threshold '1e999' is not finite"),
    ("absolute:\n  - psnr.mean: '>= 20'", "absolute rule 1 {'psnr.mean': ...}: expected 'FIGURE OP NUMBER' as a string, got a mapping"),
    ("absolute:\n  - 20", "absolute rule 1 20: expected 'FIGURE OP NUMBER' as a string, got int"),
    ("absolute:\n  - fidelity >= 1", "absolute rule 1 'fidelity >= 1': unknown figure 'fidelity'"),
    ("absolute:\n  - jpeg.integrity.changed == 0", "unknown figure 'jpeg.integrity.changed'"),
    ("absolute:\n  - PSNR.mean >= 20", "expected 'FIGURE OP NUMBER'"),
    ("relative:\n  - lpips.mean: 0.01", "relative rule 1 {'lpips.mean': ...}: expected {worse_by_at_most: NUMBER} after the figure"),
    ("relative:\n  - lpips.mean: {worse_by: 0.01}", "expected {worse_by_at_most: NUMBER} after the figure"),
    ("relative:\n  - lpips.mean: {worse_by_at_most: 0.01, better: 1}", "expected {worse_by_at_most: NUMBER} after the figure"),
    ("relative:\n  - lpips.mean: {worse_by_at_most: lots}", "threshold 'lots' is not a number"),
    ("relative:\n  - lpips.mean: {worse_by_at_most: true}", "worse_by_at_most: not a number: True"),
    ("relative:\n  - lpips.mean: {worse_by_at_most: [1]}", "worse_by_at_most: not a number: (a list)"),
    ("relative:\n  - lpips.mean: {worse_by_at_most: .inf}", "threshold 'inf' is not a number"),
    ("relative:\n  - lpips.mean: {worse_by_at_most: -0.01}", "worse_by_at_most must be at least 0, got -0.01"),
    ("relative:\n  - foo.mean: {worse_by_at_most: 0.01}", "relative rule 1 {'foo.mean': ...}: unknown figure 'foo.mean'"),
    ("relative:\n  - lpips.mean >= 1", "relative rule 1 'lpips.mean >= 1': expected 'FIGURE: {worse_by_at_most: NUMBER}', got a string"),
    ("relative:\n  - {lpips.mean: {worse_by_at_most: 1}, fid: {worse_by_at_most: 1}}", "one figure per rule, got 2"),
    ("absolute:\n  - psnr.mean >= 20\nabsolute:\n  - bpp.mean <= 1", "duplicate key 'absolute' (line 3, column 1)"),
    ("absolute: [psnr.mean >= 20\n", "not valid YAML"),
    ("absolute: !!python/object/apply:os.system ['true']", "not valid YAML"),
])
def test_malformed_files_are_refused_in_one_line_naming_file_and_rule(text, expected):
    with pytest.raises(ValueError) as err:
        rules(text)
    message = str(err.value)
    assert message.startswith("t.yaml: ") and expected in message and "\n" not in message


def test_hostile_files_are_refused():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))
    for text, expected in [
        (bomb, "anchors and aliases are not allowed"),
        ("absolute:\n" + "  - psnr.mean >= 20\n" * 5000, "over 64 KiB: refused"),
        ("[" * 20000 + "]" * 20000, "not valid YAML"),
        ("relative:\n  - lpips.mean: {worse_by_at_most: 1" + "0" * 5000 + "}", "not valid YAML"),
    ]:
        with pytest.raises(ValueError, match=expected) as err:
            rules(text)
        assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_read_rules_caps_what_it_reads(tmp_path):
    path = tmp_path / "thresholds.yaml"
    path.write_text(GOOD)
    assert len(gate.read_rules(str(path))) == 6
    path.write_bytes(b"#" * (gate.MAX_BYTES + 1))
    with pytest.raises(ValueError, match="over 64 KiB"):
        gate.read_rules(str(path))
    path.write_bytes(b"absolute: ['psnr.mean >= 1 \xff']")
    with pytest.raises(ValueError, match=r"thresholds.yaml: not UTF-8 text \(byte 27\)"):
        gate.read_rules(str(path))


# ---- absolute rules ----

@pytest.mark.parametrize("rule, value, passed", [
    ("integrity.changed == 0", 0, True), ("integrity.changed == 0", 1, False),
    ("integrity.changed != 0", 1, True), ("integrity.changed != 0", 0, False),
    ("psnr.mean >= 20", 20.0, True), ("psnr.mean >= 20", 19.99, False),
    ("psnr.mean > 20", 20.0, False), ("psnr.mean > 20", 20.01, True),
    ("bpp.mean <= 0.1", 0.1, True), ("bpp.mean <= 0.1", 0.1001, False),
    ("bpp.mean < 0.1", 0.1, False), ("bpp.mean < 0.1", 0.05, True),
    ("psnr.mean >= 20", math.inf, True),  # a lossless image
])
def test_absolute_rules(rule, value, passed):
    figure = rule.split()[0]
    result = one(f"absolute: ['{rule}']", {figure: value})
    assert result["passed"] is passed and result["kind"] == "absolute" and result["figure"] == figure
    assert result["value"] == value and result["previous"] is None and result["rule"] == rule
    assert result["message"].startswith(f"{figure} = ") and (", not " in result["message"]) is (not passed)


def test_absolute_message():
    assert one("absolute: ['psnr.mean >= 20']", {"psnr.mean": 18.25})["message"] == "psnr.mean = 18.25, not >= 20"
    assert one("absolute: ['psnr.mean >= 20']", {"psnr.mean": 24.1})["message"] == "psnr.mean = 24.1 >= 20"


# ---- relative rules ----

@pytest.mark.parametrize("figure, before, now, passed, change", [
    # lower is better
    ("lpips.mean", 0.20, 0.205, True, "worse by 0.005, within the 0.01 allowed"),
    ("lpips.mean", 0.20, 0.21, True, "worse by 0.01, within the 0.01 allowed"),  # the allowance itself, despite rounding
    ("lpips.mean", 0.20, 0.2101, False, "worse by 0.0101, more than the 0.01 allowed"),
    ("lpips.mean", 0.20, 0.10, True, "better by 0.1"),
    ("bpp.mean", 0.05, 0.0605, False, "worse by 0.0105"),
    ("jpeg.lpips.mean", 0.30, 0.32, False, "worse by 0.02"),
    # higher is better
    ("psnr.mean", 24.0, 23.995, True, "worse by 0.005"),
    ("psnr.mean", 24.0, 23.9, False, "worse by 0.1, more than the 0.01 allowed"),
    ("psnr.mean", 24.0, 30.0, True, "better by 6"),
    ("ms_ssim.mean", 0.90, 0.85, False, "worse by 0.05"),
    ("webp.psnr.mean", 24.0, 25.0, True, "better by 1"),
    ("psnr.mean", 24.0, 24.0, True, "unchanged"),
    ("psnr.mean", math.inf, math.inf, True, "unchanged"),
])
def test_relative_rules_in_both_directions(figure, before, now, passed, change):
    result = one(f"relative: [{figure}: {{worse_by_at_most: 0.01}}]", {figure: now}, {figure: before}, "2026-11-28")
    assert result["passed"] is passed and result["kind"] == "relative"
    assert result["value"] == now and result["previous"] == before
    assert "in run 2026-11-28" in result["message"] and change in result["message"]
    assert ("(lower is better)" if gate.direction(figure) else "(higher is better)") in result["message"]


def test_relative_rule_without_previous_run_passes_and_says_so():
    result = one("relative: [lpips.mean: {worse_by_at_most: 0.01}]", {"lpips.mean": 0.9}, None, None)
    assert result["passed"] is True and result["previous"] is None
    assert result["message"] == "no previous run: nothing to compare to"


@pytest.mark.parametrize("previous", [{}, {"lpips.mean": None}])
def test_relative_rule_whose_figure_the_previous_run_lacks_passes_and_says_so(previous):
    result = one("relative: [lpips.mean: {worse_by_at_most: 0.01}]", {"lpips.mean": 0.9}, previous, "2026-11-28")
    assert result["passed"] is True
    assert result["message"] == "lpips.mean is not in run 2026-11-28: nothing to compare to"


# ---- missing figures and NaN: never a pass ----

@pytest.mark.parametrize("rule", ["absolute: ['lpips.mean <= 0.3']", "relative: [lpips.mean: {worse_by_at_most: 0.01}]"])
@pytest.mark.parametrize("figures, problem", [({}, "unavailable"), ({"lpips.mean": None}, "unavailable"),
                                              ({"lpips.mean": math.nan}, "NaN"),
                                              ({"lpips.mean": "0.2"}, "not a number (str)"),
                                              ({"lpips.mean": True}, "not a number (bool)")])
def test_a_figure_missing_or_nan_in_this_run_fails(rule, figures, problem):
    for previous in (None, {"lpips.mean": 0.2}):
        result = one(rule, figures, previous, "2026-11-28")
        assert result["passed"] is False
        assert result["message"] == f"lpips.mean is {problem} in this run: the rule cannot pass"


def test_nan_in_the_previous_run_or_in_the_difference_fails():
    rule = "relative: [psnr.mean: {worse_by_at_most: 0.5}]"
    result = one(rule, {"psnr.mean": 24.0}, {"psnr.mean": math.nan}, "r1")
    assert result["passed"] is False and result["message"] == "psnr.mean is NaN in run r1: cannot compare"
    result = one(rule, {"psnr.mean": math.inf}, {"psnr.mean": -math.inf}, "r1")  # inf - -inf is inf: worse is -inf
    assert result["passed"] is True
    result = one("relative: [fid: {worse_by_at_most: 0.5}]", {"fid": math.inf}, {"fid": math.inf}, "r1")
    assert result["passed"] is True  # equal: unchanged


def test_gate_summary_and_failures():
    figures = {"integrity.changed": 0, "integrity.missing": 1, "psnr.mean": 24.1, "bpp.mean": 0.05, "lpips.mean": 0.25}
    result = gate.evaluate(rules(GOOD), figures, {"lpips.mean": 0.2, "psnr.mean": 24.0}, "2026-11-28",
                           thresholds="/etc/rdeic/thresholds.yaml")
    assert result["passed"] is False and result["previous_run"] == "2026-11-28"
    assert result["thresholds"] == "/etc/rdeic/thresholds.yaml"
    assert [r["passed"] for r in result["rules"]] == [True, False, True, True, False, True]
    assert set(result["rules"][0]) == {"rule", "kind", "figure", "value", "previous", "passed", "message"}
    assert gate.failures(result) == [
        "gate failed: integrity.missing == 0; integrity.missing = 1, not == 0",
        "gate failed: lpips.mean: {worse_by_at_most: 0.01}; lpips.mean = 0.25 vs 0.2 in run 2026-11-28 "
        "(lower is better): worse by 0.05, more than the 0.01 allowed",
    ]
    figures.update({"integrity.missing": 0, "lpips.mean": 0.2})
    clean = gate.evaluate(rules(GOOD), figures, {"lpips.mean": 0.2, "psnr.mean": 24.0}, "2026-11-28")
    assert clean["passed"] is True and gate.failures(clean) == []
