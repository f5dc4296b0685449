"""Row formats -> (prompt, response), stable example ids, and why a row is rejected. Pure Python.

Three input formats are understood:
  mathinstruct  {"instruction", "output", "source"?}     (TIGER-Lab/MathInstruct)
  alpaca        {"instruction", "input", "output"}       (tatsu-lab/alpaca)
  chat          {"messages": [{"role", "content"}, ...]} (the last message is the assistant reply)
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from typing import Any

# The prompts of the S2L/MathInstruct training code (Stanford Alpaca's), so a reference model
# trained here sees what the paper's did.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
CHAT_ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """A row that cannot become an example. `reason` is a short code counted in reports."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    format: str
    content: dict[str, Any]  # the normalised fields the content id hashes


def _text(row: dict[str, Any], name: str, *, required: bool = True) -> str:
    if name not in row or row[name] is None:
        if required:
            raise RowError("missing_field", f"field '{name}' is missing")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field '{name}' is {type(value).__name__}, expected text")
    _check_encodable(value, name)
    if required and not value.strip():
        raise RowError("empty_field", f"field '{name}' is empty")
    return value


def _check_encodable(value: str, name: str) -> None:
    # Lone surrogates (JSON "\ud800") decode fine in Python but cannot become UTF-8 text.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError("undecodable_text",
                       f"field '{name}' is not valid Unicode ({e.reason})") from None


def normalize_text(s: str) -> str:
    """Unicode NFC, whitespace runs collapsed: the form content ids are computed on."""
    return " ".join(unicodedata.normalize("NFC", s).split())


def detect_format(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca" if "input" in row else "mathinstruct"
    raise RowError("unknown_format",
                   f"no 'messages' or 'instruction'/'output' fields (has {sorted(row)[:8]})")


def to_example(row: dict[str, Any], fmt: str = "auto", template: str = "alpaca") -> Example:
    """Turn one raw row into an Example, or raise RowError saying why it cannot."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"row is {type(row).__name__}, expected an object")
    kind = detect_format(row) if fmt == "auto" else fmt
    if kind == "chat":
        return _chat_example(row, template)
    instruction = _text(row, "instruction")
    output = _text(row, "output")
    inp = _text(row, "input", required=False) if kind == "alpaca" else ""
    if template == "plain":
        prompt = f"{instruction}\n\n{inp}\n" if inp.strip() else f"{instruction}\n"
    elif inp.strip():
        prompt = ALPACA_PROMPT_INPUT.format(instruction=instruction, input=inp)
    else:
        prompt = ALPACA_PROMPT.format(instruction=instruction)
    content = {"instruction": normalize_text(instruction), "input": normalize_text(inp),
               "output": normalize_text(output)}
    return Example(prompt=prompt, response=output, format=kind, content=content)


def _chat_example(row: dict[str, Any], template: str) -> Example:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("bad_messages", "'messages' must be a non-empty list of {role, content}")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError("bad_messages", f"message {i} is {type(m).__name__}, not an object")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise RowError("bad_messages", f"message {i} has role {role!r}; use {CHAT_ROLES}")
        if not isinstance(content, str):
            raise RowError("wrong_type", f"message {i} content is {type(content).__name__}")
        _check_encodable(content, f"messages[{i}].content")
        turns.append((role, content))
    if turns[-1][0] != "assistant" or not turns[-1][1].strip():
        raise RowError("bad_messages", "the last message must be a non-empty assistant reply")
    if len(turns) < 2:
        raise RowError("bad_messages", "a chat needs at least one message before the reply")
    if template == "plain":
        prompt = "".join(f"{c}\n" for _, c in turns[:-1])
    else:
        prompt = "".join(f"### {r.capitalize()}:\n{c}\n\n" for r, c in turns[:-1])
        prompt += "### Assistant:\n"
    content = {"messages": [[r, normalize_text(c)] for r, c in turns]}
    return Example(prompt=prompt, response=turns[-1][1], format="chat", content=content)


def content_id(content: dict[str, Any]) -> str:
    """Stable id from normalised content: the same example gets the same id on any machine."""
    blob = json.dumps(content, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("ascii")).hexdigest()[:20]


def given_id(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError("bad_id", f"id column '{column}' is {value!r}; expected text or integer")
    text = str(value).strip()
    if not text:
        raise RowError("bad_id", f"id column '{column}' is empty")
    _check_encodable(text, column)
    return text


def row_source(row: dict[str, Any], column: str) -> str | None:
    """The row's origin label, as text. The column is optional and only labels reports, so a
    value of another type (a number, say) keeps the row: it becomes its JSON text."""
    value = row.get(column)
    if value is None:
        return None
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)[:200]
    _check_encodable(value, column)
    return value
