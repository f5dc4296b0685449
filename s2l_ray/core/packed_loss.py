"""The packed scorer: sequences concatenated without padding, attention kept inside each one.

Ray-free. Same value as `core.losses` (HF's one-example `model(ids, labels=labels).loss`: the
mean cross-entropy over the response tokens), computed differently:

* Packing instead of padding. A batch's sequences (a group's rows, sorted by (n_tokens, id)) are
  laid end to end; position ids restart at 0 for every sequence, so rotary/learned positions are
  those of a one-example forward.
* Attention inside each sequence only, two ways (`attention=`):
  - "varlen": the whole batch is one row of at most `batch_tokens` tokens. A custom attention
    function, registered with transformers' `AttentionInterface`, receives the sequence
    boundaries (cu_seqlens) and calls `torch.nn.attention.varlen.varlen_attn` (flash-attention
    varlen) on CUDA; on CPU (and as a fallback) it runs causal SDPA per sequence. No padding,
    no (L, L) mask, no attention FLOPs across sequences.
  - "mask": rows of `row_tokens` tokens (next-fit over the sorted lengths) and HF's own packed
    detection: with `attention_mask=None`, transformers >= 4.53 turns position ids that restart
    into a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`). Works with
    any attention HF offers; pays for the full (row x row) attention and a materialised mask.
* Output head and cross-entropy on the response positions only, in chunks (`losses.token_ce`),
  float32 logits at most (chunk_rows, V) at a time; per-token losses stay on the device until
  the window ends (one synchronisation), then each example's mean is summed on the host in
  float64, in the example's own token order: the reduction never mixes in a neighbour.
* Optional `torch.compile` of the backbone (`compile_mode`): batches are then padded to a fixed
  shape (one trailing padding sequence, never attended by a real token), so one graph serves
  the whole run; "reduce-overhead" adds CUDA graphs. With `dynamic=True` the graph takes any
  length instead (no padding; no CUDA graphs).

Which rows share a batch depends on the group's rows only (as in `core.losses`), so the same
group gives bitwise the same losses whatever the Ray layout (blocks, actors).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from s2l_ray.core.losses import PAD_MULTIPLE, ScoreStats, padded, token_ce

VARLEN_NAME = "s2l_varlen"  # the name our attention function is registered under
ATTENTIONS = ("varlen", "mask")
_CU_KEY, _MAX_KEY = "s2l_cu_seqlens", "s2l_max_seqlen"  # kwargs that ride through HF's forward


# ---------------------------------------------------------------------------------------------
# host-side packing (numpy)


@dataclass
class Pack:
    """One packed batch: R rows of L tokens, sequences laid end to end in each row."""

    input_ids: np.ndarray  # (R, L) int64, 0 after the last sequence of a row
    position_ids: np.ndarray  # (R, L) int64, restarting at 0 per sequence (and in the tail)
    positions: np.ndarray  # (K,) int64 flat r * L + p: hidden state p predicts token p + 1
    targets: np.ndarray  # (K,) int64
    n_terms: np.ndarray  # (S,) int64, response tokens per sequence, in batch order
    cu_seqlens: np.ndarray  # (S' + 1,) int32 over the flat tokens, tails included (varlen, R=1)
    max_seqlen: int  # longest segment in cu_seqlens
    real_tokens: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape  # type: ignore[return-value]


def plan_packs(lengths: Sequence[int], batch_tokens: int, row_tokens: int | None
               ) -> list[list[list[int]]]:
    """Batches -> rows -> indices into `lengths` (sorted ascending), in order.

    row_tokens None: one row per batch holding up to `batch_tokens` tokens (varlen). Otherwise
    rows of max(row_tokens, longest) tokens filled next-fit, and batch_tokens // row rows per
    batch. A sequence longer than the budget gets a batch of its own. Deterministic in the
    lengths alone.
    """
    lengths = [int(x) for x in lengths]
    if not lengths:
        return []
    if row_tokens is None:
        cap, rows_per_batch = batch_tokens, 1
    else:
        cap = max(row_tokens, padded(max(lengths)))
        rows_per_batch = max(1, batch_tokens // cap)
    rows: list[list[int]] = []
    used = cap + 1
    for i, n in enumerate(lengths):
        if used + n > cap:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return [rows[s:s + rows_per_batch] for s in range(0, len(rows), rows_per_batch)]


def build_pack(values: np.ndarray, offsets: np.ndarray, n_prompt: np.ndarray,
               rows: list[list[int]], row_len: int | None = None, n_rows: int | None = None,
               multiple: int = PAD_MULTIPLE) -> Pack:
    """The rows of one batch (indices into the window) -> a Pack.

    values: the window's tokens concatenated; offsets (N + 1,) their boundaries. row_len/n_rows
    force a fixed shape (for compiled graphs); by default L is the longest row rounded up to
    `multiple`. A row's tail (padding) is one more segment with its own positions: causal, so
    no real token ever attends to it.
    """
    lens = [[int(offsets[i + 1] - offsets[i]) for i in row] for row in rows]
    longest = max(sum(r) for r in lens)
    length = padded(longest, multiple) if row_len is None else row_len
    n_r = len(rows) if n_rows is None else n_rows
    if length < longest or n_r < len(rows):
        raise ValueError(f"a pack of {len(rows)} rows x {longest} tokens does not fit the fixed "
                         f"shape {n_r} x {length}")
    ids = np.zeros((n_r, length), np.int64)
    pos_ids = np.zeros((n_r, length), np.int64)
    positions, n_terms, seg = [], [], [0]
    for r, (row, row_lens) in enumerate(zip(rows, lens)):
        at = 0
        for i, n in zip(row, row_lens):
            ids[r, at:at + n] = values[offsets[i]:offsets[i] + n]
            pos_ids[r, at:at + n] = np.arange(n)
            first = max(int(n_prompt[i]), 1) - 1
            positions.append(r * length + at + np.arange(first, n - 1))
            n_terms.append(max(0, n - 1 - first))
            seg.append(seg[-1] + n)
            at += n
        tail = length - at
        if tail:
            pos_ids[r, at:] = np.arange(tail)
            seg.append(seg[-1] + tail)
    for r in range(len(rows), n_r):  # empty rows of a fixed shape: one padding segment each
        pos_ids[r] = np.arange(length)
        seg.append(seg[-1] + length)
    flat_pos = np.concatenate(positions).astype(np.int64) if positions else np.zeros(0, np.int64)
    cu = np.asarray(seg, np.int32)
    return Pack(ids, pos_ids, flat_pos, ids.reshape(-1)[flat_pos + 1],
                np.asarray(n_terms, np.int64), cu, int(np.diff(cu).max()),
                int(sum(map(sum, lens))))


# ---------------------------------------------------------------------------------------------
# variable-length attention (registered with transformers)


def _torch_varlen() -> Any:
    """torch.nn.attention.varlen.varlen_attn, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_kernel_available(device: Any) -> bool:
    """True where the fused varlen kernel can run (CUDA and a torch that has varlen_attn; it
    also needs bf16/fp16 activations, else the per-sequence path runs)."""
    import torch

    return torch.device(device).type == "cuda" and _torch_varlen() is not None


