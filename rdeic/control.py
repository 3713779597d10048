"""Control module and the "cross control" noise estimator over a diffusers UNet.

The base is a frozen ``UNet2DConditionModel``. The control module is a narrow copy
(``channel_ratio`` of the width) of its encoder and middle block whose input is
``concat(x_t, guide_hint)``. Zero-initialised 1x1 convs carry control features into the
base (control -> base only):

* after every encoder stage:   h_base += zc_enc[i](h_ctrl_i)
* after the middle block:      h_base += zc_mid(h_ctrl_mid)
* before every decoder stage:  h_base += zc_dec[j](h_ctrl_{n-1-j})

An encoder *stage* is one of: ``conv_in``; one resnet (+ its transformer); a downsampler.
A decoder stage is one resnet (+ transformer, + upsampler after the last resnet of a block).
This is the granularity of ldm's ``input_blocks`` / ``output_blocks``, which the authors'
checkpoints use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn
from torch import nn

from .config import ControlConfig


def largest_divisor_at_most(n: int, limit: int) -> int:
    """Largest d <= limit dividing n (the authors' ``find_denominator``)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


@dataclass(frozen=True)
class Stage:
    """One ldm-granularity block: a resnet (+ transformer, + resampler) or a lone conv/resampler."""

    resnet: nn.Module | None = None
    attention: nn.Module | None = None
    resampler: nn.Module | None = None
    conv: nn.Module | None = None

    def __call__(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            h = self.conv(h)
        if self.resnet is not None:
            h = self.resnet(h, emb)
        if self.attention is not None:
            h = self.attention(h, encoder_hidden_states=context, return_dict=False)[0]
        if self.resampler is not None:
            h = self.resampler(h)
        return h


def base_encoder_stages(unet: nn.Module) -> list[Stage]:
    stages = [Stage(conv=unet.conv_in)]
    for block in unet.down_blocks:
        attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
        stages += [Stage(resnet=r, attention=a) for r, a in zip(block.resnets, attns)]
        if block.downsamplers is not None:
            stages.append(Stage(resampler=block.downsamplers[0]))
    return stages


def base_decoder_stages(unet: nn.Module) -> list[Stage]:
    stages = []
    for block in unet.up_blocks:
        attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
        n = len(block.resnets)
        for j, (r, a) in enumerate(zip(block.resnets, attns)):
            up = block.upsamplers[0] if (j == n - 1 and block.upsamplers is not None) else None
            stages.append(Stage(resnet=r, attention=a, resampler=up))
    return stages


def _stage_levels(num_levels: int, layers: int) -> list[int]:
    """Resolution level of every encoder stage: conv_in, then resnets and downsamplers."""
    levels = [0]
    for level in range(num_levels):
        levels += [level] * layers
        if level != num_levels - 1:
            levels.append(level)
    return levels


def _unet_channels(unet_config: dict) -> tuple[list[int], int, list[int]]:
    """Output channels of the base encoder stages, the middle block and the decoder stages."""
    chans = list(unet_config["block_out_channels"])
    layers = int(unet_config["layers_per_block"])
    enc = [chans[level] for level in _stage_levels(len(chans), layers)]
    dec = [c for c in reversed(chans) for _ in range(layers + 1)]
    return enc, chans[-1], dec


class ControlModule(nn.Module):
    """Narrow UNet encoder + middle block on concat(x_t, hint), and the zero convs into the base."""

    def __init__(self, unet_config: dict, config: ControlConfig, hint_channels: int) -> None:
        super().__init__()
        self.config = config
        base_chans = list(unet_config["block_out_channels"])
        layers = int(unet_config["layers_per_block"])
        ctx_dim = int(unet_config["cross_attention_dim"])
        linear = bool(unet_config.get("use_linear_projection", False))
        eps = float(unet_config.get("norm_eps", 1e-5))
        temb_dim = base_chans[0] * 4
        chans = [int(c * config.channel_ratio) for c in base_chans]

        def groups(c: int) -> int:
            return largest_divisor_at_most(c, config.max_norm_groups)

        def transformer(c: int, heads: int) -> Transformer2DModel:
            return Transformer2DModel(
                num_attention_heads=heads,
                attention_head_dim=c // heads,
                in_channels=c,
                cross_attention_dim=ctx_dim,
                norm_num_groups=groups(c),
                use_linear_projection=linear,
                upcast_attention=bool(unet_config.get("upcast_attention", False)),
            )

        self.time_embedding = TimestepEmbedding(base_chans[0], temb_dim)
        self.conv_in = nn.Conv2d(int(unet_config["in_channels"]) + hint_channels, chans[0], 3, padding=1)
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleDict()  # keyed by resnet position: levels without attention have none
        self.downsamplers = nn.ModuleList()
        self._plan: list[tuple[str, int]] = [("conv_in", 0)]
        ch = chans[0]
        mid_head_dim = config.attention_head_dim
        for level, (block_type, out_ch) in enumerate(zip(unet_config["down_block_types"], chans)):
            for _ in range(layers):
                self.resnets.append(
                    ResnetBlock2D(
                        in_channels=ch, out_channels=out_ch, temb_channels=temb_dim,
                        groups=groups(ch), groups_out=groups(out_ch), eps=eps,
                    )
                )
                k = len(self.resnets) - 1
                if block_type.startswith("CrossAttn"):
                    mid_head_dim = largest_divisor_at_most(out_ch, config.attention_head_dim)
                    self.attentions[str(k)] = transformer(out_ch, out_ch // mid_head_dim)
                self._plan.append(("resnet", k))
                ch = out_ch
            if level != len(chans) - 1:
                self.downsamplers.append(Downsample2D(ch, use_conv=True, out_channels=ch, padding=1, name="op"))
                self._plan.append(("down", len(self.downsamplers) - 1))
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=ch, temb_channels=temb_dim, resnet_eps=eps, resnet_groups=groups(ch),
            # the authors' middle block divides by the head width of the last attention level
            num_attention_heads=max(1, ch // mid_head_dim), cross_attention_dim=ctx_dim,
            use_linear_projection=linear, upcast_attention=bool(unet_config.get("upcast_attention", False)),
        )
        ctrl_out = [chans[level] for level in _stage_levels(len(chans), layers)]
        base_enc, base_mid, base_dec = _unet_channels(unet_config)
        self.enc_zero_convs = nn.ModuleList(_zero_conv(c, b) for c, b in zip(ctrl_out, base_enc))
        self.mid_zero_conv = _zero_conv(ch, base_mid)
        dec_sources = list(reversed(ctrl_out))
        dec_targets = [base_mid] + base_dec[:-1]
        self.dec_zero_convs = nn.ModuleList(_zero_conv(c, b) for c, b in zip(dec_sources, dec_targets))
        # the authors' scale_list is ones × control_scale, and their forward multiplies by control_scale again
        self.register_buffer("scales", torch.full((len(self.enc_zero_convs) + 1 + len(self.dec_zero_convs),), config.scale))

    def stages(self) -> list[Stage]:
        out = []
        for kind, k in self._plan:
            if kind == "conv_in":
                out.append(Stage(conv=self.conv_in))
            elif kind == "resnet":
                out.append(Stage(resnet=self.resnets[k], attention=self.attentions[str(k)] if str(k) in self.attentions else None))
            else:
                out.append(Stage(resampler=self.downsamplers[k]))
        return out


def _zero_conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _time_embeddings(unet: nn.Module, t: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    t = t.reshape(-1).expand(batch) if t.numel() == 1 else t
    return unet.time_proj(t).to(dtype)


def plain_unet(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """ε_sd: the base UNet alone (same computation as ``unet(x, t, context).sample``)."""
    t_emb = _time_embeddings(unet, t, x.shape[0], x.dtype)
    emb = unet.time_embedding(t_emb)
    skips, h = [], x
    for stage in base_encoder_stages(unet):
        h = stage(h, emb, context)
        skips.append(h)
    h = unet.mid_block(h, emb, encoder_hidden_states=context)
    for stage in base_decoder_stages(unet):
        h = stage(torch.cat([h, skips.pop()], dim=1), emb, context)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def controlled_unet(
    unet: nn.Module, control: ControlModule, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor
) -> torch.Tensor:
    """ε_ctrl: the base UNet with control features added (cross control)."""
    t_emb = _time_embeddings(unet, t, x.shape[0], x.dtype)
    emb = unet.time_embedding(t_emb)
    emb_ctrl = control.time_embedding(t_emb)
    scales = iter((control.scales * control.config.scale).to(x.dtype).unbind())
    h, c = x, torch.cat([x, hint.to(x.dtype)], dim=1)
    skips, ctrl_feats = [], []
    for base_stage, ctrl_stage, zc in zip(base_encoder_stages(unet), control.stages(), control.enc_zero_convs):
        h = base_stage(h, emb, context)
        c = ctrl_stage(c, emb_ctrl, context)
        h = h + zc(c) * next(scales)
        skips.append(h)
        ctrl_feats.append(c)
    h = unet.mid_block(h, emb, encoder_hidden_states=context)
    c = control.mid_block(c, emb_ctrl, encoder_hidden_states=context)
    h = h + control.mid_zero_conv(c) * next(scales)
    for stage, zc in zip(base_decoder_stages(unet), control.dec_zero_convs):
        h = h + zc(ctrl_feats.pop()) * next(scales)
        h = stage(torch.cat([h, skips.pop()], dim=1), emb, context)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def predict_noise(
    unet: nn.Module,
    control: ControlModule,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    hint: torch.Tensor,
    detail: float = 1.0,
) -> torch.Tensor:
    """ε = ε_sd + λs·(ε_ctrl − ε_sd). λs = 1 and λs = 0 each cost one UNet pass, other values two."""
    if detail == 1.0:
        return controlled_unet(unet, control, x, t, context, hint)
    eps_sd = plain_unet(unet, x, t, context)
    if detail == 0.0:
        return eps_sd
    eps_ctrl = controlled_unet(unet, control, x, t, context, hint)
    return eps_sd + detail * (eps_ctrl - eps_sd)
