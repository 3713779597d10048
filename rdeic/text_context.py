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


def _open_clip_blocks(state: dict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


@torch.no_grad()
def from_open_clip(state: dict, prefix: str = "cond_stage_model.model.", heads: int | None = None,
                   skip_last: int = 1) -> torch.Tensor:
    """(1, 77, width) empty-prompt features from OpenCLIP-layout text-tower weights."""
    try:
        tok = state[f"{prefix}token_embedding.weight"].float()
        pos = state[f"{prefix}positional_embedding"].float()
    except KeyError:
        raise ModelFormatError(f"no OpenCLIP text tower under {prefix!r} in this checkpoint") from None
    width = tok.shape[1]
    heads = heads or width // 64
    s = {k: v.float() for k, v in state.items() if k.startswith(prefix)}
    x = tok[empty_prompt_tokens(pos.shape[0])] + pos
    blocks = _open_clip_blocks(s, f"{prefix}transformer.resblocks.")
    for i in range(blocks - skip_last):
        p = f"{prefix}transformer.resblocks.{i}"
        h = _layer_norm(x, s, f"{p}.ln_1")
        q, k, v = F.linear(h, s[f"{p}.attn.in_proj_weight"], s[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
        x = x + F.linear(_attention(h, q, k, v, heads), s[f"{p}.attn.out_proj.weight"], s[f"{p}.attn.out_proj.bias"])
        h = _layer_norm(x, s, f"{p}.ln_2")
        h = F.gelu(F.linear(h, s[f"{p}.mlp.c_fc.weight"], s[f"{p}.mlp.c_fc.bias"]))
        x = x + F.linear(h, s[f"{p}.mlp.c_proj.weight"], s[f"{p}.mlp.c_proj.bias"])
    return _layer_norm(x, s, f"{prefix}ln_final")


@torch.no_grad()
def from_hf_clip(state: dict, prefix: str = "text_model.", heads: int | None = None) -> torch.Tensor:
    """(1, 77, width) empty-prompt features from a Hugging Face CLIPTextModel's weights (all its layers)."""
    try:
        tok = state[f"{prefix}embeddings.token_embedding.weight"].float()
        pos = state[f"{prefix}embeddings.position_embedding.weight"].float()
    except KeyError:
        raise ModelFormatError(f"no CLIPTextModel weights under {prefix!r}") from None
    s = {k: v.float() for k, v in state.items() if k.startswith(prefix)}
    width = tok.shape[1]
    heads = heads or width // 64
    x = tok[empty_prompt_tokens(pos.shape[0])] + pos
    layers = _open_clip_blocks(s, f"{prefix}encoder.layers.")
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}"
        h = _layer_norm(x, s, f"{p}.layer_norm1")
        q, k, v = (F.linear(h, s[f"{p}.self_attn.{n}_proj.weight"], s[f"{p}.self_attn.{n}_proj.bias"]) for n in "qkv")
        x = x + F.linear(_attention(h, q, k, v, heads), s[f"{p}.self_attn.out_proj.weight"], s[f"{p}.self_attn.out_proj.bias"])
        h = _layer_norm(x, s, f"{p}.layer_norm2")
        h = F.gelu(F.linear(h, s[f"{p}.mlp.fc1.weight"], s[f"{p}.mlp.fc1.bias"]))
        x = x + F.linear(h, s[f"{p}.mlp.fc2.weight"], s[f"{p}.mlp.fc2.bias"])
    return _layer_norm(x, s, f"{prefix}final_layer_norm")
