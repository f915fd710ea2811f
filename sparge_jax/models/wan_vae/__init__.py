"""The Wan2.1 video VAE (diffusers `AutoencoderKLWan`): the model (`model`) and diffusers folder loading (`loading`)."""

from sparge_jax.models.wan_vae.loading import config_from_diffusers, load_wan_vae
from sparge_jax.models.wan_vae.model import WanVAE, WanVAEConfig, denormalize_latents, normalize_latents

__all__ = [
  "WanVAE",
  "WanVAEConfig",
  "config_from_diffusers",
  "denormalize_latents",
  "load_wan_vae",
  "normalize_latents",
]
