"""Tiny, randomly initialised pipelines of the real families, built locally (no hub).

They are the same diffusers/transformers classes as Z-Image-Turbo and FLUX.2-klein at a few thousand parameters
each: every code path of the method runs on them in seconds, and the nano model is one of them, trained.
A built folder loads with `ZImagePipeline.from_pretrained(path)` / `Flux2KleinPipeline.from_pretrained(path)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    Qwen2VLImageProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from dopsd.models.tokenizer import build_qwen_tokenizer

TEACHER_ENCODER_FOLDER = "teacher_encoder"
TEACHER_PROCESSOR_FOLDER = "teacher_processor"


@dataclass
class TinyConfig:
    """Sizes of a tiny pipeline. Defaults build a model that runs a training step in well under a second on a CPU."""

    text_hidden: int = 32
    """Hidden size of the Qwen3 text encoder (also the caption feature width the transformer takes)."""
    text_layers: int = 2
    """Number of Qwen3 decoder layers."""
    dim: int = 64
    """Transformer width."""
    layers: int = 2
    """Main transformer blocks."""
    heads: int = 2
    """Attention heads (head dim = dim / heads)."""
    latent_channels: int = 4
    """VAE latent channels."""
    vae_channels: tuple[int, ...] = (16, 32)
    """VAE block widths; len - 1 halvings of resolution."""
    vocab_size: int = 512
    """BPE vocabulary size of the locally trained tokenizer."""
    vision_patch: int = 8
    """Qwen3-VL vision patch size (pixels)."""
    vision_hidden: int = 32
    """Qwen3-VL vision tower width."""
    vision_layers: int = 1
    """Qwen3-VL vision tower depth."""
    refiner_layers: int = 1
    """Z-Image noise and context refiner blocks."""


def _qwen3_config(cfg: TinyConfig, vocab: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 2,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=cfg.text_hidden // 2,  # Qwen3Config defaults head_dim to 128 whatever the width
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
    )


def build_teacher_encoder(text_encoder: Qwen3Model, tokenizer, cfg: TinyConfig) -> Qwen3VLForConditionalGeneration:
    """A Qwen3-VL whose language model is `text_encoder` (weights copied) and whose vision tower is fresh."""
    tc = text_encoder.config
    head_dim = tc.head_dim
    quarter = head_dim // 2 // 4
    vl_config = Qwen3VLConfig(
        text_config={
            "vocab_size": tc.vocab_size,
            "hidden_size": tc.hidden_size,
            "intermediate_size": tc.intermediate_size,
            "num_hidden_layers": tc.num_hidden_layers,
            "num_attention_heads": tc.num_attention_heads,
            "num_key_value_heads": tc.num_key_value_heads,
            "head_dim": head_dim,
            "max_position_embeddings": tc.max_position_embeddings,
            "rms_norm_eps": tc.rms_norm_eps,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": tc.rope_parameters["rope_theta"],
                "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": cfg.vision_layers,
            "hidden_size": cfg.vision_hidden,
            "intermediate_size": cfg.vision_hidden * 2,
            "num_heads": 2,
            "patch_size": cfg.vision_patch,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": tc.hidden_size,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [cfg.vision_layers - 1],
        },
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    teacher = Qwen3VLForConditionalGeneration(vl_config)
    transplant_text_weights(text_encoder, teacher)
    return teacher


def transplant_text_weights(text_encoder: Any, teacher: Qwen3VLForConditionalGeneration) -> None:
    """Copy a Qwen3 text encoder's weights into a Qwen3-VL language model (all keys must match)."""
    source = text_encoder.model if hasattr(text_encoder, "model") else text_encoder
    missing, unexpected = teacher.model.language_model.load_state_dict(source.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"Qwen3 -> Qwen3-VL weight transplant does not match: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. The teacher encoder must be the VL sibling of the text encoder."
        )


def build_teacher_processor(cfg: TinyConfig) -> Qwen2VLImageProcessor:
    # PIL path of the Qwen2-VL processor: needs no video processor. Qwen3-VL normalises with mean = std = 0.5.
    return Qwen2VLImageProcessor(
        patch_size=cfg.vision_patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=(cfg.vision_patch * 2) ** 2,
        max_pixels=(cfg.vision_patch * 16) ** 2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def init_pad_tokens(transformer: ZImageTransformer2DModel) -> None:
    # diffusers creates these with torch.empty (they are always loaded from a checkpoint); random init needs values.
    with torch.no_grad():
        transformer.x_pad_token.normal_(0, 0.02)
        transformer.cap_pad_token.normal_(0, 0.02)


def vae_layout(cfg: TinyConfig) -> dict:
    """The blocks of a tiny VAE, shared by both families' autoencoder classes."""
    n = len(cfg.vae_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": cfg.vae_channels,
        "layers_per_block": 1,
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": 8,
    }


def build_tiny_zimage(
    out_dir: str | Path, cfg: TinyConfig | None = None, seed: int = 0, corpus: tuple[str, ...] = ()
) -> Path:
    """Write a tiny Z-Image pipeline folder (plus its Qwen3-VL teacher encoder) to `out_dir`."""
    cfg = cfg or TinyConfig()
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer(corpus, cfg.vocab_size)
    text_encoder = Qwen3Model(_qwen3_config(cfg, len(tokenizer))).eval()
    head_dim = cfg.dim // cfg.heads
    axes = [head_dim - 2 * (head_dim * 3 // 8), head_dim * 3 // 8, head_dim * 3 // 8]
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=cfg.latent_channels,
        dim=cfg.dim,
        n_layers=cfg.layers,
        n_refiner_layers=cfg.refiner_layers,
        n_heads=cfg.heads,
        n_kv_heads=cfg.heads,
        cap_feat_dim=cfg.text_hidden,
        axes_dims=axes,
        axes_lens=[256, 64, 64],
    )
    init_pad_tokens(transformer)
    vae = AutoencoderKL(**vae_layout(cfg), scaling_factor=1.0, shift_factor=0.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    out = Path(out_dir)
    pipe.save_pretrained(out)
    build_teacher_encoder(text_encoder, tokenizer, cfg).save_pretrained(out / TEACHER_ENCODER_FOLDER)
    build_teacher_processor(cfg).save_pretrained(out / TEACHER_PROCESSOR_FOLDER)
    return out


def build_tiny_flux2_klein(
    out_dir: str | Path, cfg: TinyConfig | None = None, seed: int = 0, corpus: tuple[str, ...] = ()
) -> Path:
    """Write a tiny FLUX.2-klein pipeline folder to `out_dir` (step-distilled flag set, so guidance is off)."""
    cfg = cfg or TinyConfig(text_layers=3)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer(corpus, cfg.vocab_size)
    text_encoder = Qwen3ForCausalLM(_qwen3_config(cfg, len(tokenizer))).eval()
    head_dim = cfg.dim // cfg.heads
    quarter = head_dim // 4
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=cfg.latent_channels * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_hidden * 3,
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(quarter, quarter, quarter, head_dim - 3 * quarter),
        rope_theta=2000,
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        **vae_layout(cfg),
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out
