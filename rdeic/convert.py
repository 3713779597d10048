"""Conversion of Stable Diffusion 2.1-base and the authors' RDEIC checkpoints into our model format.

Everything runs offline: the 2.1-base configs ship in ``rdeic/presets/sd21.json``, files are
read with safetensors or ``torch.load(weights_only=True)``, and the authors' architecture is
read from their model YAML (``configs/model/rdeic.yaml`` format), so any size of it converts.
Every tensor of the RDEIC checkpoint is accounted for: a key that maps nowhere (unless a pattern
of ``ignore_keys`` matches it), or a weight of ours that nothing fills, is an error naming the keys.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable, Sequence

import torch
import yaml

from .compression import ENTROPY_TABLE_KEYS, entropy_buffers
from .config import CompressionConfig, ControlConfig, DiffusionConfig, ModelConfig, load_preset
from .errors import ConfigError, ModelFormatError
from .model import RDEIC
from .modeldir import ModelId
from .weights import load_state_strict, save_model

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ reading files


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or torch's zip or legacy format through weights_only unpickling
    (a state dict, a Lightning checkpoint's ``state_dict``, or a bare tensor as ``{"tensor": t}``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{" and not head.startswith(_TORCH_MAGIC):  # safetensors: a u64 header length, then JSON
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # the library's own errors, whatever the damage
            raise ModelFormatError(f"{path} is not a readable safetensors file ({str(exc)[:200]}): a truncated or "
                                   "damaged download? fetch it again") from None
    data = _torch_load(path, zip_format=head.startswith(b"PK\x03\x04"))
    if isinstance(data, torch.Tensor):
        return {"tensor": data}
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelFormatError(f"{path} is not a state dict of tensors")
    return data


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80\x02")  # torch's zip format; its legacy format starts with a pickle


def _torch_load(path: Path, zip_format: bool):
    """torch.load(weights_only=True), its failures told apart: a cut file, or objects that need code to unpickle."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zip_format)  # mmap: zip format only
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise ModelFormatError(
            f"{path} holds Python objects besides tensors and is not unpickled here ({first}); "
            f"extract its state_dict in a trusted environment: torch.save(torch.load(p)['state_dict'], 'state.pt')"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        kind = "a torch zip file" if zip_format else "a torch file of the legacy format"
        raise ModelFormatError(f"{path} looks like {kind} but cannot be read ({first}): a truncated or damaged "
                               "download? compare its size and checksum with the source and fetch it again") from None


# --------------------------------------------------------- the authors' YAML


def _params(node: dict, *path: str) -> dict:
    for key in path:
        node = node.get(key) or {}
        node = node.get("params", node) if isinstance(node, dict) else {}
    return node


def config_from_authors_yaml(text: str, name: str = "rdeic") -> ModelConfig:
    """Our ModelConfig for an architecture described in the authors' model YAML."""
    root = yaml.safe_load(text)
    p = root.get("params", root)
    unet, ctrl = _params(p, "unet_config"), _params(p, "control_stage_config")
    dd = _params(p, "first_stage_config").get("ddconfig", {})
    pre = _params(p, "preprocess_config")
    try:
        mc, mult = int(unet["model_channels"]), [int(m) for m in unet["channel_mult"]]
        attn = {int(a) for a in unet["attention_resolutions"]}
        chans = [mc * m for m in mult]
        if int(unet.get("transformer_depth", 1)) != 1:
            raise ModelFormatError("only transformer_depth 1 is supported")
        for key in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "context_dim"):
            if key in ctrl and ctrl[key] != unet[key]:
                raise ModelFormatError(f"control_stage_config.{key} differs from unet_config.{key}")
        down = ["CrossAttnDownBlock2D" if 2**i in attn else "DownBlock2D" for i in range(len(mult))]
        unet_cfg = {
            "act_fn": "silu", "attention_head_dim": [c // int(unet["num_head_channels"]) for c in chans],
            "block_out_channels": chans, "center_input_sample": False,
            "cross_attention_dim": int(unet["context_dim"]), "down_block_types": down, "downsample_padding": 1,
            "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
            "in_channels": int(unet["in_channels"]), "layers_per_block": int(unet["num_res_blocks"]),
            "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
            "out_channels": int(unet["out_channels"]), "sample_size": int(unet.get("image_size", 64)),
            "up_block_types": [b.replace("Down", "Up") for b in reversed(down)], "upcast_attention": False,
            "use_linear_projection": bool(unet.get("use_linear_in_transformer", False)),
        }
        vae_cfg = {
            "act_fn": "silu", "block_out_channels": [int(dd["ch"]) * int(m) for m in dd["ch_mult"]],
            "down_block_types": ["DownEncoderBlock2D"] * len(dd["ch_mult"]), "in_channels": int(dd["in_channels"]),
            "latent_channels": int(dd["z_channels"]), "layers_per_block": int(dd["num_res_blocks"]),
            "norm_num_groups": 32, "out_channels": int(dd["out_ch"]), "sample_size": int(dd.get("resolution", 256)),
            "scaling_factor": float(p.get("scale_factor", 0.18215)),
            "up_block_types": ["UpDecoderBlock2D"] * len(dd["ch_mult"]),
        }
        compression = CompressionConfig(
            in_channels=int(pre["in_nc"]), latent_channels=int(pre["out_nc"]), N=int(pre["N"]), M=int(pre["M"]),
            slices=tuple(int(s) for s in pre["slice_ch"]), codebook_size=int(pre["codebook_size"]),
        )
        control = ControlConfig(channel_ratio=float(ctrl.get("control_model_ratio", 1.0)),
                                attention_head_dim=int(ctrl.get("num_head_channels", 16)),
                                max_norm_groups=32, scale=float(ctrl.get("control_scale", 1.0)))
        diffusion = DiffusionConfig(num_train_timesteps=int(p.get("timesteps", 1000)),
                                    beta_start=float(p.get("linear_start", 0.00085)), beta_end=float(p.get("linear_end", 0.012)),
                                    used_timesteps=int(p.get("used_timesteps", 300)), default_steps=int(p.get("fixed_step", 2)))
    except KeyError as exc:
        raise ModelFormatError(f"the model YAML lacks {exc.args[0]!r}") from None
    if int(ctrl.get("hint_channels", compression.M)) != compression.M:
        raise ModelFormatError("control hint_channels must equal the compression module's M")
    return ModelConfig(name=name, vae=vae_cfg, unet=unet_cfg, compression=compression, control=control,
                       diffusion=diffusion, text_context_length=77, trained=True)


# --------------------------------------------------------- RDEIC key mapping

_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_COMPRESSION = [  # (regex on the authors' key after "preprocess_model.", replacement)
    (r"^encoder\.g_a\.", "g_a."), (r"^hyper_enc\.hyper_enc\.", "h_a."), (r"^hyper_dec\.hyper_dec\.", "h_s."),
    (r"^decoder\.g_s\.", "g_s."), (r"^quantize\.", "quantizer."),
    (r"\.subpel_conv\.0\.", ".subpel.conv."), (r"\.upsample\.0\.", ".skip.conv."), (r"\.downsample\.", ".skip."),
    (r"^(channel_context\.\d+)\.fushion\.", r"\1.net."), (r"^(entropy_parameters_(?:non)?anchor\.\d+)\.fusion\.", r"\1.net."),
]


def _resblock_key(rest: str) -> str:
    for old, new in _RESBLOCK.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(rest)


def _control_key(key: str, plan: list[tuple[str, int]]) -> str:
    if key == "control_model.scale_list":
        return "control.scales"
    for old, new in (("enc_zero_convs_out", "enc_zero_convs"), ("dec_zero_convs_out", "dec_zero_convs")):
        m = re.fullmatch(rf"control_model\.{old}\.(\d+)\.0\.(weight|bias)", key)
        if m:
            return f"control.{new}.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"control_model\.middle_block_out\.0\.(weight|bias)", key)
    if m:
        return f"control.mid_zero_conv.{m.group(1)}"
    inner = key[len("control_model.control_model."):]
    m = re.fullmatch(r"time_embed\.(0|2)\.(weight|bias)", inner)
    if m:
        return f"control.time_embedding.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", inner)
    if m:
        block, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        kind, k = plan[block]
        if kind == "conv_in":
            return f"control.conv_in.{rest}"
        if kind == "down":
            return f"control.downsamplers.{k}.conv.{rest[len('op.'):]}"
        return f"control.resnets.{k}.{_resblock_key(rest)}" if layer == 0 else f"control.attentions.{k}.{rest}"
    m = re.fullmatch(r"middle_block\.(\d)\.(.+)", inner)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if layer == 1:
            return f"control.mid_block.attentions.0.{rest}"
        return f"control.mid_block.resnets.{layer // 2}.{_resblock_key(rest)}"
    raise KeyError(key)