def auto_attention(device: Any) -> str:
    """'varlen' where it is cheap (CPU: per-sequence SDPA; CUDA with varlen_attn), else 'mask'
    (a CUDA torch without varlen_attn would sync once per layer in the per-sequence loop)."""
    import torch

    dev = torch.device(device)
    return "varlen" if dev.type != "cuda" or varlen_kernel_available(dev) else "mask"


def _per_sequence_sdpa(q: Any, k: Any, v: Any, cu_seqlens: Any, scale: float) -> Any:
    """Reference/CPU path: causal SDPA on each [cu[i], cu[i+1]) slice. q,k,v (H, N, D)."""
    import torch
    import torch.nn.functional as F

    cu = cu_seqlens.tolist()  # free on CPU; one sync per layer on a GPU without varlen_attn
    outs = [F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True,
                                           scale=scale)
            for s, e in itertools.pairwise(cu)]
    return torch.cat(outs, dim=1)  # (H, N, D)


_VARLEN_EXTRA: dict[str, Any] = {}  # filled by register_varlen, outside any compiled graph


def _varlen_extra(fn: Any) -> dict[str, Any]:
    """varlen_attn's keywords across torch versions: causal by `is_causal` or by the window
    (-1, 0); split-KV off (num_splits=1) where offered, which its docs name as what makes it
    batch-invariant."""
    params = inspect.signature(fn).parameters
    extra: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {
        "window_size": (-1, 0)}
    if "num_splits" in params:
        extra["num_splits"] = 1
    return extra


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs: Any
                     ) -> tuple[Any, None]:
    """transformers attention interface: q/k/v (1, H, N, D) -> ((1, N, H, D), None).

    Needs kwargs s2l_cu_seqlens (int32 (S + 1,) on the device) and s2l_max_seqlen (int); without
    them (an ordinary call) it is plain causal attention over the row.
    """
    import torch

    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one packed row, got a batch of {query.shape[0]}")
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat the kv heads
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cu = kwargs.get(_CU_KEY)
    n = query.shape[2]
    if cu is None:
        cu_host = [0, n]
        cu = torch.tensor(cu_host, dtype=torch.int32, device=query.device)
        max_len = n
    else:
        max_len = int(kwargs[_MAX_KEY])
    fn = _torch_varlen() if query.device.type == "cuda" else None
    half = query.dtype
    if fn is not None and half == torch.float32 and torch.is_autocast_enabled("cuda"):
        # Under autocast, rotary embeddings (fp32 cos/sin) leave q and k in fp32 although
        # the projections ran in bf16; SDPA would cast them to the autocast dtype, so do the
        # same and take the fused kernel, not the per-sequence loop (one sync per layer).
        half = torch.get_autocast_dtype("cuda")
    if fn is not None and half in (torch.bfloat16, torch.float16):  # flash: half only
        q, k, v = (x[0].transpose(0, 1).to(half) for x in (query, key, value))  # (N, H, D)
        extra = _VARLEN_EXTRA or _varlen_extra(fn)
        out = fn(q, k, v, cu, cu, max_len, max_len, scale=scale, **extra)  # (N, H, D)
        return out.unsqueeze(0), None
    # Python control flow over the boundaries: kept out of compiled graphs
    out = torch.compiler.disable(_per_sequence_sdpa)(query[0], key[0], value[0], cu, scale)
    return out.transpose(0, 1).unsqueeze(0), None  # (1, N, H, D)


def register_varlen() -> str:
    """Register `varlen_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_NAME, varlen_attention)
    fn = _torch_varlen()
    if fn is not None and not _VARLEN_EXTRA:
        _VARLEN_EXTRA.update(_varlen_extra(fn))
    return VARLEN_NAME


# ---------------------------------------------------------------------------------------------
# the scorer


@contextlib.contextmanager
def attention_implementation(model: Any, name: str) -> Any:
    """Temporarily switch a HF model (all its sub-configs) to attention `name`."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")
               and hasattr(m.config, "_attn_implementation")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield model
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


class PackedScorer:
    """Scores sorted windows with packed batches under every model; see the module docstring.

    models: HF causal LMs (logits = head(last hidden state)), on `device`. attention "varlen"
    or "mask"; row_tokens: the row length for "mask" (at least the longest sequence).
    compile_mode: None, or a torch.compile mode ("default", "reduce-overhead", "max-autotune");
    compiled batches have a fixed shape, or any shape with dynamic=True. ce: how the head's
    cross-entropy runs (`token_ce`).
    """

    def __init__(self, models: Sequence[Any], device: Any, batch_tokens: int,
                 attention: str = "varlen", row_tokens: int = 512, amp_dtype: Any = None,
                 compile_mode: str | None = None, chunk_rows: int | None = None,
                 ce: str = "auto", dynamic: bool = False) -> None:
        import torch

        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.models, self.device = list(models), torch.device(device)
        self.batch_tokens, self.attention, self.row_tokens = batch_tokens, attention, row_tokens
        self.amp_dtype, self.chunk_rows, self.compile_mode = amp_dtype, chunk_rows, compile_mode
        self.ce, self.dynamic = ce, dynamic and compile_mode is not None
        self.on_gpu = self.device.type == "cuda"
        self.fused_varlen = attention == "varlen" and varlen_kernel_available(self.device)
        if attention == "varlen":
            register_varlen()
        self._backbones = [m.base_model for m in self.models]
        self._heads = [m.get_output_embeddings() for m in self.models]
        if compile_mode is not None:
            # Shapes are fixed (see score_sorted) except cu_seqlens' length: dynamic=None lets
            # dynamo mark that one dimension dynamic after its first change.
            self._forward = [torch.compile(b, mode=compile_mode, dynamic=True if dynamic else None)
                             for b in self._backbones]
        else:
            self._forward = self._backbones

    def _attn_name(self, model: Any) -> str:
        return VARLEN_NAME if self.attention == "varlen" else model.config._attn_implementation

    def score_sorted(self, values: np.ndarray, lengths: np.ndarray, n_prompt: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, ScoreStats]:
        """Same contract as `core.losses.score_sorted`: (losses (N, T) float32, n_terms (N,),
        stats); rows sorted by length ascending, tokens concatenated in `values`."""
        import torch

        lengths = np.asarray(lengths, np.int64)
        n_prompt = np.asarray(n_prompt, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        n_models = len(self.models)
        stats = ScoreStats(seconds_per_checkpoint=[0.0] * n_models)
        varlen = self.attention == "varlen"
        plan = plan_packs(lengths, self.batch_tokens, None if varlen else self.row_tokens)
        fixed_rows = fixed_len = None
        if self.compile_mode is not None and not self.dynamic:  # one shape, one graph
            if varlen:
                fixed_rows, fixed_len = 1, padded(max(self.batch_tokens, int(lengths.max())))
            else:
                fixed_len = max(self.row_tokens, padded(int(lengths.max())))
                fixed_rows = max(1, self.batch_tokens // fixed_len)
        per_token: list[list[Any]] = [[] for _ in range(n_models)]  # device (K,) per batch
        n_terms_all, keep, events = [], [], []
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype)
               if self.amp_dtype is not None else contextlib.nullcontext())
        with torch.inference_mode(), amp, contextlib.ExitStack() as stack:
            for m in self.models:
                stack.enter_context(attention_implementation(m, self._attn_name(m)))
            for rows in plan:
                pk = build_pack(values, offsets, n_prompt, rows, fixed_len, fixed_rows)
                k = len(pk.positions)
                host = torch.from_numpy(np.concatenate(
                    [pk.input_ids.ravel(), pk.position_ids.ravel(), pk.positions, pk.targets,
                     pk.cu_seqlens.astype(np.int64)]))
                if self.on_gpu:
                    host = host.pin_memory()
                    keep.append(host)
                dev = host.to(self.device, non_blocking=True)
                n_ids = pk.input_ids.size
                ids = dev[:n_ids].view(pk.shape)
                pos_ids = dev[n_ids:2 * n_ids].view(pk.shape)
                pos = dev[2 * n_ids:2 * n_ids + k]
                tgt = dev[2 * n_ids + k:2 * n_ids + 2 * k]
                kwargs: dict[str, Any] = {}
                if varlen:
                    kwargs = {_CU_KEY: dev[2 * n_ids + 2 * k:].to(torch.int32),
                              _MAX_KEY: pk.max_seqlen if fixed_len is None else fixed_len}
                for t in range(n_models):
                    if self.on_gpu:
                        start = torch.cuda.Event(enable_timing=True)
                        end = torch.cuda.Event(enable_timing=True)
                        start.record()
                    else:
                        t0 = time.perf_counter()
                    hidden = self._forward[t](input_ids=ids, position_ids=pos_ids,
                                              use_cache=False, **kwargs).last_hidden_state
                    picked = hidden.reshape(n_ids, -1).index_select(0, pos)  # (K, H)
                    per_token[t].append(token_ce(self._heads[t], picked, tgt, self.chunk_rows,
                                                    self.ce))
                    if self.on_gpu:
                        end.record()
                        events.append((t, start, end))
                    else:
                        stats.seconds_per_checkpoint[t] += time.perf_counter() - t0
                n_terms_all.append(pk.n_terms)
                stats.batches += 1
                stats.padded_tokens += n_ids
                stats.response_tokens += k
        n_terms = np.concatenate(n_terms_all) if n_terms_all else np.zeros(0, np.int64)
        losses = np.zeros((len(lengths), n_models), np.float32)
        if len(lengths):
            for t in range(n_models):  # the one synchronisation
                ce = torch.cat(per_token[t]).float().cpu().numpy().astype(np.float64)
                losses[:, t] = segment_means(ce, n_terms)
        for t, start, end in events:
            stats.seconds_per_checkpoint[t] += start.elapsed_time(end) / 1000.0
        stats.examples, stats.tokens = len(lengths), int(offsets[-1])
        return losses, n_terms, stats


def segment_means(per_token: np.ndarray, n_terms: np.ndarray) -> np.ndarray:
    """Mean of each consecutive run of n_terms[i] values (float64 sums, left to right, each run
    on its own); NaN for an empty run, as HF's 0/0."""
    out = np.full(len(n_terms), np.nan)
    starts = np.concatenate([[0], np.cumsum(n_terms)[:-1]]).astype(np.int64)
    nz = n_terms > 0
    if nz.any():
        out[nz] = np.add.reduceat(per_token, starts[nz]) / n_terms[nz]
    return out.astype(np.float32)
