"""Tests for the built-in "mathmix" demo data set (pure Python, no Ray, no torch)."""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections import Counter
from fractions import Fraction

import pytest

from s2l_ray.demo.data import (
    SOURCES,
    extract_final_answer,
    format_answer,
    generate_mathmix,
    tokenizer_corpus,
    write_mathmix,
)

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.USub: operator.neg}


def _eval(expr: str) -> Fraction:
    """Exact arithmetic on +-*/ and parentheses; anything else is a test failure."""
    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp):
            return _OPS[type(node.op)](ev(node.operand))
        raise AssertionError(f"unexpected syntax in {expr!r}")
    return ev(ast.parse(expr, mode="eval"))


def _solve(source: str, instr: str) -> Fraction:
    """Independent solver: recomputes the correct answer from the instruction text alone."""
    nums = [Fraction(n) for n in re.findall(r"\d+(?:\.\d+)?", instr)]
    if source == "arith_easy":
        return _eval(re.fullmatch(r"What is (.+)\?", instr)[1])
    if source == "arith_chain":
        return _eval(re.fullmatch(r"Evaluate (.+)\.", instr)[1])
    if source == "linear_eq":
        lhs, rhs = re.fullmatch(r"Solve for x: (.+) = (.+)\.", instr).groups()
        def f(x: int) -> Fraction:
            side = [re.sub(r"(\d*)x", lambda m: f"({m[1] or 1} * {x})", s) for s in (lhs, rhs)]
            return _eval(side[0]) - _eval(side[1])
        return -f(0) / (f(1) - f(0))
    if source == "percent":
        if instr.startswith("What is"):
            return nums[0] * nums[1] / 100
        if "jacket" in instr:
            return nums[0] - nums[0] * nums[1] / 100
        return nums[0] + nums[0] * nums[1] / 100
    if source == "gcd_lcm":
        a, b = int(nums[0]), int(nums[1])
        return Fraction(math.gcd(a, b) if "greatest" in instr else math.lcm(a, b))
    if source == "fractions":
        m = re.match(r"What is (\d+/\d+) ([-+*]) (\d+/\d+)\?", instr)
        return _OPS[{"+": ast.Add, "-": ast.Sub, "*": ast.Mult}[m[2]]](
            Fraction(m[1]), Fraction(m[3]))
    assert source == "word_problems"
    if " buys " in instr:
        return nums[0] * nums[1] + nums[2] * nums[3]
    if "km per hour" in instr:
        return nums[0] * nums[1] + nums[2] * nums[3]
    if "times as old" in instr:
        k, years, total = nums[:3]
        return k * (total - 2 * years) / (k + 1)
    made, sold1, sold2, box = nums[:4]
    return (made - sold1 - sold2) / box


def _correct(row: dict) -> bool:
    answer = extract_final_answer(row["output"])
    return Fraction(answer) == _solve(row["source"], row["instruction"])


@pytest.fixture(scope="module")
def big() -> tuple[list[dict], list[dict]]:
    return generate_mathmix(n_train=5000, n_test_per_source=50, seed=0)


def test_deterministic_and_seed_dependent() -> None:
    a = generate_mathmix(n_train=300, n_test_per_source=5, seed=3)
    assert a == generate_mathmix(n_train=300, n_test_per_source=5, seed=3)
    b = generate_mathmix(n_train=300, n_test_per_source=5, seed=4)
    assert a[0] != b[0] and a[1] != b[1]


def test_sizes_sources_and_skew(big: tuple[list[dict], list[dict]]) -> None:
    train, test = big
    assert len(train) == 5000 and len(test) == 50 * len(SOURCES)
    assert len(SOURCES) >= 6 and len(set(SOURCES)) == len(SOURCES)
    counts = Counter(r["source"] for r in train)
    assert set(counts) == set(SOURCES)
    assert max(counts.values()) >= 10 * min(counts.values())
    assert Counter(r["source"] for r in test) == dict.fromkeys(SOURCES, 50)
    assert all(set(r) == {"source", "instruction", "output"} for r in train)
    assert all(set(r) == {"source", "instruction", "output", "answer"} for r in test)
    assert all(r["instruction"].isascii() and r["output"].isascii() for r in train + test)
    # Sources differ in output length: answer-only rows are much shorter than multi-step ones.
    mean_len = {s: sum(len(r["output"]) for r in train if r["source"] == s) / counts[s]
                for s in SOURCES}
    assert mean_len["arith_easy"] < 25 and max(mean_len.values()) > 100


@pytest.mark.parametrize("n_train", [1, 3, 7, 8, 20])
def test_small_n_train_covers_sources(n_train: int) -> None:
    train, _ = generate_mathmix(n_train=n_train, n_test_per_source=1, duplicate_rate=0.4)
    assert len(train) == n_train
    assert len({r["source"] for r in train}) == min(n_train, len(SOURCES))


