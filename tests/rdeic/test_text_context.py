"""The empty-prompt embedding from OpenCLIP-layout and Hugging Face-layout text towers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rdeic.text_context import EOT, SOT, empty_prompt_tokens, from_hf_clip, from_open_clip

WIDTH, HEADS, LAYERS, VOCAB, LENGTH = 32, 2, 3, 49408, 77


def _open_clip_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    p = "cond_stage_model.model."
    state = {f"{p}token_embedding.weight": r(VOCAB, WIDTH), f"{p}positional_embedding": r(LENGTH, WIDTH),
             f"{p}ln_final.weight": 1 + r(WIDTH), f"{p}ln_final.bias": r(WIDTH)}
    for i in range(LAYERS):
        b = f"{p}transformer.resblocks.{i}."
        state.update({b + "ln_1.weight": 1 + r(WIDTH), b + "ln_1.bias": r(WIDTH), b + "ln_2.weight": 1 + r(WIDTH),
                      b + "ln_2.bias": r(WIDTH), b + "attn.in_proj_weight": r(3 * WIDTH, WIDTH), b + "attn.in_proj_bias": r(3 * WIDTH),
                      b + "attn.out_proj.weight": r(WIDTH, WIDTH), b + "attn.out_proj.bias": r(WIDTH),
                      b + "mlp.c_fc.weight": r(4 * WIDTH, WIDTH), b + "mlp.c_fc.bias": r(4 * WIDTH),
                      b + "mlp.c_proj.weight": r(WIDTH, 4 * WIDTH), b + "mlp.c_proj.bias": r(WIDTH)})
    return state


def _reference(state: dict, layers: int) -> torch.Tensor:
    """An independent forward with torch.nn.MultiheadAttention and a causal mask (OpenCLIP's structure)."""
    p = "cond_stage_model.model."
    x = state[f"{p}token_embedding.weight"][empty_prompt_tokens()] + state[f"{p}positional_embedding"]
    mask = torch.full((LENGTH, LENGTH), float("-inf")).triu(1)
    for i in range(layers):
        b = f"{p}transformer.resblocks.{i}."
        mha = torch.nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        mha.load_state_dict({"in_proj_weight": state[b + "attn.in_proj_weight"], "in_proj_bias": state[b + "attn.in_proj_bias"],
                             "out_proj.weight": state[b + "attn.out_proj.weight"], "out_proj.bias": state[b + "attn.out_proj.bias"]})
        h = F.layer_norm(x, (WIDTH,), state[b + "ln_1.weight"], state[b + "ln_1.bias"])
        x = x + mha(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = F.layer_norm(x, (WIDTH,), state[b + "ln_2.weight"], state[b + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, state[b + "mlp.c_fc.weight"], state[b + "mlp.c_fc.bias"])),
                         state[b + "mlp.c_proj.weight"], state[b + "mlp.c_proj.bias"])
    return F.layer_norm(x, (WIDTH,), state[f"{p}ln_final.weight"], state[f"{p}ln_final.bias"])


def _to_hf(state: dict, layers: int) -> dict:
    p, out = "cond_stage_model.model.", {}
    out["text_model.embeddings.token_embedding.weight"] = state[f"{p}token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = state[f"{p}positional_embedding"]
    out["text_model.final_layer_norm.weight"] = state[f"{p}ln_final.weight"]
    out["text_model.final_layer_norm.bias"] = state[f"{p}ln_final.bias"]
    for i in range(layers):
        b, h = f"{p}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for n, w, bias in zip("qkv", state[b + "attn.in_proj_weight"].chunk(3), state[b + "attn.in_proj_bias"].chunk(3)):
            out[h + f"self_attn.{n}_proj.weight"], out[h + f"self_attn.{n}_proj.bias"] = w, bias
        out[h + "self_attn.out_proj.weight"] = state[b + "attn.out_proj.weight"]
        out[h + "self_attn.out_proj.bias"] = state[b + "attn.out_proj.bias"]
        for a, c in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
            out[h + f"{a}.weight"], out[h + f"{a}.bias"] = state[b + f"{c}.weight"], state[b + f"{c}.bias"]
        out[h + "mlp.fc1.weight"], out[h + "mlp.fc1.bias"] = state[b + "mlp.c_fc.weight"], state[b + "mlp.c_fc.bias"]
        out[h + "mlp.fc2.weight"], out[h + "mlp.fc2.bias"] = state[b + "mlp.c_proj.weight"], state[b + "mlp.c_proj.bias"]
    return out


def test_empty_prompt_tokens():
    t = empty_prompt_tokens()
    assert t.shape == (1, 77) and t[0, :2].tolist() == [SOT, EOT] and int(t[0, 2:].abs().sum()) == 0


def test_penultimate_layer_of_open_clip_layout():
    state = _open_clip_state()
    got = from_open_clip(state, heads=HEADS)
    assert got.shape == (1, LENGTH, WIDTH)
    assert torch.allclose(got, _reference(state, LAYERS - 1), atol=1e-5)  # the last block is skipped


def test_hugging_face_layout_without_its_last_layer_gives_the_same():
    state = _open_clip_state(1)
    hf = _to_hf(state, LAYERS - 1)  # SD 2's diffusers text encoder ships with the last layer removed
    assert torch.allclose(from_hf_clip(hf, heads=HEADS), from_open_clip(state, heads=HEADS), atol=1e-5)
