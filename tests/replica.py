"""Format replicas: tiny random Qwen3.5 models built with transformers (the oracle) and written in the
official checkpoint layouts, so tests compare qwen35 against the reference on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
)

from qwen35.checkpoint import random_tensors, write_checkpoint
from qwen35.config import ModelConfig

F32_ON_DISK = ("linear_attn.A_log", "linear_attn.norm.weight")


def text_config(value_mult: int = 2, tie: bool = False, num_layers: int = 8, **over) -> dict:
    cfg = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,  # interval 4: full attention at 3 and 7
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=2 * value_mult,
        linear_key_head_dim=16,
        linear_value_head_dim=24,
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=262144,
        rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.5,
                             mrope_section=[3, 3, 2], mrope_interleaved=True),
        tie_word_embeddings=tie,
        eos_token_id=1,
    )
    cfg.update(over)
    return cfg


VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)
# the official preprocessor_config.json's fields at the tiny tower's patch size, with pixel limits that keep
# images at a few dozen patches (the official limits are 65536 .. 16777216 pixels)
PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 4, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "size": {"shortest_edge": 256, "longest_edge": 2048}}
# placeholder ids inside the replicas' 320-token vocabulary (the official ones are 248053..248057)
VISION_TOKENS = {"image_token_id": 316, "video_token_id": 317, "vision_start_token_id": 318, "vision_end_token_id": 319}


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.08) -> None:
    """Non-trivial norms and dt_bias (zero-initialised norms hide bugs); values rounded to what BF16 on
    disk can hold, except the tensors Qwen3.5 ships in F32."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.weight"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=gen) * 2 - 0.5)
            elif p.dim() >= 2 and "visual" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            if not name.endswith(F32_ON_DISK):
                p.copy_(p.to(torch.bfloat16).float())


def _randomize_visual(model: torch.nn.Module, seed: int) -> None:
    """The vision tower's LayerNorms, biases and learned positions get non-trivial values and its matrices a
    scale that makes attention non-uniform (HF's init leaves norms at 1 and biases at 0, which hide bugs).
    Its own generator: the text weights stay what they were."""
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" not in name:
                continue
            if "norm" in name.split(".")[-2] and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "pos_embed" in name else 0.15))
            p.copy_(p.to(torch.bfloat16).float())


def _disk_dtypes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if k.endswith(F32_ON_DISK) else v.to(torch.bfloat16)) for k, v in sd.items()}


def build_vlm(out: Path, value_mult: int = 2, seed: int = 0, std: float = 0.08, vision: dict | None = None,
              tokens: dict | None = None, **text_over):
    """Untied composite Qwen3_5ForConditionalGeneration with a tiny vision tower (`vision`: a vision_config,
    default VISION; `tokens`: its placeholder token ids, default VISION_TOKENS), sharded with the official
    shard names, BF16 + F32 A_log/norm, plus `mtp.*` tensors. Returns (hf_model, path)."""
    text = text_config(value_mult, tie=False, **text_over)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision or VISION, tie_word_embeddings=False,
                        **(tokens or VISION_TOKENS))
    torch.manual_seed(seed)
    hf = Qwen3_5ForConditionalGeneration(cfg).eval()
    _randomize(hf, seed, std)
    _randomize_visual(hf, seed)
    sd = {k: v for k, v in hf.state_dict().items()}
    config_dict = cfg.to_dict()
    config_dict["text_config"]["mtp_num_hidden_layers"] = 1
    ours = ModelConfig.from_hf(config_dict)
    mtp = {k: v for k, v in random_tensors(ours, mtp_layers=1, seed=seed + 1, std=0.08).items()
           if k.startswith("mtp.")}
    tensors = _disk_dtypes(sd) | mtp
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_checkpoint(tensors, config_dict, out, max_shard_bytes=total // 3 + 1)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return hf, out


def build_text(out: Path, tie: bool = True, seed: int = 0, value_mult: int = 2, **text_over):
    """Text-only Qwen3_5ForCausalLM (`model.*` keys), tied by default (no lm_head.weight on disk), in a
    single model.safetensors, all F32. Returns (hf_model, path)."""
    from safetensors.torch import save_file

    cfg = Qwen3_5TextConfig(**text_config(value_mult, tie=tie, **text_over))
    torch.manual_seed(seed)
    hf = Qwen3_5ForCausalLM(cfg).eval()
    _randomize(hf, seed)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if tie:
        sd.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    return hf, out


def build_chat_model(out: Path, seed: int = 0) -> Path:
    """A tiny random Qwen3.5 (full 248,320 vocabulary) with the real Qwen3.5 tokenizer, for exercising
    text-level paths: tokenizer, template, streaming, CLI. Its output is random text, not language."""
    import shutil

    import tokenizer_fixture

    from qwen35.commands.replica import build_replica

    if (out / "tokenizer.json").is_file():
        return out
    build_replica(out, "tiny", seed=seed, vocab_size=248320, hidden_size=128, intermediate_size=256)
    tok = tokenizer_fixture.build()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, out / name)
    return out


def build_vision_chat_model(out: Path, seed: int = 0):
    """A tiny composite Qwen3.5 with a vision tower, the full 248,320 vocabulary, the official placeholder
    token ids and the real Qwen3.5 tokenizer: for image input through the text-level API, CLI and server.
    Returns (hf_model, path)."""
    import shutil

    import tokenizer_fixture

    official = {"image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053,
                "vision_end_token_id": 248054}
    hf, path = build_vlm(out, seed=seed, std=0.08, vocab_size=248320, tokens=official, eos_token_id=248046)
    tok = tokenizer_fixture.build()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, path / name)
    return hf, path