def test_every_output_has_a_parseable_answer(big: tuple[list[dict], list[dict]]) -> None:
    train, test = big
    for row in train + test:
        assert row["output"].endswith(".") and extract_final_answer(row["output"]) is not None, row


def test_test_split_correct_and_disjoint(big: tuple[list[dict], list[dict]]) -> None:
    train, test = big
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    assert len({r["instruction"] for r in test}) == len(test)
    for row in test:
        assert extract_final_answer(row["output"]) == row["answer"], row
        assert Fraction(row["answer"]) == _solve(row["source"], row["instruction"]), row


def test_wrong_answer_rate_and_consistency(big: tuple[list[dict], list[dict]]) -> None:
    train, _ = big
    wrong = [r for r in train if not _correct(r)]
    assert abs(len(wrong) / len(train) - 0.03) < 0.01
    assert len({r["source"] for r in wrong}) >= 4  # noise is spread over the sources
    for row in wrong:  # the rationale's last step shows the same wrong answer
        body = row["output"].rsplit("The answer is", 1)[0]
        assert row["source"] == "arith_easy" or extract_final_answer(row["output"]) in body
    clean, _ = generate_mathmix(n_train=1000, n_test_per_source=0, wrong_answer_rate=0.0)
    assert all(_correct(r) for r in clean)


def test_duplicate_rate(big: tuple[list[dict], list[dict]]) -> None:
    train, _ = big
    n_dup = len(train) - len({json.dumps(r, sort_keys=True) for r in train})
    assert abs(n_dup / len(train) - 0.02) < 0.005
    none, _ = generate_mathmix(n_train=1000, n_test_per_source=0, duplicate_rate=0.0)
    assert len({json.dumps(r, sort_keys=True) for r in none}) == 1000


def test_write_mathmix(tmp_path) -> None:
    paths = write_mathmix(tmp_path / "mm", n_train=50, n_test_per_source=3, seed=1)
    assert set(paths) == {"train", "test"}
    expected = generate_mathmix(n_train=50, n_test_per_source=3, seed=1)
    for split, rows in zip(("train", "test"), expected, strict=True):
        with open(paths[split], encoding="utf-8") as f:
            assert [json.loads(line) for line in f] == rows


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"n_train": 0}, "n_train"),
    ({"n_train": 2.5}, "n_train"),
    ({"n_test_per_source": -1}, "n_test_per_source"),
    ({"wrong_answer_rate": 0.5}, "wrong_answer_rate"),
    ({"wrong_answer_rate": -0.1}, "wrong_answer_rate"),
    ({"duplicate_rate": 0.9}, "duplicate_rate"),
])
def test_argument_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_mathmix(**kwargs)


def test_tokenizer_corpus_covers_sources() -> None:
    texts = tokenizer_corpus(seed=0, n=70)
    assert len(texts) == 70 and texts == tokenizer_corpus(seed=0, n=70)
    assert all("The answer is" in t and t.isascii() for t in texts)
    assert any("Solve for x" in t for t in texts) and any("reduced fraction" in t for t in texts)


@pytest.mark.parametrize(("value", "style", "text"), [
    (85, "fraction", "85"), (Fraction(-7, 12), "fraction", "-7/12"),
    (Fraction(6, 3), "fraction", "2"),
    (Fraction(73, 2), "decimal", "36.5"), (Fraction(-1, 4), "decimal", "-0.25"),
    (Fraction(1247, 100), "decimal", "12.47"), (0, "decimal", "0"),
])
def test_format_answer_round_trips(value: Fraction, style: str, text: str) -> None:
    assert format_answer(value, style) == text
    assert extract_final_answer(f"Some steps. The answer is {text}.") == text


@pytest.mark.parametrize(("text", "expected"), [
    ("", None),
    ("I think it is 42.", None),
    ("The answer is unknown.", None),
    ("The answer is", None),
    ("The answer is 3. Wait, 3 + 4 = 7. The answer is 7.", "7"),
    ("The answer is 5. The answer is", None),  # truncated: the last one has no number
    ("We get 12 and 15, so the answer is 27!!", "27"),
    ("The answer is -14.", "-14"),
    ("The answer is 3/4.", "3/4"),
    ("The answer is -6/8", "-3/4"),
    ("The answer is 4/2.", "2"),
    ("The answer is 1/0.", None),
    ("The answer is 12.50 dollars.", "12.5"),
    ("The answer is 7.0.", "7"),
    ("The answer is -0.25.)", "-0.25"),
    ("The answer is $1,250.", "1250"),
    ("The answer is: x = 5.", "5"),
    ("The answer is 85.\n\n### Instruction: What is 2 + 2?\nThe answerish 9", "85"),
    ("the ANSWER IS 9 apples", "9"),
])
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected
