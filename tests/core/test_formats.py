"""Row formats, stable ids, every kind of bad row, and the shared tokenization (pure, no Ray)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from s2l_ray.core import formats as formats
from s2l_ray.core.formats import RowError, content_id, to_example
from s2l_ray.core.tokens import IGNORE_INDEX, labels_for, pad_batch, tokenize_batch
from s2l_ray.io.readers import parse_file


def test_mathinstruct_alpaca_chat() -> None:
    m = to_example({"instruction": "What is 2+2?", "output": "The answer is 4.", "source": "x"})
    assert m.format == "mathinstruct" and m.response == "The answer is 4."
    assert m.prompt.endswith("### Instruction:\nWhat is 2+2?\n\n### Response:\n")
    a = to_example({"instruction": "Add.", "input": "2 and 2", "output": "4"})
    assert a.format == "alpaca" and "### Input:\n2 and 2" in a.prompt
    a0 = to_example({"instruction": "Add.", "input": "", "output": "4"})
    assert "### Input" not in a0.prompt
    c = to_example({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}]})
    assert c.format == "chat" and c.response == "4"
    assert c.prompt == "### System:\nBe brief.\n\n### User:\n2+2?\n\n### Assistant:\n"
    plain = to_example({"instruction": "2+2?", "output": "4"}, template="plain")
    assert plain.prompt == "2+2?\n"


@pytest.mark.parametrize(("row", "reason"), [
    ({"instruction": "q"}, "missing_field"),
    ({"instruction": "q", "output": None}, "missing_field"),
    ({"instruction": "  ", "output": "a"}, "empty_field"),
    ({"instruction": "q", "output": 42}, "wrong_type"),
    ({"instruction": ["q"], "output": "a"}, "wrong_type"),
    ({"instruction": "q\ud800", "output": "a"}, "undecodable_text"),
    ({"question": "q", "answer": "a"}, "unknown_format"),
    ({"messages": []}, "bad_messages"),
    ({"messages": "hi"}, "bad_messages"),
    ({"messages": [{"role": "user", "content": "q"}]}, "bad_messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
     "bad_messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
     "wrong_type"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "bad_messages"),
])
def test_bad_rows_have_reasons(row: dict, reason: str) -> None:
    with pytest.raises(RowError) as e:
        to_example(row)
    assert e.value.reason == reason and e.value.detail


def test_forced_format_mismatch_is_rejected() -> None:
    with pytest.raises(RowError, match="missing_field"):
        to_example({"messages": [{"role": "user", "content": "q"}]}, fmt="alpaca")


def test_content_id_is_stable_and_normalised() -> None:
    a = to_example({"instruction": "What is  2+2?", "output": "4\n"})
    b = to_example({"instruction": "What is 2+2? ", "output": "4", "source": "other"})
    c = to_example({"instruction": "What is 2+3?", "output": "5"})
    assert content_id(a.content) == content_id(b.content) != content_id(c.content)
    # a fixed value: ids must not change between versions/machines, or resumed runs break
    assert content_id({"instruction": "x", "input": "", "output": "y"}) == content_id(
        {"output": "y", "input": "", "instruction": "x"})
    assert len(content_id(a.content)) == 20


def test_given_id_and_source() -> None:
    assert formats.given_id({"id": 7}, "id") == "7"
    for bad in ({}, {"id": ""}, {"id": True}, {"id": 1.5}, {"id": [1]}):
        with pytest.raises(RowError, match="bad_id"):
            formats.given_id(bad, "id")
    assert formats.row_source({}, "source") is None
    # A source of another type keeps the row (the column only labels reports): as text.
    assert formats.row_source({"source": 3}, "source") == "3"
    assert formats.row_source({"source": 2.5}, "source") == "2.5"
    assert formats.row_source({"source": ["a", 1]}, "source") == '["a", 1]'


def _rows(tables) -> list[dict]:
    return [r for t in tables for r in t.to_pylist()]


def test_parse_jsonl_rejects_each_bad_line() -> None:
    data = b"\n".join([
        json.dumps({"instruction": "q", "output": "a"}).encode(),
        b"{not json",
        b"\xff\xfe garbage",
        b"[1, 2]",
        b"",
        json.dumps({"instruction": "q2", "output": "a2"}).encode(),
    ])
    rows = _rows(parse_file("/d/x.jsonl", data))
    assert [r["reject_reason"] for r in rows] == [None, "bad_json", "undecodable_text",
                                                   "not_an_object", None]
    assert [r["origin_row"] for r in rows] == [0, 1, 2, 3, 5]
    assert json.loads(rows[0]["raw"]) == {"instruction": "q", "output": "a"}


def test_parse_json_array_parquet_csv() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arr = json.dumps([{"instruction": "q", "output": "a"}, 5]).encode()
    rows = _rows(parse_file("/d/x.json", arr))
    assert [r["reject_reason"] for r in rows] == [None, "not_an_object"]
    assert _rows(parse_file("/d/x.json", b"[{broken"))[0]["reject_reason"] == "bad_json"

    buf = io.BytesIO()
    pq.write_table(pa.table({"instruction": ["q", None], "output": ["a", "b"],
                             "blob": [b"\x00", b"\x01"]}), buf)
    rows = _rows(parse_file("/d/x.parquet", buf.getvalue()))
    assert len(rows) == 2 and json.loads(rows[1]["raw"])["instruction"] is None
    assert json.loads(rows[0]["raw"])["blob"] == {"__bytes__": 1}  # bytes never pass as text
    assert _rows(parse_file("/d/x.parquet", b"PAR1garbage"))[0]["reject_reason"] == (
        "unreadable_file")

    rows = _rows(parse_file("/d/x.csv", b"instruction,output\nq,a\nq2,\n"))
    assert len(rows) == 2 and json.loads(rows[1]["raw"])["output"] == ""  # -> empty_field


def test_tokenize_masks_the_prompt_and_truncates(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    t = tokenize_batch(tok, ["What is 12+30?\n"], ["The answer is 42."], max_length=512)
    ids, npr = t.input_ids[0], t.n_prompt[0]
    assert ids[-1] == tok.eos_token_id and not t.truncated[0] and t.errors[0] is None
    assert tok.decode(ids[:npr]) == "What is 12+30?\n"
    assert tok.decode(ids[npr:-1]) == "The answer is 42."
    labels = labels_for(ids, npr)
    assert labels[:npr] == [IGNORE_INDEX] * npr and labels[npr:] == ids[npr:]

    cut = tokenize_batch(tok, ["What is 12+30?\n"], ["The answer is 42." * 20], max_length=24)
    assert len(cut.input_ids[0]) == 24 and cut.truncated[0] and cut.input_ids[0][-1] != (
        tok.eos_token_id)
    rej = tokenize_batch(tok, ["What is 12+30?\n"], ["x" * 200], max_length=24, overlong="reject")
    assert rej.errors[0].startswith("overlong") and rej.input_ids[0] == []
    long_prompt = tokenize_batch(tok, ["q " * 50], ["a"], max_length=24)
    assert long_prompt.errors[0].startswith("overlong: prompt alone")


def test_pad_batch_shapes(tiny_tokenizer) -> None:
    ids, mask, labels = pad_batch([[5, 6, 7], [8, 9]], [1, 1], pad_id=0)
    assert ids.shape == mask.shape == labels.shape == (2, 8)
    assert mask.sum().item() == 5
    assert labels[0, :3].tolist() == [IGNORE_INDEX, 6, 7] and (labels[1, 2:] == IGNORE_INDEX).all()


def test_fast_path_ids_match_the_tokenizer_call(tiny_tokenizer) -> None:
    """encode_texts calls the Rust tokenizer directly: the ids must be those of the ordinary
    transformers call, special-token text, non-ASCII, blank and empty texts included."""
    from s2l_ray.core.tokens import encode_texts, tokenize_arrays

    tok = tiny_tokenizer
    texts = ["What is 12+30?\n", "", "   ", "a <|endoftext|> b", "café 中文 😀\n\n### x",
             "The answer is 42. " * 40]
    assert encode_texts(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]
    t = tokenize_arrays(tok, texts, texts[::-1], max_length=64)
    lists = tokenize_batch(tok, texts, texts[::-1], max_length=64)
    assert t.values.dtype == np.int32 and len(t.offsets) == len(texts) + 1
    for i, ids in enumerate(lists.input_ids):
        assert t.values[t.offsets[i]:t.offsets[i + 1]].tolist() == ids
        p = tok(texts[i], add_special_tokens=False)["input_ids"]
        r = tok(texts[::-1][i], add_special_tokens=False)["input_ids"]
        if lists.errors[i] is None:  # prompt + response + eos, cut at max_length
            assert ids == (p + r + [tok.eos_token_id])[:64]
            assert lists.truncated[i] == (len(p) + len(r) + 1 > 64)
        else:
            assert ids == [] and (not r or len(p) >= 64)
