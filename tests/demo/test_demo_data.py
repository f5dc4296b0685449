"""Tests for the built-in "mathmix" demo data set (pure Python, no Ray, no torch)."""

from __future__ import annotations

import json
import re
from collections import Counter
from fractions import Fraction

import pytest

from s2l_ray.demo.data import (
    EASY_KINDS,
    FACT_WEIGHTS,
    KIND_PROPORTIONS,
    KINDS,
    SOURCE_MIX,
    SOURCES,
    extract_final_answer,
    format_answer,
    generate_mathmix,
    pretraining_corpus,
    row_labels,
    solve,
    tokenizer_corpus,
    validation_split,
    write_mathmix,
)


def _independent(kind: str, instr: str) -> int:
    """A third reading of each template, by its words (solve() reads numbers by position)."""
    if m := re.fullmatch(r"What is (\d+) ([-+]) (\d+)\?", instr):
        a, b = int(m[1]), int(m[3])
        assert kind in (("add_small", "add_2digit") if m[2] == "+" else ("subtract",))
        return a + b if m[2] == "+" else a - b
    if m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", instr):
        return max(int(m[1]), int(m[2]))
    if m := re.fullmatch(r"What number comes after (\d+)\?", instr):
        return int(m[1]) + 1
    if m := re.fullmatch(r"What is twice (\d+)\?", instr):
        return int(m[1]) * 2
    if m := re.fullmatch(r"What is half of (\d+)\?", instr):
        assert int(m[1]) % 2 == 0
        return int(m[1]) // 2
    if m := re.fullmatch(r"What is the sum of the digits of (\d+)\?", instr):
        return sum(map(int, m[1]))
    if m := re.fullmatch(r"What is the (last|first) digit of (\d+)\?", instr):
        return int(m[2][-1] if m[1] == "last" else m[2][0])
    if m := re.fullmatch(r"Reverse the digits of (\d+)\.", instr):
        assert not m[1].endswith("0")
        return int(m[1][::-1])
    if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", instr):
        return int(m[1]) + int(m[2])
    if m := re.fullmatch(r"What is the smallest of (\d+), (\d+) and (\d+)\?", instr):
        assert len({m[1], m[2], m[3]}) == 3
        return min(int(m[1]), int(m[2]), int(m[3]))
    raise AssertionError(f"unexpected instruction {instr!r} of kind {kind}")


def _kind_of(instr: str) -> str:
    """The kind whose generator wrote instr (by its template; the two additions by range)."""
    from s2l_ray.demo import data

    for kind, gen in data._GENERATORS.items():
        import random

        probe = gen(random.Random(0), 1)[0]
        if re.sub(r"\d+", "N", probe) == re.sub(r"\d+", "N", instr):
            if kind in ("add_small", "add_2digit") and "add_small" in KINDS:
                _, b = map(int, re.findall(r"\d+", instr))
                return "add_small" if b <= 9 else "add_2digit"
            return kind
    raise AssertionError(instr)


def _shown(row: dict) -> int:
    return int(Fraction(extract_final_answer(row["output"])))


@pytest.fixture(scope="module")
def big() -> tuple[list[dict], list[dict]]:
    return generate_mathmix(n_train=5000, n_test_per_source=50, seed=0)


def test_deterministic_and_seed_dependent() -> None:
    a = generate_mathmix(n_train=300, n_test_per_source=5, seed=3)
    assert a == generate_mathmix(n_train=300, n_test_per_source=5, seed=3)
    b = generate_mathmix(n_train=300, n_test_per_source=5, seed=4)
    assert a[0] != b[0] and a[1] != b[1]


def test_sizes_per_kind_and_skew(big: tuple[list[dict], list[dict]]) -> None:
    train, test = big
    assert len(train) == 5000 and len(test) == 50 * len(KINDS)
    assert abs(sum(KIND_PROPORTIONS.values()) - 1) < 1e-9
    counts = Counter(r["kind"] for r in train)
    assert set(counts) == set(KINDS)
    for kind, p in KIND_PROPORTIONS.items():  # duplicates are copies of random rows: +-1%
        assert abs(counts[kind] / len(train) - p) < 0.01, (kind, counts[kind])
    assert max(counts.values()) >= 10 * min(counts.values())
    # a few large easy kinds hold most rows; each is larger than any hard kind
    assert sum(counts[k] for k in EASY_KINDS) > 0.7 * len(train)
    assert min(counts[k] for k in EASY_KINDS) > 2 * max(
        counts[k] for k in KINDS if k not in EASY_KINDS)
    assert Counter(r["kind"] for r in test) == dict.fromkeys(KINDS, 50)
    assert all(set(r) == {"source", "instruction", "output", "kind", "wrong"} for r in train)
    assert all(set(r) == {"source", "instruction", "output", "answer", "kind"} for r in test)
    assert all(r["instruction"].isascii() and r["output"].isascii() for r in train + test)
    # short problems and answers: a tiny model's context is a few dozen tokens
    assert max(len(r["instruction"]) + len(r["output"]) for r in train + test) < 70


