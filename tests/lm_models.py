"""Two tiny causal LMs of different families (GPT-NeoX, Llama), random weights, seeded: the
models the loss tests compare against Hugging Face's own loss."""

from __future__ import annotations

import torch


def neox(vocab: int) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, rotary_pct=0.25,
                        max_position_embeddings=256, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(cfg).eval()


def llama(vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def scorer_block(ids, n_prompt, names, groups):
    """A block as the trajectory scorer receives it: token rows, their prompt lengths and groups."""
    import pyarrow as pa

    return pa.table({
        "id": names, "source": pa.nulls(len(ids), pa.string()),
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "n_prompt_tokens": pa.array(n_prompt, pa.int32()),
        "n_tokens": pa.array([len(r) for r in ids], pa.int32()),
        "group": pa.array(groups, pa.int64())})
