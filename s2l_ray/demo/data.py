"""Built-in demo data set "mathmix": seeded, MathInstruct-like short number problems.

A tiny model on a laptop CPU can learn it (short problems, answers of a few digits, spelled digit
by digit by the tiny tokenizer), and it keeps what makes MathInstruct a fair test of S2L:

* kinds of problem of very different size and difficulty: three large, redundant, easy kinds
  (`KIND_PROPORTIONS`: 75% of the rows) and five small, harder ones; the largest kind is >= 10x
  the smallest;
* a pre-training corpus (`pretraining_corpus`, what the `tiny-pre:*` models read) that states
  the facts the small kinds need in other words ("Two times 213 is 426." for "What is twice
  213?"), as an LLM has read arithmetic before it is fine-tuned: fine-tuning then teaches the
  question format and which known fact it asks for, the paper's setting;
* sources that each mix several kinds (`SOURCE_MIX`), as MathInstruct's source datasets do, so
  that balancing sources is not the same as balancing kinds;
* a few percent of train rows with a wrong final answer and a few exact duplicates;
* every output is a short checkable final answer, "The answer is X.".

Each train row is {"source", "instruction", "output", "kind", "wrong"}: `kind` and `wrong` are
the generator's knowledge (what kind of problem, whether the shown answer is wrong). Ingest keeps
each row's JSON in the `raw` column, so they reach every stage (`row_labels`). Held-out rows are
{"source", "instruction", "output", "answer", "kind"} with `source` = `kind`: the evaluation scores
per `source`, and the demo scores per kind. Held-out instructions never occur in train.

Every random stream is a ``random.Random`` seeded with a string naming its purpose (string seeds
are hashed with SHA-512, so they are stable across processes and PYTHONHASHSEED). Separate streams
(one per kind and split, one for sources, one for noise, one for duplicates, one for shuffling)
mean that changing ``wrong_answer_rate`` changes only the outputs of the affected rows, and that
the first k problems of a kind do not depend on n_train. Pure Python and import-light: stdlib only.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable, Sequence
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Fixed order; proportions sum to 1; the largest is 0.32 / 0.03 = 10.7x the smallest. The kinds
# were chosen on a validation split carved from training data (13 candidate kinds, 270 rows
# each, the pre-trained tiny-pre:small target fine-tuned 2000 steps; benchmarks/results/
# demo_cpu.md): the three it learned best are the large easy kinds, the next five the small
# harder ones. Arithmetic that needs carries across digits (adding or subtracting two-digit
# numbers, digit sums) stayed near 0 and is left out: a tiny CPU model does not learn it. A
# second study (same file) made the small kinds carry-free (double, half, count on digit by
# digit; two-digit compare and min3) and the pre-training state their facts: with all the data
# the target then learns them from 60-140 rows each (validation macro EM 0.81-0.86, was 0.44).
KIND_PROPORTIONS: dict[str, float] = {
    "first_digit": 0.32,  # easy, large, redundant (copying one digit)
    "last_digit": 0.26,
    "reverse": 0.17,
    "count_on": 0.07,  # harder, small
    "compare": 0.06,
    "min3": 0.05,
    "double": 0.04,
    "half": 0.03,
}
KINDS: tuple[str, ...] = tuple(KIND_PROPORTIONS)
EASY_KINDS: tuple[str, ...] = KINDS[:3]

# Which sources each kind is drawn into (weights); every source mixes at least three kinds, and
# the two large sources hold mostly easy rows with a share of hard ones, as real datasets do.
SOURCE_MIX: dict[str, dict[str, float]] = {
    "first_digit": {"drills": 0.6, "worksheets": 0.3, "quizzes": 0.1},
    "last_digit": {"drills": 0.5, "quizzes": 0.4, "worksheets": 0.1},
    "reverse": {"drills": 0.7, "worksheets": 0.3},
    "count_on": {"worksheets": 0.6, "contest": 0.4},
    "compare": {"worksheets": 0.5, "quizzes": 0.2, "contest": 0.3},
    "min3": {"quizzes": 0.6, "contest": 0.4},
    "double": {"contest": 0.7, "quizzes": 0.3},
    "half": {"quizzes": 0.5, "contest": 0.5},
}
SOURCES: tuple[str, ...] = ("drills", "worksheets", "quizzes", "contest")

# (instruction, correct answer)
Problem = tuple[str, int]

# The largest number in each small kind's problems (times the widening factor `s` once a range
# is used up). The pre-training corpus states facts over the same ranges.
NUMBER_TOP: dict[str, int] = {"count_on": 999, "compare": 99, "min3": 99}


def format_answer(value: Fraction | int, style: str = "fraction") -> str:
    """Canonical answer string: "85", "-7/12" (style "fraction") or "36.5" (style "decimal")."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    if style == "fraction":
        return f"{value.numerator}/{value.denominator}"
    cents = value * 100
    if cents.denominator != 1:  # the generators only build answers with <= 2 decimals
        raise ValueError(f"{value} has more than 2 decimals; use style='fraction'")
    sign, c = ("-" if cents < 0 else ""), abs(cents.numerator)
    return f"{sign}{c // 100}.{c % 100:02d}".rstrip("0").rstrip(".")


