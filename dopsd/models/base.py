"""`FewStepModel`: the one interface the method touches, whatever the model family.

Project-wide conventions (every family converts to and from its own):
- sigma = 1 is pure noise, sigma = 0 is data, and x_sigma = (1 - sigma) * x0 + sigma * noise;
- velocity v = dx/dsigma = noise - x0, so x0 = x - sigma * v and an Euler step is x + (sigma_next - sigma) * v;
- a context is one sample's conditioning, a dict of tensors; models take lists of them, so contexts can be
  computed once per training sample, cached, and batched freely.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

Context = dict[str, torch.Tensor]


class FewStepModel(ABC):
    """A step-distilled text-to-image model seen through the project's conventions."""

    family: str
    """Short family name, as presets and registry tags spell it."""
    default_lora_targets: tuple[str, ...]
    """Module-name suffixes that receive LoRA by default (attention projections and feed-forward)."""

    def __init__(self, pipeline, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.pipeline = pipeline.to(device)
        self.device = torch.device(device)
        self.dtype = dtype
        # What the method calls; the trainer may swap in its distributed wrapper (configs live on the pipeline).
        self.transformer: torch.nn.Module = pipeline.transformer
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every network of the model; only LoRA adapters added later are trained."""
        return [self.pipeline.transformer, *self.encoder_modules()]

    def encoder_modules(self) -> list[torch.nn.Module]:
        """The networks that only turn data into contexts and latents (idle once those are cached)."""
        return [self.pipeline.vae, self.pipeline.text_encoder]

    @property
    def resolution_multiple(self) -> int:
        """Height and width must be multiples of this (VAE downsampling x 2x2 patches)."""
        return self.pipeline.vae_scale_factor * 2

    def check_resolution(self, height: int, width: int) -> None:
        m = self.resolution_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(
                f"resolution {height}x{width} is not supported by {self.family}: height and width must be "
                f"positive multiples of {m}; pick e.g. {max(m, height // m * m)}x{max(m, width // m * m)}."
            )

    @abstractmethod
    def encode_student(self, prompts: Sequence[str], differentiable: bool = False) -> list[Context]:
        """The deployed conditioning: the prompt alone. `differentiable` keeps the text encoder's graph, for
        gradients into what it reads (learnt word embeddings, `dopsd.words`)."""

    @abstractmethod
    def encode_teacher(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> list[Context]:
        """The teacher's conditioning: the prompt and the target image."""

    def vision_tokens(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Each image as the teacher's vision encoder hands it to the text encoder: tokens in the text encoder's input
        embedding space, (tokens, width) per image. Only a family whose teacher reads images that way has them."""
        raise ValueError(
            f"the {self.family} family has no vision encoder that writes into its text encoder's input embeddings: a "
            "word cannot start from images (`word=@images`); start it from a word"
        )

    @abstractmethod
    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, contexts: Sequence[Context]) -> torch.Tensor:
        """Velocity (noise - x0) at `latents` (B, ...) and per-sample `sigma` (B,), in float32."""

    def predicted_x0(self, latents: torch.Tensor, sigma: torch.Tensor, contexts: Sequence[Context]) -> torch.Tensor:
        """The clean latents the velocity points to from `latents` at `sigma`: x - sigma * v."""
        s = sigma.view(-1, *([1] * (latents.dim() - 1)))
        return latents - s * self.velocity(latents, sigma, contexts)

    @abstractmethod
    def schedule(self, steps: int, height: int, width: int) -> torch.Tensor:
        """The sigmas the deployed sampler visits at `steps` steps, ending with 0 (length steps + 1)."""

    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latents (no batch dim) for an image of height x width."""

    @abstractmethod
    def to_latents(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        """Encode images (resized and centre-cropped to height x width) into project latents, float32."""

    @abstractmethod
    def to_images(self, latents: torch.Tensor) -> list[Image.Image]:
        """Decode project latents into images."""

    @abstractmethod
    def pipeline_kwargs(self) -> dict:
        """Extra keyword arguments the real pipeline needs to sample as this model does."""

    def noise(self, batch: int, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial noise drawn exactly as the real pipeline draws it (same generator -> same tensor)."""
        shape = (batch, *self.latent_shape(height, width))
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def save_lora(self, directory: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
        """Write a transformer LoRA in the diffusers format that `pipe.load_lora_weights(directory)` reads."""
        type(self.pipeline).save_lora_weights(
            directory,
            transformer_lora_layers=state_dict,
            transformer_lora_adapter_metadata=metadata,
            safe_serialization=True,
        )
