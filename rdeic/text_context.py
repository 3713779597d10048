"""The empty-prompt text embedding of SD 2.x, computed once at conversion (no text encoder at run time).

Stable Diffusion 2 conditions on OpenCLIP ViT-H/14 text features taken from the penultimate
transformer layer, followed by the final layer norm (ldm's ``FrozenOpenCLIPEmbedder`` with
``layer="penultimate"``). For the empty prompt the token sequence is fixed: start-of-text,
end-of-text, then zero padding to 77 tokens, so no tokenizer is needed.

Two weight layouts are read: OpenCLIP's (the ``cond_stage_model.model.*`` tensors of the
single-file SD checkpoints) and Hugging Face's ``CLIPTextModel`` (the ``text_encoder/`` of a
diffusers folder, which SD 2 ships with the last layer already removed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ModelFormatError

SOT, EOT = 49406, 49407


def empty_prompt_tokens(length: int = 77) -> torch.Tensor:
    tokens = torch.zeros(1, length, dtype=torch.long)
    tokens[0, 0], tokens[0, 1] = SOT, EOT
    return tokens


def _layer_norm(x: torch.Tensor, state: dict, prefix: str, eps: float = 1e-5) -> torch.Tensor:
    w = state[f"{prefix}.weight"]
    return F.layer_norm(x, w.shape, w, state[f"{prefix}.bias"], eps)


def _attention(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    split = lambda t: t.view(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
    return out.transpose(1, 2).reshape(b, n, d)


# Key names of the two layouts, relative to the prefix; "qkv" is one fused projection in OpenCLIP.
_LAYOUTS = {
    "open_clip": {"tok": "token_embedding.weight", "pos": "positional_embedding", "block": "transformer.resblocks",
                  "ln1": "ln_1", "ln2": "ln_2", "qkv": "attn.in_proj", "out": "attn.out_proj",
                  "fc1": "mlp.c_fc", "fc2": "mlp.c_proj", "final": "ln_final"},
    "hf_clip": {"tok": "embeddings.token_embedding.weight", "pos": "embeddings.position_embedding.weight",
                "block": "encoder.layers", "ln1": "layer_norm1", "ln2": "layer_norm2", "qkv": None,
                "out": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2", "final": "final_layer_norm"},
}


def _linear(x: torch.Tensor, s: dict, name: str) -> torch.Tensor:
    return F.linear(x, s[f"{name}.weight"], s[f"{name}.bias"])


@torch.no_grad()
def _empty_prompt(state: dict, layout: str, prefix: str, heads: int | None, skip_last: int) -> torch.Tensor:
    """The causal CLIP text transformer on the empty prompt, all blocks but the last ``skip_last``."""
    n = _LAYOUTS[layout]
    try:
        tok = state[prefix + n["tok"]].float()
        pos = state[prefix + n["pos"]].float()
    except KeyError:
        raise ModelFormatError(f"no {layout} text encoder weights under {prefix!r}") from None
    s = {k: v.float() for k, v in state.items() if k.startswith(prefix)}
    heads = heads or tok.shape[1] // 64
    x = tok[empty_prompt_tokens(pos.shape[0])] + pos
    block_prefix = f"{prefix}{n['block']}."
    blocks = len({k[len(block_prefix):].split(".")[0] for k in s if k.startswith(block_prefix)})
    for i in range(blocks - skip_last):
        p = f"{block_prefix}{i}."
        h = _layer_norm(x, s, p + n["ln1"])
        if n["qkv"]:
            q, k, v = F.linear(h, s[f"{p}{n['qkv']}_weight"], s[f"{p}{n['qkv']}_bias"]).chunk(3, dim=-1)
        else:
            q, k, v = (_linear(h, s, f"{p}self_attn.{c}_proj") for c in "qkv")
        x = x + _linear(_attention(h, q, k, v, heads), s, p + n["out"])
        h = F.gelu(_linear(_layer_norm(x, s, p + n["ln2"]), s, p + n["fc1"]))
        x = x + _linear(h, s, p + n["fc2"])
    return _layer_norm(x, s, prefix + n["final"])


def from_open_clip(state: dict, prefix: str = "cond_stage_model.model.", heads: int | None = None,
                   skip_last: int = 1) -> torch.Tensor:
    """(1, 77, width) empty-prompt features from OpenCLIP-layout text-tower weights (penultimate layer)."""
    return _empty_prompt(state, "open_clip", prefix, heads, skip_last)


def from_hf_clip(state: dict, prefix: str = "text_model.", heads: int | None = None) -> torch.Tensor:
    """(1, 77, width) empty-prompt features from a Hugging Face CLIPTextModel's weights (all its layers)."""
    return _empty_prompt(state, "hf_clip", prefix, heads, skip_last=0)
