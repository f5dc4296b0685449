"""The one checked way to load a causal LM: training, trajectory scoring and evaluation use it.

safetensors only (pickled weights can run code when loaded), float32, eval mode; a folder that
does not load, or whose weights do not cover the model (from_pretrained would fill the gap with
random weights and carry on), is an S2LError naming the path and the caller's fix.
"""

from __future__ import annotations

from typing import Any

from s2l_ray.errors import S2LError


def load_causal_lm(path: str, *, trust_remote_code: bool = False, fix: str,
                   error: type[S2LError] = S2LError) -> Any:
    """A float32 causal LM in eval mode, or `error` naming `path` and `fix`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True,
            trust_remote_code=trust_remote_code, use_safetensors=True)
    except Exception as e:
        raise error(f"checkpoint {path} does not load ({type(e).__name__}: {str(e)[:300]})",
                    fix=fix) from e
    bad = sorted(map(str, (*info.get("missing_keys", ()), *info.get("mismatched_keys", ()))))
    if bad:  # from_pretrained would run with randomly initialised weights
        raise error(f"checkpoint {path} lacks or mismatches weights {bad[:5]}", fix=fix)
    return model.eval()