def test_sources_mix_kinds(big: tuple[list[dict], list[dict]]) -> None:
    train, test = big
    by_source: dict[str, Counter] = {}
    for r in train:
        by_source.setdefault(r["source"], Counter())[r["kind"]] += 1
    assert set(by_source) == set(SOURCES)
    for source, kinds in by_source.items():
        assert len(kinds) >= 3, (source, kinds)  # every source mixes several kinds
        assert max(kinds.values()) < 0.7 * sum(kinds.values()), (source, kinds)
        assert set(kinds) == {k for k, mix in SOURCE_MIX.items() if source in mix}
    # the held-out set is scored per kind: its source names the kind
    assert all(r["source"] == r["kind"] for r in test)


@pytest.mark.parametrize("n_train", [1, 3, 8, 9, 20])
def test_small_n_train_covers_kinds(n_train: int) -> None:
    train, _ = generate_mathmix(n_train=n_train, n_test_per_source=1, duplicate_rate=0.4)
    assert len(train) == n_train
    assert len({r["kind"] for r in train}) == min(n_train, len(KINDS))


def test_answers_parse_back_to_the_generators_value(big: tuple[list[dict], list[dict]]) -> None:
    train, test = big
    for row in train + test:
        assert re.fullmatch(r"The answer is \d+\.", row["output"]), row
        truth = solve(row["kind"], row["instruction"])
        assert truth == _independent(row["kind"], row["instruction"]), row
        assert (_shown(row) == truth) == (not row.get("wrong", False)), row
    for row in test:
        assert extract_final_answer(row["output"]) == row["answer"] == format_answer(
            solve(row["kind"], row["instruction"]))


def test_held_out_disjoint_from_train(big: tuple[list[dict], list[dict]]) -> None:
    train, test = big
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    assert len({r["instruction"] for r in test}) == len(test)


def test_wrong_rows_marked(big: tuple[list[dict], list[dict]]) -> None:
    train, _ = big
    wrong = [r for r in train if r["wrong"]]
    assert abs(len(wrong) / len(train) - 0.03) < 0.01
    assert len({r["kind"] for r in wrong}) >= 5  # noise is spread over the kinds
    assert all(_shown(r) != solve(r["kind"], r["instruction"]) and _shown(r) >= 0
               for r in wrong)
    clean, _ = generate_mathmix(n_train=1000, n_test_per_source=0, wrong_answer_rate=0.0)
    assert not any(r["wrong"] for r in clean)
    # changing the rate changes only the affected rows' outputs
    assert [r["instruction"] for r in clean] == [r["instruction"] for r in generate_mathmix(
        n_train=1000, n_test_per_source=0)[0]]


def test_row_labels() -> None:
    train, test = generate_mathmix(n_train=50, n_test_per_source=2, seed=1)
    for r in train:
        assert row_labels(json.dumps(r)) == {"kind": r["kind"], "wrong": r["wrong"]}
    assert row_labels(test[0])["kind"] == test[0]["kind"]
    assert row_labels('{"instruction": "x", "output": "y"}') == {"kind": None, "wrong": None}


def test_duplicate_rate(big: tuple[list[dict], list[dict]]) -> None:
    train, _ = big
    n_dup = len(train) - len({json.dumps(r, sort_keys=True) for r in train})
    assert abs(n_dup / len(train) - 0.02) < 0.005
    assert len({r["instruction"] for r in train}) == len(train) - n_dup  # only exact copies
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


def test_tokenizer_corpus_covers_kinds() -> None:
    texts = tokenizer_corpus(seed=0, n=80)
    assert len(texts) == 160 and texts == tokenizer_corpus(seed=0, n=80)
    assert sum("The answer is" in t for t in texts) == 80 and all(t.isascii() for t in texts)
    questions = [t.split("\n")[0] for t in texts if "The answer is" in t]
    for kind in KINDS:  # every kind's question is in the tokenizer's corpus
        assert sum(_kind_of(q) == kind for q in questions) == 10, kind


def test_pretraining_corpus_never_asks_the_demo_questions() -> None:
    corpus = pretraining_corpus(seed=0, n=5000)
    assert corpus == pretraining_corpus(seed=0, n=5000) != pretraining_corpus(seed=1, n=5000)
    assert len(set(corpus)) > 3000  # broad, not a few memorised lines
    assert not any("?" in t or "answer" in t for t in corpus)
    train, test = generate_mathmix(n_train=2000, n_test_per_source=40)
    assert not {r["instruction"] for r in train + test} & set(corpus)


