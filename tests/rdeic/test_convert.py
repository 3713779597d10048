"""Conversion of the authors' checkpoints: strict key accounting and exact tensor mapping."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from rdeic.compression import ENTROPY_TABLE_KEYS, entropy_buffers
from rdeic.config import load_preset
from rdeic.convert import config_from_authors_yaml, map_rdeic_state, read_checkpoint
from rdeic.errors import ModelFormatError
from rdeic.model import RDEIC

SHARED_KEYS = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "rdeic_sd21_checkpoint_keys.json"


def _synthetic(spec: dict) -> dict[str, torch.Tensor]:
    """Small-dtype tensors of the listed shapes, each with its own recognisable values."""
    out = {}
    for i, (key, (shape, dtype)) in enumerate(sorted(spec.items())):
        n = int(torch.tensor(shape).prod()) if shape else 1
        if dtype.startswith("int"):
            out[key] = torch.full(shape, i, dtype=torch.int32)
        else:
            out[key] = ((torch.arange(n, dtype=torch.float32) % 97 + i * 1000) / 1024).to(torch.float16).reshape(shape)
    return out


@pytest.fixture(scope="module")
def sd21_meta():
    with torch.device("meta"):
        return RDEIC(load_preset("sd21"))


@pytest.mark.skipif(not SHARED_KEYS.is_file(), reason="../shared/fixtures is not beside this checkout")
def test_authors_sd21_keys_map_exactly_onto_our_sd21_model(sd21_meta):
    spec = json.loads(SHARED_KEYS.read_text())["tensors"]
    state = _synthetic(spec)
    mapped = map_rdeic_state(state, sd21_meta)
    ours = {k: v for k, v in sd21_meta.state_dict().items() if k.startswith(("control.", "compression."))}
    tables = {k for k in ours if k.split(".")[-1] in ENTROPY_TABLE_KEYS}
    assert set(mapped) == set(ours) - tables  # every tensor of ours filled; entropy tables rebuilt at conversion
    for key, value in mapped.items():
        assert tuple(value.shape) == tuple(ours[key].shape), key
    used = {id(v) for v in mapped.values()}
    unused = [k for k, v in state.items() if id(v) not in used]
    assert sorted(unused) == sorted(k for k in spec if k.split(".")[-1] in ENTROPY_TABLE_KEYS)
    # strict load into the real modules, then exact equality of every mapped tensor
    for part in ("control", "compression"):
        module = getattr(sd21_meta, part)
        sub = {k[len(part) + 1:]: v for k, v in mapped.items() if k.startswith(part + ".")}
        if part == "compression":
            for k, v in entropy_buffers(load_preset("sd21").compression).items():
                sub.setdefault(f"gaussian_conditional.{k}", v)
                if k in ENTROPY_TABLE_KEYS:
                    setattr(module.gaussian_conditional, k, torch.empty_like(v, device="meta"))
        module.load_state_dict(sub, strict=True, assign=True)
        loaded = module.state_dict()
        for k, v in sub.items():
            assert torch.equal(loaded[k], v), k


@pytest.mark.skipif(not SHARED_KEYS.is_file(), reason="../shared/fixtures is not beside this checkout")
def test_missing_and_unexpected_keys_are_named(sd21_meta):
    spec = json.loads(SHARED_KEYS.read_text())["tensors"]
    state = _synthetic({k: v for k, v in spec.items() if k.startswith("preprocess_model.")})
    state.pop("preprocess_model.out.bias")
    state["preprocess_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ModelFormatError) as err:
        map_rdeic_state(state, sd21_meta)
    text = str(err.value)
    assert "preprocess_model.extra.weight" in text and "compression.out.bias" in text and "no control_model.* tensors" in text


def test_authors_yaml_of_the_paper_gives_our_sd21_preset():
    text = (Path(__file__).resolve().parent / "data" / "authors_rdeic.yaml").read_text()
    cfg = config_from_authors_yaml(text, name="x")
    preset = load_preset("sd21")
    for key in ("block_out_channels", "attention_head_dim", "down_block_types", "up_block_types", "layers_per_block",
                "cross_attention_dim", "use_linear_projection"):
        assert cfg.unet[key] == preset.unet[key], key
    assert cfg.vae["block_out_channels"] == preset.vae["block_out_channels"]
    assert cfg.compression == preset.compression and cfg.control == preset.control
    assert cfg.diffusion == preset.diffusion


def test_unpickling_is_refused_for_arbitrary_objects(tmp_path):
    import argparse

    path = tmp_path / "evil.ckpt"  # any object but tensors and plain containers needs code to unpickle
    torch.save({"state_dict": {"a": torch.zeros(1)}, "hyper_parameters": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ModelFormatError, match="not unpickled here"):
        read_checkpoint(path)
    torch.save({"state_dict": {"a": torch.ones(2)}, "epoch": 3}, tmp_path / "ok.ckpt")
    assert torch.equal(read_checkpoint(tmp_path / "ok.ckpt")["a"], torch.ones(2))


@pytest.mark.parametrize("save", [
    lambda t, p: torch.save(t, p),  # a bare tensor
    lambda t, p: torch.save({"embedding": t}, p),  # a dict of one tensor
    lambda t, p: __import__("safetensors.torch").torch.save_file({"c": t}, str(p)),
])
def test_the_text_embedding_may_be_a_tensor_a_dict_of_one_or_safetensors(tmp_path, save):
    from rdeic.convert import read_text_embedding

    tensor = torch.randn(1, 77, 32)
    save(tensor, tmp_path / "e.pt")
    assert torch.equal(read_text_embedding(tmp_path / "e.pt", 77, 32), tensor)


@pytest.mark.parametrize("shape", [(1, 77, 1024), (1, 77, 768), (77 * 32,), (2, 76, 32)])
def test_a_text_embedding_of_another_shape_is_refused_naming_both(tmp_path, shape):
    from rdeic.convert import read_text_embedding

    torch.save(torch.zeros(shape), tmp_path / "e.pt")
    with pytest.raises(ModelFormatError) as info:
        read_text_embedding(tmp_path / "e.pt", 77, 32)
    assert str(tuple(shape)) in str(info.value) and "(1, 77, 32)" in str(info.value)


def test_a_damaged_checkpoint_is_named_for_what_it_is(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(1000)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match="truncated or damaged"):
        read_checkpoint(cut)


def test_a_checkpoint_of_torchs_legacy_format_reads(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(legacy)["w"], torch.zeros(3))  # the pre-1.6 format still reads


# ------------------------------------------------------- `rdeic convert-weights` on the authors' tiny fixture

AUTHORS_TINY = Path(__file__).resolve().parents[1] / "fixtures" / "authors_tiny"


def _convert_cli(rdeic_ckpt: Path, out: Path, *extra: str, config: Path | None = None) -> int:
    from rdeic.cli import main

    return main(["convert-weights", "--sd", str(AUTHORS_TINY / "checkpoint.safetensors"), "--rdeic", str(rdeic_ckpt),
                 "--rdeic-config", str(config or AUTHORS_TINY / "model.yaml"),
                 "--text-embedding", str(AUTHORS_TINY / "text_context.safetensors"), "--out", str(out), *extra])


def _checkpoint_named(tmp_path: Path, name: str, extra: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    path = tmp_path / name
    if extra:
        save_file({**load_file(str(AUTHORS_TINY / "checkpoint.safetensors")), **extra}, str(path))
    else:
        path.symlink_to(AUTHORS_TINY / "checkpoint.safetensors")
    return path


@pytest.mark.parametrize("name, fixed_step, extra, steps, source", [
    ("rdeic_2_step5.safetensors", 2, [], 5, "file name"),  # the authors' one YAML says fixed_step: 2 for every release
    ("rdeic_2_step2.safetensors", 2, [], 2, "file name"),
    ("rdeic_1_step5_ema.ckpt.safetensors", None, [], 5, "file name"),
    ("mine.safetensors", 5, [], 5, "fixed_step"),
    ("mine.safetensors", None, [], 2, "default"),
    ("rdeic_2_step5.safetensors", 2, ["--default-steps", "3"], 3, "--default-steps"),
])
def test_the_converted_models_default_steps_follow_the_checkpoint(tmp_path, capsys, name, fixed_step, extra, steps, source):
    from rdeic.cli import main
    from rdeic.modeldir import read_config

    text = (AUTHORS_TINY / "model.yaml").read_text().replace("  fixed_step: 2\n", "")
    assert "fixed_step" not in text
    config = tmp_path / "model.yaml"
    config.write_text(text + (f"  fixed_step: {fixed_step}\n" if fixed_step else ""))
    out = tmp_path / "out"
    assert _convert_cli(_checkpoint_named(tmp_path, name), out, *extra, config=config) == 0
    assert read_config(out).diffusion.default_steps == steps
    said = [line for line in capsys.readouterr().out.splitlines() if "default decode steps" in line]
    assert len(said) == 1 and f"default decode steps: {steps} " in said[0] and source in said[0], said
    assert main(["model-info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["default_steps"] == steps


@pytest.mark.parametrize("value", ["0", "301", "five", "2.5"])
def test_default_steps_out_of_range_is_refused_in_one_line(tmp_path, capsys, value):
    assert _convert_cli(_checkpoint_named(tmp_path, "rdeic_2_step5.safetensors"), tmp_path / "out",
                        "--default-steps", value) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--default-steps" in err[0] and "[1, 300]" in err[0], err
    assert not (tmp_path / "out").exists()


def test_unknown_checkpoint_keys_fail_unless_ignored_by_pattern(tmp_path, capsys, caplog):
    extra = {f"preprocess_model.extra.{i:02d}.weight": torch.zeros(2) for i in range(25)}
    extra["control_model.lora_up.weight"] = torch.zeros(3)
    ckpt = _checkpoint_named(tmp_path, "rdeic_2_step2.safetensors", extra)
    assert _convert_cli(ckpt, tmp_path / "a") == 2  # strict by default
    err = capsys.readouterr().err
    assert "26 checkpoint tensors map to nothing" in err and "control_model.lora_up.weight" in err and "--ignore-keys" in err
    assert _convert_cli(ckpt, tmp_path / "b", "--ignore-keys", "preprocess_model.extra.*") == 2  # the rest still fail
    err = capsys.readouterr().err
    assert "1 checkpoint tensors map to nothing: control_model.lora_up.weight" in err and "--ignore-keys" in err
    assert "preprocess_model.extra" not in err
    caplog.set_level("WARNING")
    assert _convert_cli(ckpt, tmp_path / "c", "--ignore-keys", "preprocess_model.extra.*",
                        "--ignore-keys", "control_model.lora_*", "--ignore-keys", "model_ema.*") == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "ignored 26" in line)
    assert "control_model.lora_up.weight" in line and "preprocess_model.extra.00.weight" in line
    assert "preprocess_model.extra.24.weight" not in line and "more" in line  # the names are capped
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("model_ema.*" in w and "matched no" in w for w in warnings), warnings
    assert not any("preprocess_model.extra.*" in w for w in warnings)


def test_converted_weight_files_have_the_usual_mode(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert _convert_cli(_checkpoint_named(tmp_path, "rdeic_2_step2.safetensors"), tmp_path / "out") == 0
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "out").iterdir()}
    assert modes == {name: 0o644 for name in ("config.json", "model.safetensors", "entropy_tables.safetensors",
                                               "model_id.json")}
