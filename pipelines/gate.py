"""The audit's regression gate: rules from a YAML thresholds file, checked against a run's figures.

The file (``rdeic-job audit --thresholds FILE``; docs/audit.md, "Writing thresholds")::

    absolute:                        # FIGURE OP NUMBER, OP one of == != <= >= < >
      - integrity.changed == 0
      - psnr.mean >= 20
      - bpp.mean <= 0.1
    relative:                        # against the previous run under the same report root
      - lpips.mean: {worse_by_at_most: 0.01}
      - psnr.mean: {worse_by_at_most: 0.5}

A figure is a name in summary.json's flat ``figures`` dict. Whether a change is worse follows its
metric: lower is better for lpips, dists, niqe, fid, kid, bpp, integrity.* and sample.* (counts of images
whose source is gone or changed or whose decoding failed), higher for psnr, ssim
and ms_ssim; a baseline's figure (``jpeg.psnr.mean``) follows its metric. The file is refused, in one
line naming it and the rule, for anything else: unknown keys or figure prefixes, malformed rules,
thresholds that are not finite numbers, YAML anchors, more than 64 KiB.

A rule never passes on a figure that is missing, None or NaN in this run. A relative rule with no
previous run, or whose figure the previous run lacks, passes and says there was nothing to compare to.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import yaml

from rdeic import metrics

MAX_BYTES = 64 * 1024
BASELINES = ("jpeg", "webp", "avif")
LOWER_IS_BETTER = (*sorted(metrics.LOWER_IS_BETTER), "bpp", "integrity", "sample")
HIGHER_IS_BETTER = tuple(m for m in metrics.PAIR_METRICS if m not in metrics.LOWER_IS_BETTER)
SECTIONS = ("absolute", "relative")
TOLERANCE = "worse_by_at_most"

_OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b}
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_FIGURE = r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*"
_ABSOLUTE = re.compile(rf"\s*({_FIGURE})\s*(==|!=|<=|>=|<|>)\s*(\S+)\s*")


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing aliases (how a small file expands into a huge one) and duplicate keys
    (a second ``absolute:`` would silently drop the first one's rules)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "anchors and aliases are not allowed", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key.value!r}", key.start_mark)
                seen.add(key.value)
        return super().construct_mapping(node, deep)


@dataclass(frozen=True)
class Rule:
    text: str         # as reported in summary.json and by failures()
    kind: str         # "absolute" | "relative"
    figure: str
    op: str | None    # absolute: the comparison; relative: None
    threshold: float  # absolute: the bound; relative: how much worse the figure may get
    lower_is_better: bool


def load_rules(text: str, where: str) -> list[Rule]:
    """The rules of a thresholds file's ``text`` (``where`` names it in errors); ValueError in one line."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ValueError(f"{where}: thresholds file over {MAX_BYTES // 1024} KiB: refused")
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML: {_yaml_problem(exc)}") from None
    except (ValueError, RecursionError) as exc:  # an integer of 5000 digits; [[[[...]]]] nested too deep
        raise ValueError(f"{where}: not valid YAML: {str(exc).splitlines()[0] if str(exc) else 'nested too deeply'}") from None
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a mapping with 'absolute' and/or 'relative' lists, got {_kind(doc)}")
    rules: list[Rule] = []
    for section, items in doc.items():
        if section not in SECTIONS:
            raise ValueError(f"{where}: unknown key {_show(section)} (expected absolute, relative)")
        if items is None:
            continue
        if not isinstance(items, list):
            raise ValueError(f"{where}: {section}: expected a list of rules, got {_kind(items)}")
        parse = _absolute if section == "absolute" else _relative
        for n, item in enumerate(items, 1):
            try:
                rules.append(parse(item))
            except ValueError as exc:
                raise ValueError(f"{where}: {section} rule {n} {_show(item)}: {exc}") from None
    return rules


def read_rules(path: str) -> list[Rule]:
    """:func:`load_rules` of a local file, reading no more than the size cap allows."""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ValueError(f"{path}: thresholds file over {MAX_BYTES // 1024} KiB: refused")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return load_rules(text, path)


def evaluate(rules: list[Rule], figures: dict, previous: dict | None, previous_run: str | None,
             thresholds: str | None = None) -> dict:
    """summary.json's ``gate``: every rule's outcome, and ``passed`` (None when there are no rules).

    ``figures`` are this run's, ``previous`` the figures of ``previous_run`` (None: no earlier run)."""
    results = [_evaluate(rule, figures, previous, previous_run) for rule in rules]
    return {"passed": all(r["passed"] for r in results) if results else None, "thresholds": thresholds,
            "previous_run": previous_run, "rules": results}


def failures(gate: dict) -> list[str]:
    """One line per failed rule: what the job prints before it exits 3."""
    return [f"gate failed: {r['rule']}; {r['message']}" for r in gate.get("rules", []) if r["passed"] is False]


