"""Load a state dict of the public reference ``SessaLayer`` (LibratioAI/sessa) into ours.

Rename (reference -> sessa_train ``SessaLayer``):

    ln.{weight,bias}             -> norm.{weight,bias}
    W_in.{weight,bias}           -> in_proj.{weight,bias}
    W_out.{weight,bias}          -> out_proj.{weight,bias}
    mixer.{q,k,v}_proj.*         -> mixer.{q,k,v}_proj.*        (unchanged)
    mixer.proj_fb.*              -> mixer.fb_proj.*
    mixer.out_proj.weight        -> mixer.o_proj.weight         (only when n_heads > 1)
    mixer.gamma_ctx.weight       -> mixer.gamma_proj.weight
    mixer.gamma_bias  shape ()   -> mixer.gamma_bias  shape (1,)
    mixer.rope_inv_freq, mixer.causal_mask_*   dropped (recomputed, not state)

For a whole model, prefix both sides with ``layers.{i}.``.
"""

from __future__ import annotations

import torch

_RENAMES = {
    "ln.": "norm.",
    "W_in.": "in_proj.",
    "W_out.": "out_proj.",
    "mixer.proj_fb.": "mixer.fb_proj.",
    "mixer.out_proj.": "mixer.o_proj.",
    "mixer.gamma_ctx.": "mixer.gamma_proj.",
    "mixer.q_proj.": "mixer.q_proj.",
    "mixer.k_proj.": "mixer.k_proj.",
    "mixer.v_proj.": "mixer.v_proj.",
}
_DROPPED = ("mixer.rope_inv_freq", "mixer.causal_mask_f_full", "mixer.causal_mask_fb_full")


def convert_reference_layer_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map reference ``SessaLayer`` keys onto ``sessa_train.models.SessaLayer`` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _DROPPED:
            continue
        if key == "mixer.gamma_bias":
            out[key] = value.reshape(1)
            continue
        prefix = next((p for p in _RENAMES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"unknown key in reference Sessa layer state dict: {key!r}")
        out[_RENAMES[prefix] + key[len(prefix) :]] = value
    return out