def _add_small(rng: random.Random, s: int) -> Problem:
    a, b = rng.randint(0, 99 * s), rng.randint(1, 9)
    return f"What is {a} + {b}?", a + b


def _compare(rng: random.Random, s: int) -> Problem:
    a, b = rng.sample(range(1, NUMBER_TOP["compare"] * s + 1), 2)
    return f"Which is larger, {a} or {b}?", max(a, b)


def _count_on(rng: random.Random, s: int) -> Problem:
    n = rng.randint(1, NUMBER_TOP["count_on"] * s)
    while n % 10 == 9:  # no carry: the answer is the number with its last digit counted on
        n = rng.randint(1, NUMBER_TOP["count_on"] * s)
    return f"What number comes after {n}?", n + 1


def _add_2digit(rng: random.Random, s: int) -> Problem:
    a, b = rng.randint(10, 99 * s), rng.randint(10, 99 * s)
    return f"What is {a} + {b}?", a + b


def _subtract(rng: random.Random, s: int) -> Problem:
    a = rng.randint(11, 99 * s)
    b = rng.randint(10, a - 1)
    return f"What is {a} - {b}?", a - b


def _spelled(rng: random.Random, n_digits: int, first: str, rest: str) -> int:
    """A number of n_digits digits: the first drawn from `first`, the others from `rest`."""
    return int(rng.choice(first) + "".join(rng.choice(rest) for _ in range(n_digits - 1)))


def _double(rng: random.Random, s: int) -> Problem:
    # digits 0-4 only: doubling never carries, so the answer is a digit-by-digit fact
    n = _spelled(rng, rng.randint(2, 3 + s), "1234", "01234")
    return f"What is twice {n}?", 2 * n


def _digit_sum(rng: random.Random, s: int) -> Problem:
    n = rng.randint(100, 999 * s)
    return f"What is the sum of the digits of {n}?", sum(int(c) for c in str(n))


def _half(rng: random.Random, s: int) -> Problem:
    # even digits only: halving never borrows, so the answer is a digit-by-digit fact
    n = _spelled(rng, rng.randint(2, 3 + s), "2468", "02468")
    return f"What is half of {n}?", n // 2


def _last_digit(rng: random.Random, s: int) -> Problem:
    n = rng.randint(10, 9999 * s)
    return f"What is the last digit of {n}?", n % 10


def _first_digit(rng: random.Random, s: int) -> Problem:
    n = rng.randint(10, 9999 * s)
    return f"What is the first digit of {n}?", int(str(n)[0])


def _reverse(rng: random.Random, s: int) -> Problem:
    n = rng.randint(100, 999 * s)
    while n % 10 == 0:
        n = rng.randint(100, 999 * s)
    return f"Reverse the digits of {n}.", int(str(n)[::-1])


def _add_1digit(rng: random.Random, s: int) -> Problem:
    a, b = rng.randint(0, 9 * s), rng.randint(0, 9 * s)
    return f"What is {a} plus {b}?", a + b


def _min3(rng: random.Random, s: int) -> Problem:
    a, b, c = rng.sample(range(10, NUMBER_TOP["min3"] * s + 1), 3)
    return f"What is the smallest of {a}, {b} and {c}?", min(a, b, c)


_GENERATORS: dict[str, Callable[[random.Random, int], Problem]] = {
    "last_digit": _last_digit, "first_digit": _first_digit, "reverse": _reverse,
    "add_1digit": _add_1digit, "min3": _min3,
    "add_small": _add_small, "compare": _compare, "count_on": _count_on,
    "add_2digit": _add_2digit, "subtract": _subtract, "double": _double,
    "digit_sum": _digit_sum, "half": _half,
}


