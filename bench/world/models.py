"""Architectures of the Shapes world's pipeline components (diffusers / transformers classes).

Sizes follow the measured "C xs" configuration of ``shared/reference/world-calibration2.md``:
a 1.0M-parameter UNet on a 16×16×4 latent (factor-2 VAE), a 2-layer 64-d CLIP text encoder, and
DDPM training with scaled-linear betas 0.00085–0.012 (SD v1.x's schedule).
"""
from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

TEXT_LEN = 16  # captions are ≤ 12 tokens; 16 keeps cross-attention cheap
TEXT_DIM = 64
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def make_vae(sample_size: int = 32) -> AutoencoderKL:
    """The factor-2 VAE (``sample_size``: the image side)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=sample_size,
    )


def make_unet(sample_size: int = 16, cross_attention_dim: int = TEXT_DIM) -> UNet2DConditionModel:
    """The two-level UNet (``sample_size``: the latent side; ``cross_attention_dim``: the text width)."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers' legacy name: 4 heads
        norm_num_groups=32,
    )


def make_text_encoder(hidden_size: int = TEXT_DIM, max_positions: int = TEXT_LEN) -> CLIPTextModel:
    """The 2-layer CLIP text encoder (``hidden_size`` wide, ``max_positions`` tokens)."""
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(cfg)


def make_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**BETAS, clip_sample=False, prediction_type="epsilon")


def make_inference_scheduler() -> DDIMScheduler:
    """The world's shipped sampler: DDIM (η = 0), 20 steps by default (see ``world.json``)."""
    return DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
