"""The one tokenization every stage shares: prompt + response + end-of-text, loss on the response.

Prompt and response are tokenized separately and concatenated, so the boundary between them is
exact whatever the tokenizer merges across it; the loss mask is then just `position >= n_prompt`.
Reference training, trajectories and target fine-tuning all call `tokenize_batch` (or read its
output from the ingest stage) — there is no second copy of this logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100  # label value torch's cross-entropy skips (prompt tokens, padding)


@dataclass
class Tokenized:
    input_ids: list[list[int]]
    n_prompt: list[int]
    truncated: list[bool]
    errors: list[str | None]  # None, or why the row is rejected ("overlong: ...")


@dataclass
class TokenArrays:
    """`tokenize_arrays`' result as flat arrays (Arrow's list layout, no per-row lists):
    row i's ids are values[offsets[i]:offsets[i + 1]] (empty for a rejected row)."""

    values: Any  # (total,) int32: the kept rows' ids back to back
    offsets: Any  # (n + 1,) int64
    n_prompt: Any  # (n,) int32: prompt tokens (also for rejected rows)
    truncated: Any  # (n,) bool
    errors: list[str | None]  # None, or why the row is rejected ("overlong: ...")


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added.

    A fast (Rust) tokenizer is called directly, one batch call without character offsets:
    what `tokenizer(texts, add_special_tokens=False)` does, minus the transformers wrapper's
    per-text conversion (~25% of the tokenizing time on ingest's rows). A backend set to
    truncate or pad (not ours) and slow tokenizers go through the ordinary call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_arrays(tokenizer: Any, prompts: list[str], responses: list[str], max_length: int,
                    overlong: str = "truncate") -> TokenArrays:
    """Token ids of `prompt + response + eos`, at most `max_length` long, as flat arrays.

    overlong='truncate' cuts the response (and then drops the eos: the answer did not end);
    overlong='reject' reports the row. A prompt that leaves no room for one response token is
    rejected either way, since it would contribute no loss at all.
    """
    import itertools

    import numpy as np

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one (S2L needs end-of-text)")
    n = len(prompts)
    ids = encode_texts(tokenizer, [*prompts, *responses])  # one call: one batch to split
    p_ids, r_ids = ids[:n], ids[n:]
    lp = np.fromiter(map(len, p_ids), np.int64, count=n)
    lr = np.fromiter(map(len, r_ids), np.int64, count=n)
    full = lp + lr + 1
    over = full > max_length
    bad = (lr == 0) | (lp >= max_length) | (over if overlong == "reject" else False)
    errors: list[str | None] = [None] * n
    for i in np.flatnonzero(bad):
        if not lr[i]:
            errors[i] = "empty_response: the response has no tokens"
        elif lp[i] >= max_length:
            errors[i] = f"overlong: prompt alone is {lp[i]} tokens, max_length is {max_length}"
        else:
            errors[i] = f"overlong: {full[i]} tokens > max_length {max_length}"
    cut = over & ~bad
    kept = np.where(bad, 0, np.minimum(full, max_length))
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(kept, out=offsets[1:])
    tail = (eos,)

    def pieces() -> Any:  # each kept row: prompt, (cut) response, eos unless cut
        for i in np.flatnonzero(~bad).tolist():
            yield p_ids[i]
            if cut[i]:
                yield r_ids[i][:max_length - lp[i]]
            else:
                yield r_ids[i]
                yield tail

    values = np.fromiter(itertools.chain.from_iterable(pieces()), np.int32,
                         count=int(offsets[-1]))
    return TokenArrays(values, offsets, lp.astype(np.int32), cut, errors)


def tokenize_batch(tokenizer: Any, prompts: list[str], responses: list[str], max_length: int,
                   overlong: str = "truncate") -> Tokenized:
    """`tokenize_arrays` as Python lists (one list of ids per row; [] for a rejected row)."""
    import itertools

    t = tokenize_arrays(tokenizer, prompts, responses, max_length, overlong)
    o = t.offsets.tolist()
    values = t.values.tolist()
    return Tokenized([values[a:b] for a, b in itertools.pairwise(o)], t.n_prompt.tolist(),
                     t.truncated.tolist(), t.errors)


def labels_for(input_ids: list[int], n_prompt: int) -> list[int]:
    """Causal-LM labels: the ids themselves on response tokens, IGNORE_INDEX on the prompt."""
    return [IGNORE_INDEX] * n_prompt + list(input_ids[n_prompt:])


def pad_batch(rows: list[list[int]], n_prompt: list[int], pad_id: int,
              pad_to_multiple: int = 8) -> tuple[Any, Any, Any]:
    """Right-pad a batch. Returns torch tensors input_ids, attention_mask, labels, each (B, L).

    L is rounded up to a multiple of 8 so tensor-core friendly shapes repeat across batches.
    """
    import torch

    longest = max(len(r) for r in rows)
    length = -(-longest // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (r, npr) in enumerate(zip(rows, n_prompt)):
        n = len(r)
        ids[i, :n] = torch.as_tensor(r, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, npr:n] = ids[i, npr:n]
    return ids, mask, labels