def _compression_key(key: str) -> str:
    rest = key[len("preprocess_model."):]
    for pattern, repl in _COMPRESSION:
        rest = re.sub(pattern, repl, rest)
    return "compression." + rest


def map_rdeic_state(state: dict[str, torch.Tensor], model: RDEIC, ignore: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The authors' ``control_model.*`` / ``preprocess_model.*`` tensors under our names, strictly
    (checkpoint keys that map to nothing and match a glob of ``ignore`` are left out)."""
    return _map_rdeic_state(state, model, ignore)[0]


def _map_rdeic_state(state: dict[str, torch.Tensor], model: RDEIC,
                     ignore: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the mapped tensors, the unknown keys ``ignore`` matched)."""
    plan = model.control._plan
    targets = {k for k in model.state_dict() if k.startswith(("control.", "compression."))}
    tables = {f"compression.gaussian_conditional.{t}" for t in ENTROPY_TABLE_KEYS}
    out, unmapped = {}, []
    for key, value in state.items():
        try:
            if key.startswith("control_model."):
                new = _control_key(key, plan)
            elif key.startswith("preprocess_model."):
                new = _compression_key(key)
            else:
                continue  # base model or text encoder keys: converted elsewhere
        except (KeyError, IndexError):
            unmapped.append(key)
            continue
        if new in tables:
            continue  # entropy tables: rebuilt at conversion (the authors rebuild them at every load)
        if new not in targets:
            unmapped.append(key)
            continue
        out[new] = value
    ignored = sorted(k for k in unmapped if any(fnmatchcase(k, p) for p in ignore))
    unmapped = sorted(set(unmapped) - set(ignored))
    missing = sorted(targets - set(out) - tables)
    if unmapped or missing:
        parts = [f"{len(unmapped)} checkpoint tensors map to nothing: {_few(unmapped)} (if they are not weights of "
                 "this model, skip them with --ignore-keys PATTERN, a glob on the key)"] if unmapped else []
        for ours, theirs in (("control.", "control_model."), ("compression.", "preprocess_model.")):
            gone = [k for k in missing if k.startswith(ours)]
            if gone and len(gone) == len([k for k in targets - tables if k.startswith(ours)]):
                parts.append(f"no {theirs}* tensors at all")
            elif gone:
                parts.append(f"{len(gone)} {ours[:-1]} tensors not in the checkpoint: {_few(gone)}")
        raise ModelFormatError("RDEIC checkpoint does not match the architecture: " + "; ".join(parts))
    return out, ignored


def _few(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# ---------------------------------------------------------- default decode steps

_STEP_IN_NAME = re.compile(r"(?<![a-z0-9])step[-_]?(\d+)(?![0-9])", re.IGNORECASE)


def choose_default_steps(config: ModelConfig, checkpoint: Path, fixed_step: int | None = None, where: str = "the YAML",
                         explicit: int | None = None) -> tuple[int, str]:
    """(the model's default decode steps, what decided them): ``explicit`` (--default-steps), else the step
    count in the checkpoint's file name (``rdeic_2_step5.ckpt``), else the YAML's ``fixed_step``, else the
    config's. The name goes before the YAML: the authors' one YAML says ``fixed_step: 2`` for every release."""
    used = config.diffusion.used_timesteps
    if explicit is not None:
        if type(explicit) is not int or not 1 <= explicit <= used:
            raise ConfigError(f"--default-steps must be an integer in [1, {used}] (this model's used_timesteps), "
                              f"got {explicit!r}")
        return explicit, "--default-steps"
    named = sorted({int(n) for n in _STEP_IN_NAME.findall(checkpoint.name)})
    if len(named) > 1 or (named and not 1 <= named[0] <= used):
        raise ConfigError(f"the file name {checkpoint.name} gives no step count in [1, {used}] (it says step "
                          f"{' and '.join(map(str, named))}); pass --default-steps N")
    if named:
        if fixed_step is not None and fixed_step != named[0]:
            log.warning("%s says fixed_step %d, the checkpoint's file name step %d: using %d (pass --default-steps "
                        "N to choose)", where, fixed_step, named[0], named[0])
        return named[0], f"the checkpoint's file name {checkpoint.name}"
    if fixed_step is not None:
        return fixed_step, f"fixed_step in {where}"
    return config.diffusion.default_steps, ("the default; neither the file name nor a model YAML gives it "
                                            "(set it with --default-steps N)")


# ------------------------------------------------------------- SD 2.1-base


def _diffusers_folder(path: Path) -> tuple[dict, dict, dict | None]:
    def weights(sub: str) -> dict:
        for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin"):
            if (path / sub / name).is_file():
                return read_checkpoint(path / sub / name)
        raise ModelFormatError(f"{path / sub} holds no weights file")

    sched = path / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        import json

        pred = json.loads(sched.read_text()).get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ModelFormatError(f"{path} is a {pred} model (SD 2.1 at 768 px); RDEIC needs SD 2.1-base (epsilon)")
    text = weights("text_encoder") if (path / "text_encoder").is_dir() else None
    return weights("vae"), weights("unet"), text


def sd_state(path: str | os.PathLike, config: ModelConfig) -> tuple[dict, dict, torch.Tensor | None]:
    """(VAE, UNet) weights in diffusers layout, and the empty-prompt embedding if a text encoder is present."""
    from .text_context import from_hf_clip, from_open_clip

    path = Path(path)
    if path.is_dir():
        vae, unet, text = _diffusers_folder(path)
        return vae, unet, (from_hf_clip(text) if text is not None else None)
    if "768" in path.name:
        log.warning("%s looks like the 768-px v-prediction SD 2.1; RDEIC needs 2.1-base (512 px, epsilon)", path.name)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    ckpt = read_checkpoint(path)
    if not any(k.startswith("model.diffusion_model.") for k in ckpt):
        raise ModelFormatError(f"{path} is not a single-file Stable Diffusion checkpoint (no model.diffusion_model.*)")
    # our bundled 2.1-base configs, never the library's guess (which maps SD 2 to the 768-px v model)
    unet = convert_ldm_unet_checkpoint(ckpt, dict(config.unet))
    vae = convert_ldm_vae_checkpoint(ckpt, dict(config.vae))
    text = from_open_clip(ckpt) if any(k.startswith("cond_stage_model.model.") for k in ckpt) else None
    return vae, unet, text


def read_text_embedding(path: str | os.PathLike, length: int, dim: int) -> torch.Tensor:
    """The empty prompt's (1, length, dim) text embedding from a file of one tensor (a bare tensor, a dict of
    one, or safetensors); (length, dim) is taken as one prompt, and a batch of them gives its first."""
    state = read_checkpoint(path)
    if len(state) != 1:
        raise ModelFormatError(f"{path} must hold exactly one tensor, the (1, {length}, {dim}) embedding; "
                               f"it holds {len(state)}: {', '.join(list(state)[:5])}")
    tensor = next(iter(state.values()))
    if tensor.dim() == 2:
        tensor = tensor[None]
    if tensor.dim() != 3 or tuple(tensor.shape[1:]) != (length, dim) or tensor.shape[0] < 1:
        raise ModelFormatError(f"{path} holds a tensor of shape {tuple(tensor.shape)}; this model needs the empty "
                               f"prompt's (1, {length}, {dim}) embedding (its text encoder's width is {dim})")
    return tensor[:1].float()


# ------------------------------------------------------------------ assembly


def convert(sd: str | os.PathLike, rdeic: str | os.PathLike, out: str | os.PathLike, rdeic_config: str | None = None,
            text_embedding: str | None = None, name: str | None = None, default_steps: int | None = None,
            ignore_keys: Sequence[str] = (), report: Callable[[str], None] = log.info) -> ModelId:
    """Write one model directory from SD 2.1-base and an authors' RDEIC checkpoint; ``report`` receives
    what decided the default decode steps and which checkpoint keys ``ignore_keys`` left out."""
    rdeic_path = Path(rdeic)
    name = name or re.sub(r"\.(ckpt|pt|pth|safetensors)$", "", rdeic_path.name).replace("_", "-")
    fixed_step = None
    if rdeic_config:
        yaml_text = Path(rdeic_config).read_text()
        config = config_from_authors_yaml(yaml_text, name=name)
        root = yaml.safe_load(yaml_text)
        fixed_step = root.get("params", root).get("fixed_step")
        fixed_step = None if fixed_step is None else int(fixed_step)
    else:
        config = replace(load_preset("sd21"), name=name, trained=True)
    steps, source = choose_default_steps(config, rdeic_path, fixed_step, Path(rdeic_config or "").name,
                                         default_steps)
    config = replace(config, diffusion=replace(config.diffusion, default_steps=steps))
    with torch.device("meta"):
        model = RDEIC(config)
    vae, unet, text = sd_state(sd, config)
    rdeic_state, ignored = _map_rdeic_state(read_checkpoint(rdeic_path), model, ignore_keys)
    for pattern in ignore_keys:
        if not any(fnmatchcase(k, pattern) for k in ignored):
            log.warning("--ignore-keys %r matched no unknown checkpoint key", pattern)
    if ignored:
        report(f"ignored {len(ignored)} checkpoint tensors that map to nothing: {_few(ignored, 10)}")
        log.info("ignored: %s", ", ".join(ignored))
    report(f"default decode steps: {steps} (from {source})")
    if text_embedding:
        text = read_text_embedding(text_embedding, config.text_context_length, config.context_dim)
    if text is None:
        raise ModelFormatError("no empty-prompt embedding: the SD weights carry no text encoder; pass --text-embedding FILE")
    state = {f"vae.{k}": v for k, v in vae.items()}
    state.update({f"unet.{k}": v for k, v in unet.items()})
    state.update(rdeic_state)
    state["text_context"] = text.reshape(1, config.text_context_length, config.context_dim)
    # Entropy tables (and any bound buffers the checkpoint lacks) are built here from the scale table;
    # table buffers change shape with their contents, so the meta model's placeholders are resized.
    for key, value in entropy_buffers(config.compression).items():
        if f"compression.gaussian_conditional.{key}" not in state:
            state[f"compression.gaussian_conditional.{key}"] = value
            if key in ENTROPY_TABLE_KEYS:
                setattr(model.compression.gaussian_conditional, key, torch.empty_like(value, device="meta"))
    load_state_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, "converted weights")
    return save_model(model.eval(), out)