def _true_statement(text: str) -> str:
    """The form of a pre-training statement, after checking that what it states is true."""
    def ints(*groups: str) -> list[int]:
        return [int(g) for g in groups]

    if m := re.fullmatch(r"After (\d+) comes (\d+)\.|(\d+) follows (\d+)\.", text):
        a, b = ints(m[1], m[2]) if m[1] else ints(m[4], m[3])
        assert b == a + 1 and a % 10 != 9, text  # the count_on facts, no carry
        return "after"
    if m := re.fullmatch(r"Counting: (\d+), (\d+), (\d+), (\d+)\.", text):
        n = ints(*m.groups())
        assert n == list(range(n[0], n[0] + 4)), text
        return "counting"
    if m := re.fullmatch(r"(\d+) is (more|less) than (\d+)\.", text):
        a, b = ints(m[1], m[3])
        assert (a > b) == (m[2] == "more") and a != b, text
        return "order"
    if m := re.fullmatch(r"Of (\d+), (\d+) and (\d+), the least is (\d+)\.", text):
        *abc, least = ints(*m.groups())
        assert least == min(abc) and len(set(abc)) == 3, text
        return "least"
    if m := re.fullmatch(r"Two times (\d+) is (\d+)\.|(\d+) plus \3 is (\d+)\.", text):
        n, d = ints(m[1], m[2]) if m[1] else ints(m[3], m[4])
        assert d == 2 * n and set(str(n)) <= set("01234"), text  # the double facts: no carry
        return "two_times"
    if m := re.fullmatch(r"(\d+) split in two is (\d+)\.|(\d+) is (\d+) and \4\.", text):
        d, n = ints(m[1], m[2]) if m[1] else ints(m[3], m[4])
        assert d == 2 * n and set(str(d)) <= set("02468"), text  # the half facts: no borrow
        return "split"
    if m := re.fullmatch(r"The digits of (\d+) are ((?:\d, )*\d) and (\d)\.", text):
        assert m[2].replace(", ", "") + m[3] == m[1], text
        return "digits"
    if m := re.fullmatch(r"Read backwards, (\d+) is (\d+)\.", text):
        assert m[1][::-1] == m[2], text
        return "backwards"
    if m := re.fullmatch(r"(\d+) plus (\d+) is (\d+)\.", text):
        a, b, c = ints(*m.groups())
        assert a + b == c, text
        return "plus"
    raise AssertionError(f"unexpected statement {text!r}")


def test_pretraining_corpus_states_true_facts_for_every_kind() -> None:
    corpus = pretraining_corpus(seed=0, n=4000)
    forms = Counter(_true_statement(t) for t in corpus)
    assert set(forms) == set(FACT_WEIGHTS)
    total = sum(FACT_WEIGHTS.values())
    for form, weight in FACT_WEIGHTS.items():  # drawn in proportion to its weight
        assert abs(forms[form] / len(corpus) - weight / total) < 0.03, (form, forms)
    # in other words than the demo's questions: never one of its instructions
    train, test = generate_mathmix(n_train=2000, n_test_per_source=40)
    statements = set(corpus)
    assert statements.isdisjoint(r["instruction"] for r in train + test)


def test_small_kinds_need_no_carry(big: tuple[list[dict], list[dict]]) -> None:
    train, test = big
    for r in train + test:
        n = re.findall(r"\d+", r["instruction"])
        if r["kind"] == "double":  # doubled digit by digit
            assert set(n[0]) <= set("01234") and len(n[0]) >= 2, r
        elif r["kind"] == "half":
            assert set(n[0]) <= set("02468") and len(n[0]) >= 2, r
        elif r["kind"] == "count_on":
            assert not n[0].endswith("9"), r
        elif r["kind"] in ("compare", "min3"):  # two-digit numbers
            assert all(1 <= int(x) <= 99 for x in n), r


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


@pytest.mark.parametrize("carve", [False, True])
def test_validation_split_is_disjoint_correct_and_keeps_the_training_rows(carve: bool) -> None:
    train, val = validation_split(600, 5, carve=carve)
    rows, _ = generate_mathmix(n_train=600, n_test_per_source=0)
    seen: set[str] = set()
    unique = [r for r in rows if r["instruction"] not in seen and not seen.add(r["instruction"])]
    assert [r["kind"] for r in val] == [k for k in KINDS for _ in range(5)]
    assert not any(r["wrong"] for r in val)
    assert not {r["instruction"] for r in val} & {r["instruction"] for r in train}
    if carve:  # taken out of the training rows
        assert len(train) == len(unique) - len(val)
    else:  # the demo's training rows, deduplicated, all kept
        assert train == unique