def solve(kind: str, instruction: str) -> int:
    """The correct answer, recomputed from the instruction text alone (a second implementation
    that the tests check the generator against)."""
    nums = [int(x) for x in re.findall(r"\d+", instruction)]
    if kind in ("add_small", "add_2digit"):
        return nums[0] + nums[1]
    if kind == "subtract":
        return nums[0] - nums[1]
    if kind == "compare":
        return max(nums)
    if kind == "count_on":
        return nums[0] + 1
    if kind == "double":
        return 2 * nums[0]
    if kind == "half":
        return nums[0] // 2
    if kind == "digit_sum":
        return sum(int(c) for c in str(nums[0]))
    if kind == "last_digit":
        return nums[0] % 10
    if kind == "first_digit":
        return int(str(nums[0])[0])
    if kind == "reverse":
        return int(str(nums[0])[::-1])
    if kind == "add_1digit":
        return nums[0] + nums[1]
    if kind == "min3":
        return min(nums)
    raise ValueError(f"unknown kind {kind!r}; one of {sorted(_GENERATORS)}")


def render(answer: int) -> str:
    """The output text of a row whose final answer is `answer`."""
    return f"The answer is {answer}."


def _wrong(answer: int, rng: random.Random) -> int:
    """A plausible wrong answer: off by a little, as careless arithmetic is (never negative)."""
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    return answer + delta if answer + delta >= 0 else answer - delta


def _unique_problems(kind: str, rng: random.Random, count: int, taken: set[str]) -> list[Problem]:
    """Draws `count` problems whose instructions are not in `taken` (updated in place)."""
    out: list[Problem] = []
    scale, misses = 1, 0
    while len(out) < count:
        prob = _GENERATORS[kind](rng, scale)
        if prob[0] in taken:
            misses += 1
            if misses > 200:  # this number range is used up: widen it rather than loop forever
                scale, misses = scale + 1, 0
            continue
        misses = 0
        taken.add(prob[0])
        out.append(prob)
    return out