def direction(figure: str) -> bool:
    """True when lower is better for ``figure``; ValueError for a name the gate does not know."""
    parts = figure.split(".")
    baseline = parts[0] in BASELINES and len(parts) > 1
    metric = parts[1] if baseline else parts[0]
    if metric in HIGHER_IS_BETTER:
        return False
    if metric in LOWER_IS_BETTER and not (baseline and metric in ("integrity", "sample")):
        return True
    raise ValueError(f"unknown figure {figure!r} (known: {', '.join(HIGHER_IS_BETTER + LOWER_IS_BETTER)},"
                     f" each but integrity also after a baseline: {', '.join(BASELINES)})")


def _absolute(item) -> Rule:
    if not isinstance(item, str):
        raise ValueError(f"expected 'FIGURE OP NUMBER' as a string, got {_kind(item)}")
    m = _ABSOLUTE.fullmatch(item)
    if m is None:
        raise ValueError("expected 'FIGURE OP NUMBER' with OP one of == != <= >= < >")
    figure, op, bound = m.groups()
    threshold = _number(bound)
    return Rule(f"{figure} {op} {bound}", "absolute", figure, op, threshold, direction(figure))


def _relative(item) -> Rule:
    if isinstance(item, dict) and len(item) > 1:
        raise ValueError(f"one figure per rule, got {len(item)}")
    if not (isinstance(item, dict) and len(item) == 1):
        raise ValueError(f"expected 'FIGURE: {{{TOLERANCE}: NUMBER}}', got {_kind(item)}")
    (figure, spec), = item.items()
    if not (isinstance(figure, str) and re.fullmatch(_FIGURE, figure)):
        raise ValueError(f"not a figure name: {_show(figure)}")
    if not (isinstance(spec, dict) and list(spec) == [TOLERANCE]):
        raise ValueError(f"expected {{{TOLERANCE}: NUMBER}} after the figure")
    value = spec[TOLERANCE]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{TOLERANCE}: not a number: {_show(value)}")
    tolerance = _number(str(value))
    if tolerance < 0:
        raise ValueError(f"{TOLERANCE} must be at least 0, got {value}")
    return Rule(f"{figure}: {{{TOLERANCE}: {value}}}", "relative", figure, None, tolerance, direction(figure))


def _number(text: str) -> float:
    # Strict, unlike float(): no "nan", "inf", "1_000" or "0x10". YAML 1.1 reads 1e-2 as a string.
    if not re.fullmatch(_NUMBER, text.strip()):
        raise ValueError(f"threshold {text!r} is not a number")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"threshold {text!r} is not finite")
    return value


def _evaluate(rule: Rule, figures: dict, previous: dict | None, previous_run: str | None) -> dict:
    value = figures.get(rule.figure)
    out = {"rule": rule.text, "kind": rule.kind, "figure": rule.figure, "value": _plain(value), "previous": None}
    problem = _unusable(value)
    if problem:
        return {**out, "passed": False, "message": f"{rule.figure} is {problem} in this run: the rule cannot pass"}
    if rule.kind == "absolute":
        passed = _OPS[rule.op](value, rule.threshold)
        sep = " " if passed else ", not "
        return {**out, "passed": passed, "message": f"{rule.figure} = {_fmt(value)}{sep}{rule.op} {_fmt(rule.threshold)}"}
    run = f"run {previous_run}" if previous_run else "the previous run"
    if previous is None:
        return {**out, "passed": True, "message": "no previous run: nothing to compare to"}
    before = previous.get(rule.figure)
    if before is None:
        return {**out, "passed": True, "message": f"{rule.figure} is not in {run}: nothing to compare to"}
    out["previous"] = _plain(before)
    problem = _unusable(before)
    if problem:
        return {**out, "passed": False, "message": f"{rule.figure} is {problem} in {run}: cannot compare"}
    worse = 0.0 if value == before else (value - before if rule.lower_is_better else before - value)
    # Within float rounding of the allowance passes: 0.24 - 0.23 must not be "worse by more than 0.01".
    passed = worse <= rule.threshold or math.isclose(worse, rule.threshold, rel_tol=1e-9, abs_tol=1e-12)
    head = f"{rule.figure} = {_fmt(value)} vs {_fmt(before)} in {run}"
    if math.isnan(worse):
        return {**out, "passed": False, "message": f"{head}: cannot compare"}
    if worse <= 0:
        change = "unchanged" if worse == 0 else f"better by {_fmt(-worse)}"
    else:
        limit = "within" if passed else "more than"
        change = f"worse by {_fmt(worse)}, {limit} the {_fmt(rule.threshold)} allowed"
    better = "lower" if rule.lower_is_better else "higher"
    return {**out, "passed": passed, "message": f"{head} ({better} is better): {change}"}


def _unusable(value) -> str | None:
    if value is None:
        return "unavailable"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"not a number ({type(value).__name__})"
    if math.isnan(value):
        return "NaN"
    return None


def _plain(value):
    return value if value is None or isinstance(value, (int, float, str, bool)) else repr(value)[:80]


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(type(value), type(value).__name__)


def _show(value) -> str:
    if isinstance(value, dict):
        text = "{" + ", ".join(f"{k!r}: ..." for k in list(value)[:3]) + "}"
    else:
        text = f"({_kind(value)})" if isinstance(value, list) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem
