"""Built-in demo data set "mathmix": seeded, MathInstruct-like instruction data.

The sources differ in size (skewed about 11x), difficulty and output length, so that S2L's
trajectory clusters have something to find and random sampling visibly under-samples the rare
sources. A few percent of train rows carry a wrong final answer and a few are exact duplicates,
as real instruction data does. Pure Python and import-light: only stdlib.

Every random stream is a ``random.Random`` seeded with a string naming its purpose (string seeds
are hashed with SHA-512, so they are stable across processes and PYTHONHASHSEED). Separate streams
(one per source and split, one for noise, one for duplicates, one for shuffling) mean that changing
``wrong_answer_rate`` changes only the outputs of the affected rows, and that the first k problems
of a source do not depend on n_train.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from math import gcd
from pathlib import Path

logger = logging.getLogger(__name__)

# Fixed order; proportions sum to 1 and the largest is 0.34 / 0.03 = 11.3x the smallest.
SOURCE_PROPORTIONS: dict[str, float] = {
    "arith_easy": 0.34,
    "arith_chain": 0.22,
    "word_problems": 0.16,
    "linear_eq": 0.12,
    "percent": 0.08,
    "gcd_lcm": 0.05,
    "fractions": 0.03,
}
SOURCES: tuple[str, ...] = tuple(SOURCE_PROPORTIONS)

# (instruction, rationale steps whose last one holds "{ans}", correct answer, answer style)
Problem = tuple[str, list[str], Fraction, str]
_NAMES = ("Maria", "Tom", "Aisha", "Chen", "Lucas", "Priya", "Omar", "Sofia", "Kenji", "Emma")
_ITEMS = ("notebooks", "pens", "apples", "tickets", "candles", "mugs", "books", "stickers")


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


def _d(x: Fraction | int) -> str:  # numbers inside rationales
    return format_answer(x, "decimal")


def _arith_easy(rng: random.Random, s: int) -> Problem:
    op = rng.choice("++--*")
    if op == "*":
        a, b = rng.randint(2, 25 * s), rng.randint(2, 12 * s)
    else:
        a, b = rng.randint(10, 99 * s), rng.randint(10, 99 * s)
    ans = a + b if op == "+" else a - b if op == "-" else a * b
    return f"What is {a} {op} {b}?", [], Fraction(ans), "fraction"


def _arith_chain(rng: random.Random, s: int) -> Problem:
    cur = rng.randint(2, 30 * s)
    expr, top, steps = str(cur), "", []
    words = ("First", "Next", "Then")
    n_ops = rng.randint(3, 4)
    for i in range(n_ops):
        divisors = [k for k in range(2, 10) if cur % k == 0 and cur != 0]
        op = rng.choice("+-*/" if divisors else "+-*")
        b = rng.choice(divisors) if op == "/" else rng.randint(2, 9 if op == "*" else 40 * s)
        if op in "*/" and top in ("+", "-"):  # keep left-to-right order explicit
            expr = f"({expr})"
        new = cur + b if op == "+" else cur - b if op == "-" else cur * b if op == "*" else cur // b
        word = "Finally" if i == n_ops - 1 else words[i]
        rhs = "{ans}" if i == n_ops - 1 else str(new)
        steps.append(f"{word}, {cur} {op} {b} = {rhs}.")
        expr, top, cur = f"{expr} {op} {b}", op, new
    return f"Evaluate {expr}.", steps, Fraction(cur), "fraction"


def _word_problems(rng: random.Random, s: int) -> Problem:
    name, kind = rng.choice(_NAMES), rng.randrange(4)
    if kind == 0:  # shopping
        i1, i2 = rng.sample(_ITEMS, 2)
        n1, n2 = rng.randint(2, 9 * s), rng.randint(2, 9 * s)
        p1, p2 = Fraction(rng.randint(1, 12 * s)), Fraction(rng.randint(2, 40 * s), 4)
        ans = n1 * p1 + n2 * p2
        return (f"{name} buys {n1} {i1} at ${_d(p1)} each and {n2} {i2} at ${_d(p2)} each. "
                f"How many dollars does {name} spend in total?",
                [f"The {i1} cost {n1} * {_d(p1)} = {_d(n1 * p1)} dollars.",
                 f"The {i2} cost {n2} * {_d(p2)} = {_d(n2 * p2)} dollars.",
                 f"In total {name} spends {_d(n1 * p1)} + {_d(n2 * p2)} = {{ans}} dollars."],
                ans, "decimal")
    if kind == 1:  # speed
        v1, v2 = rng.randint(3, 20 * s) * 5, rng.randint(3, 20 * s) * 5
        t1, t2 = rng.randint(1, 6), rng.randint(1, 6)
        return (f"A train travels at {v1} km per hour for {t1} hours and then at {v2} km per "
                f"hour for {t2} hours. How many kilometers does it travel in total?",
                [f"In the first part it covers {v1} * {t1} = {v1 * t1} km.",
                 f"In the second part it covers {v2} * {t2} = {v2 * t2} km.",
                 f"The total distance is {v1 * t1} + {v2 * t2} = {{ans}} km."],
                Fraction(v1 * t1 + v2 * t2), "decimal")
    if kind == 2:  # ages
        sis, k, y = rng.randint(2, 15 * s), rng.randint(2, 5), rng.randint(1, 10)
        total = (k + 1) * sis + 2 * y
        return (f"{name} is {k} times as old as a younger sister. In {y} years the sum of their "
                f"ages will be {total}. How old is {name} now?",
                [f"Let the sister's age be s, so {name} is {k}s.",
                 f"In {y} years the sum is s + {y} + {k}s + {y} = {k + 1}s + {2 * y} = {total}.",
                 f"So {k + 1}s = {total - 2 * y} and s = {sis}.",
                 f"{name} is {k} * {sis} = {{ans}} years old."],
                Fraction(k * sis), "decimal")
    box = rng.randint(3, 12)  # baking and packing
    left = box * rng.randint(2, 15 * s)
    sold1, sold2 = rng.randint(5, 60 * s), rng.randint(5, 60 * s)
    made = left + sold1 + sold2
    return (f"A baker makes {made} cookies. She sells {sold1} in the morning and {sold2} in the "
            f"afternoon, then packs the rest into boxes of {box}. How many boxes does she fill?",
            [f"She sells {sold1} + {sold2} = {sold1 + sold2} cookies.",
             f"{made} - {sold1 + sold2} = {left} cookies are left.",
             f"They fill {left} / {box} = {{ans}} boxes."],
            Fraction(left // box), "decimal")


def _linear_eq(rng: random.Random, s: int) -> Problem:
    a, x = rng.randint(2, 12 * s), rng.randint(-20 * s, 20 * s)
    b = rng.randint(1, 50 * s) * rng.choice([-1, 1])
    c = a * x + b
    lhs, steps = f"{a}x {'+' if b > 0 else '-'} {abs(b)}", []
    if rng.random() < 0.4:  # x on both sides: one more step
        a2 = rng.randint(1, a - 1)
        big = f"{a + a2}x {'+' if b > 0 else '-'} {abs(b)}"
        rhs = f"{'' if a2 == 1 else a2}x {'+' if c >= 0 else '-'} {abs(c)}"
        instr = f"Solve for x: {big} = {rhs}."
        steps.append(f"Subtract {'' if a2 == 1 else a2}x from both sides: {lhs} = {c}.")
    else:
        instr = f"Solve for x: {lhs} = {c}."
    verb = f"Subtract {b} from" if b > 0 else f"Add {-b} to"
    steps += [f"{verb} both sides: {a}x = {c - b}.", f"Divide both sides by {a}: x = {{ans}}."]
    return instr, steps, Fraction(x), "decimal"


def _percent(rng: random.Random, s: int) -> Problem:
    p, base = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 75]), rng.randint(4, 400 * s)
    kind = rng.randrange(3)
    part = Fraction(p * base, 100)
    if kind == 0:
        return (f"What is {p}% of {base}?", [f"{p}% of {base} is {p}/100 * {base} = {{ans}}."],
                part, "decimal")
    if kind == 1:
        return (f"A jacket costs ${base} and is on sale for {p}% off. What is the sale price in "
                "dollars?", [f"The discount is {p}/100 * {base} = {_d(part)} dollars.",
                             f"The sale price is {base} - {_d(part)} = {{ans}} dollars."],
                base - part, "decimal")
    pop, grow = base * 100, part * 100  # whole people
    return (f"A town has {pop} people and grows by {p}%. How many people live there now?",
            [f"The town grows by {p}/100 * {pop} = {_d(grow)} people.",
             f"Now {pop} + {_d(grow)} = {{ans}} people live there."], pop + grow, "decimal")


def _factor(n: int) -> dict[int, int]:
    out, p = {}, 2
    while p * p <= n:
        while n % p == 0:
            out[p], n = out.get(p, 0) + 1, n // p
        p += 1
    if n > 1:
        out[n] = out.get(n, 0) + 1
    return out


def _show(f: dict[int, int]) -> str:
    return " * ".join(str(p) if e == 1 else f"{p}^{e}" for p, e in sorted(f.items()))


def _gcd_lcm(rng: random.Random, s: int) -> Problem:
    g = rng.randint(2, 12 * s)
    m, n = rng.sample(range(1, 16 * s), 2)
    a, b = g * m, g * n
    fa, fb = _factor(a), _factor(b)
    head = f"{a} = {_show(fa)} and {b} = {_show(fb)}."
    if rng.random() < 0.5:
        common = {p: min(e, fb[p]) for p, e in fa.items() if p in fb}
        return (f"What is the greatest common divisor of {a} and {b}?",
                [head, f"The common prime factors give {_show(common)} = {{ans}}."],
                Fraction(gcd(a, b)), "decimal")
    high = {p: max(fa.get(p, 0), fb.get(p, 0)) for p in set(fa) | set(fb)}
    return (f"What is the least common multiple of {a} and {b}?",
            [head, f"The highest powers of each prime give {_show(high)} = {{ans}}."],
            Fraction(a * b // gcd(a, b)), "decimal")


def _fractions(rng: random.Random, s: int) -> Problem:
    d1, d2 = rng.randint(2, 12 * s), rng.randint(2, 12 * s)
    x, y = Fraction(rng.randint(1, d1 - 1), d1), Fraction(rng.randint(1, d2 - 1), d2)
    xs, ys = f"{x.numerator}/{x.denominator}", f"{y.numerator}/{y.denominator}"
    op = rng.choice("+-*")
    instr = f"What is {xs} {op} {ys}? Give the answer as a reduced fraction."
    if op == "*":
        num, den = x.numerator * y.numerator, x.denominator * y.denominator
        steps = [f"Multiply numerators and denominators: ({x.numerator} * {y.numerator})/"
                 f"({x.denominator} * {y.denominator}) = {num}/{den}."]
        ans = x * y
    else:
        den = x.denominator * y.denominator // gcd(x.denominator, y.denominator)
        n1, n2 = x.numerator * den // x.denominator, y.numerator * den // y.denominator
        num = n1 + n2 if op == "+" else n1 - n2
        steps = [f"The least common denominator of {x.denominator} and {y.denominator} is {den}.",
                 f"{xs} = {n1}/{den} and {ys} = {n2}/{den}, so {n1}/{den} {op} {n2}/{den} = "
                 f"{num}/{den}."]
        ans = x + y if op == "+" else x - y
    return instr, [*steps, "In lowest terms the result is {ans}."], ans, "fraction"


_GENERATORS: dict[str, Callable[[random.Random, int], Problem]] = {
    "arith_easy": _arith_easy, "arith_chain": _arith_chain, "word_problems": _word_problems,
    "linear_eq": _linear_eq, "percent": _percent, "gcd_lcm": _gcd_lcm, "fractions": _fractions,
}


def _render(steps: list[str], answer: Fraction, style: str) -> str:
    ans = format_answer(answer, style)
    body = " ".join(steps).replace("{ans}", ans)  # the last step shows the (possibly wrong) answer
    return f"{body} The answer is {ans}." if body else f"The answer is {ans}."


def _wrong(answer: Fraction, style: str, rng: random.Random) -> Fraction:
    """A plausible wrong answer: off by a small amount, as careless arithmetic would be."""
    if style == "fraction" and answer.denominator != 1:
        return Fraction(answer.numerator + rng.choice([-1, 1]), answer.denominator)
    return answer + rng.choice([-3, -2, -1, 1, 2, 3])


def _unique_problems(source: str, rng: random.Random, count: int, taken: set[str]) -> list[Problem]:
    """Draws `count` problems whose instructions are not in `taken` (updated in place)."""
    out: list[Problem] = []
    scale, misses = 1, 0
    while len(out) < count:
        prob = _GENERATORS[source](rng, scale)
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
    """Largest-remainder split of n over the sources, at least 1 each while n allows it."""
    raw = {s: n * p for s, p in SOURCE_PROPORTIONS.items()}
    counts = {s: int(v) for s, v in raw.items()}
    for s in sorted(SOURCES, key=lambda s: (counts[s] - raw[s], SOURCES.index(s)))[
            : n - sum(counts.values())]:
        counts[s] += 1
    for s in reversed(SOURCES):  # take from the largest source to give the rare ones a row
        top = max(SOURCES, key=lambda t: (counts[t], -SOURCES.index(t)))
        if counts[s] == 0 and counts[top] > 1:
            counts[s], counts[top] = 1, counts[top] - 1
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


def generate_mathmix(n_train: int = 2000, n_test_per_source: int = 50, seed: int = 0,
                     wrong_answer_rate: float = 0.03, duplicate_rate: float = 0.02,
                     ) -> tuple[list[dict], list[dict]]:
    """Returns (train_rows, test_rows); see the module docstring."""
    _validate(n_train, n_test_per_source, wrong_answer_rate, duplicate_rate)
    # Duplicates never take the place of a source's only row.
    n_dup = min(round(n_train * duplicate_rate), n_train - min(n_train, len(SOURCES)))
    n_unique = n_train - n_dup
    taken: set[str] = set()
    problems: list[tuple[str, Problem]] = []
    for source, count in _allocate(n_unique).items():
        rng = random.Random(f"mathmix:{seed}:train:{source}")
        problems += [(source, p) for p in _unique_problems(source, rng, count, taken)]
    noise_rng = random.Random(f"mathmix:{seed}:wrong")
    wrong = set(noise_rng.sample(range(n_unique), round(n_unique * wrong_answer_rate)))
    train = []
    for i, (source, (instr, steps, ans, style)) in enumerate(problems):
        shown = _wrong(ans, style, noise_rng) if i in wrong else ans
        output = _render(steps, shown, style)
        train.append({"source": source, "instruction": instr, "output": output})
    dup_rng = random.Random(f"mathmix:{seed}:dup")
    base = train[:n_unique]
    train += [dict(dup_rng.choice(base)) for _ in range(n_dup)]
    random.Random(f"mathmix:{seed}:shuffle").shuffle(train)

    test = []
    for source in SOURCES:  # a separate stream, and train instructions are excluded
        rng = random.Random(f"mathmix:{seed}:test:{source}")
        for instr, steps, ans, style in _unique_problems(source, rng, n_test_per_source, taken):
            test.append({"source": source, "instruction": instr,
                         "output": _render(steps, ans, style), "answer": format_answer(ans, style)})
    random.Random(f"mathmix:{seed}:shuffle-test").shuffle(test)
    logger.debug("mathmix seed=%s: %d train (%d wrong, %d duplicate), %d test", seed, n_train,
                 len(wrong), n_dup, len(test))
    return train, test


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


def tokenizer_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Prompt + output texts, round-robin over every source, for training the demo tokenizer."""
    rngs = {s: random.Random(f"mathmix:{seed}:tokenizer:{s}") for s in SOURCES}
    texts = []
    for i in range(n):
        source = SOURCES[i % len(SOURCES)]
        instr, steps, ans, style = _GENERATORS[source](rngs[source], 1)
        texts.append(f"{instr}\n{_render(steps, ans, style)}")
    return texts


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