def _allocate(n: int) -> dict[str, int]:
    """Largest-remainder split of n over the kinds, at least 1 each while n allows it."""
    raw = {k: n * p for k, p in KIND_PROPORTIONS.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(KINDS, key=lambda k: (counts[k] - raw[k], KINDS.index(k)))[
            : n - sum(counts.values())]:
        counts[k] += 1
    for k in reversed(KINDS):  # take from the largest kind to give the rare ones a row
        top = max(KINDS, key=lambda t: (counts[t], -KINDS.index(t)))
        if counts[k] == 0 and counts[top] > 1:
            counts[k], counts[top] = 1, counts[top] - 1
    return counts


def _validate(n_train: int, n_test_per_source: int, wrong_answer_rate: float,
              duplicate_rate: float) -> None:
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train must be an integer >= 1 (got {n_train!r}); pass a row count")
    if (isinstance(n_test_per_source, bool) or not isinstance(n_test_per_source, int)
            or n_test_per_source < 0):
        raise ValueError(f"n_test_per_source must be an integer >= 0 (got {n_test_per_source!r})")
    for name, rate in (("wrong_answer_rate", wrong_answer_rate),
                       ("duplicate_rate", duplicate_rate)):
        if not 0.0 <= float(rate) < 0.5:
            raise ValueError(f"{name} must be in [0, 0.5) (got {rate!r}); e.g. pass 0.03")


def _pick_source(kind: str, rng: random.Random) -> str:
    mix = SOURCE_MIX[kind]
    return rng.choices(list(mix), weights=list(mix.values()))[0]


def generate_mathmix(n_train: int = 2000, n_test_per_source: int = 50, seed: int = 0,
                     wrong_answer_rate: float = 0.03, duplicate_rate: float = 0.02,
                     ) -> tuple[list[dict], list[dict]]:
    """Returns (train_rows, test_rows); see the module docstring.

    `n_test_per_source` held-out rows are drawn per kind (the held-out `source` is the kind).
    """
    _validate(n_train, n_test_per_source, wrong_answer_rate, duplicate_rate)
    # Duplicates never take the place of a kind's only row.
    n_dup = min(round(n_train * duplicate_rate), n_train - min(n_train, len(KINDS)))
    n_unique = n_train - n_dup
    taken: set[str] = set()
    problems: list[tuple[str, Problem]] = []
    for kind, count in _allocate(n_unique).items():
        rng = random.Random(f"mathmix:{seed}:train:{kind}")
        problems += [(kind, p) for p in _unique_problems(kind, rng, count, taken)]
    source_rng = random.Random(f"mathmix:{seed}:source")
    noise_rng = random.Random(f"mathmix:{seed}:wrong")
    wrong = set(noise_rng.sample(range(n_unique), round(n_unique * wrong_answer_rate)))
    train = []
    for i, (kind, (instr, ans)) in enumerate(problems):
        shown = _wrong(ans, noise_rng) if i in wrong else ans
        train.append({"source": _pick_source(kind, source_rng), "instruction": instr,
                      "output": render(shown), "kind": kind, "wrong": i in wrong})
    dup_rng = random.Random(f"mathmix:{seed}:dup")
    base = train[:n_unique]
    train += [dict(dup_rng.choice(base)) for _ in range(n_dup)]
    random.Random(f"mathmix:{seed}:shuffle").shuffle(train)

    test = []
    for kind in KINDS:  # a separate stream, and train instructions are excluded
        rng = random.Random(f"mathmix:{seed}:test:{kind}")
        for instr, ans in _unique_problems(kind, rng, n_test_per_source, taken):
            test.append({"source": kind, "instruction": instr, "output": render(ans),
                         "answer": format_answer(ans), "kind": kind})
    random.Random(f"mathmix:{seed}:shuffle-test").shuffle(test)
    logger.debug("mathmix seed=%s: %d train (%d wrong, %d duplicate), %d test", seed, n_train,
                 len(wrong), n_dup, len(test))
    return train, test


def validation_split(n_train: int, n_val: int = 25, seed: int = 0, *, carve: bool = False,
                     kinds: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows) for design studies; the held-out split is never touched.

    The training rows are `generate_mathmix`'s with exact duplicates dropped (as ingest drops
    them). The validation rows are `n_val` correct rows per kind (`kinds`, default KINDS) of the
    TRAINING stream: by default drawn from it at twice the size (a kind's first problems do not
    depend on n_train), so the training rows stay exactly the demo's and no validation problem
    is among them; carve=True takes them out of the training rows instead (the small kinds then
    train on n_val fewer rows)."""
    rows, _ = generate_mathmix(n_train=n_train, n_test_per_source=0, seed=seed)
    seen: set[str] = set()
    unique = [r for r in rows if not (r["instruction"] in seen or seen.add(r["instruction"]))]
    if carve:
        pool = unique
    else:
        more, _ = generate_mathmix(n_train=2 * n_train, n_test_per_source=0, seed=seed)
        pool = [r for r in more if r["instruction"] not in seen]
    val = [r for k in (KINDS if kinds is None else kinds)
           for r in [x for x in pool if x["kind"] == k and not x["wrong"]][:n_val]]
    held = {r["instruction"] for r in val}
    return [r for r in unique if r["instruction"] not in held], val


def row_labels(raw: str | dict[str, Any]) -> dict[str, Any]:
    """{"kind", "wrong"} of a mathmix row (its JSON text, e.g. ingest's `raw` column, or the
    dict); None values for rows that do not come from the generator."""
    row = json.loads(raw) if isinstance(raw, str) else raw
    kind = row.get("kind") if isinstance(row, dict) else None
    wrong = row.get("wrong") if isinstance(row, dict) else None
    return {"kind": kind if kind in KIND_PROPORTIONS else None,
            "wrong": wrong if isinstance(wrong, bool) else None}


def write_mathmix(out_dir: str | os.PathLike, **kwargs: object) -> dict[str, str]:
    """Writes train.jsonl and test.jsonl into out_dir; kwargs as for generate_mathmix."""
    train, test = generate_mathmix(**kwargs)  # type: ignore[arg-type]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in (("train", train), ("test", test)):
        path = out / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")  # never leave a half-written file under the real name
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)
        os.replace(tmp, path)
        paths[split] = str(path)
    logger.info("wrote mathmix to %s (%d train, %d test rows)", out, len(train), len(test))
    return paths


# The pretraining corpus: plain statements of number facts in forms that never occur in the
# demo's instructions ("After 58 comes 59.", "Of 41, 17 and 66, the least is 17."), as a
# pretrained LLM has read arithmetic in running text before it is fine-tuned on question/answer
# pairs. FACT_WEIGHTS: how often each form is drawn; the forms behind the small kinds state their
# facts over those kinds' number ranges (NUMBER_TOP), so the pre-trained target knows them.
FACT_WEIGHTS: dict[str, float] = {"after": 1, "counting": 0.5, "order": 1, "least": 1.5,
                                  "two_times": 1.5, "split": 2, "digits": 0.5, "backwards": 1,
                                  "plus": 0.5}


def _fact(form: str, rng: random.Random) -> str:
    top = NUMBER_TOP
    if form == "after":
        n = rng.randint(1, top["count_on"])
        n -= 1 if n % 10 == 9 else 0  # as the count_on problems: no carry
        return f"After {n} comes {n + 1}." if rng.random() < 0.5 else \
            f"{n + 1} follows {n}."
    if form == "counting":
        n = rng.randint(1, top["count_on"])
        return f"Counting: {n}, {n + 1}, {n + 2}, {n + 3}."
    if form == "order":
        x, y = rng.sample(range(1, top["compare"] + 1), 2)
        return f"{max(x, y)} is more than {min(x, y)}." if rng.random() < 0.5 else \
            f"{min(x, y)} is less than {max(x, y)}."
    if form == "least":
        a, b, c = rng.sample(range(10, top["min3"] + 1), 3)
        return f"Of {a}, {b} and {c}, the least is {min(a, b, c)}."
    if form == "two_times":
        n = _spelled(rng, rng.randint(1, 4), "1234", "01234")
        return f"Two times {n} is {2 * n}." if rng.random() < 0.5 else \
            f"{n} plus {n} is {2 * n}."
    if form == "split":
        n = _spelled(rng, rng.randint(1, 4), "1234", "01234")
        return f"{2 * n} split in two is {n}." if rng.random() < 0.5 else \
            f"{2 * n} is {n} and {n}."
    if form == "digits":
        n = rng.randint(10, 9999)
        d = ", ".join(str(n)[:-1]) + f" and {str(n)[-1]}"
        return f"The digits of {n} are {d}."
    if form == "backwards":
        n = rng.randint(100, 999)
        return f"Read backwards, {n} is {str(n)[::-1]}."
    if form == "plus":
        a, b = rng.randint(0, 99), rng.randint(0, 9)
        return f"{a} plus {b} is {a + b}."
    raise ValueError(f"unknown fact form {form!r}; one of {sorted(FACT_WEIGHTS)}")


def pretraining_corpus(seed: int = 0, n: int = 20000) -> list[str]:
    """n short statements of number facts, seeded: what the `tiny-pre:*` models read."""
    rng = random.Random(f"mathmix:{seed}:pretrain")
    forms, weights = list(FACT_WEIGHTS), list(FACT_WEIGHTS.values())
    return [_fact(rng.choices(forms, weights=weights)[0], rng) for _ in range(n)]


def tokenizer_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Prompt + output texts, round-robin over every kind, then pretraining statements: what the
    demo tokenizer is trained on."""
    rngs = {k: random.Random(f"mathmix:{seed}:tokenizer:{k}") for k in KINDS}
    texts = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        instr, ans = _GENERATORS[kind](rngs[kind], 1)
        texts.append(f"{instr}\n{render(ans)}")
    return texts + pretraining_corpus(seed, n)


_ANSWER_IS = re.compile(r"answer is\b", re.IGNORECASE)
_NUMBER = re.compile(r"[\s:]*(?:[a-z]\s*=\s*)?\$?\s*(?P<sign>-?)\s*\$?"
                     r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(?P<dec>\d+)|/(?P<den>\d+))?",
                     re.IGNORECASE)


def extract_final_answer(text: str) -> str | None:
    """The canonical final answer after the LAST "answer is" in text, or None.

    "The answer is 3.50." -> "3.5", "6/8" -> "3/4", "1,200" -> "1200". If the last "answer is"
    has no number after it (a truncated generation), that is None rather than an earlier answer.
    """
    matches = list(_ANSWER_IS.finditer(text or ""))
    if not matches:
        return None
    m = _NUMBER.match(text, matches[-1].end())
    if m is None:
        return None
    sign, whole = m["sign"], m["int"].replace(",", "")
    if m["den"] is not None:
        if int(m["den"]) == 0:
            return None
        return format_answer(Fraction(int(sign + whole), int(m["den"])), "fraction")
    if m["dec"] is not None:
        value = Decimal(f"{sign}{whole}.{m['dec']}")
        if value == value.to_integral_value():
            return str(int(value))
        return format(value, "f").rstrip("0")  # "3.50" -> "3.5"; keeps extra decimals verbatim
    return str(int(sign + whole))
