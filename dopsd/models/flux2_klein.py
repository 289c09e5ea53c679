"""FLUX.2-klein (4B / 9B, 4-step distilled) as a FewStepModel over the real `Flux2KleinPipeline`.

Klein's conventions, hidden here: the transformer takes t = sigma and predicts noise - x0 directly (no
negation); latents are 2x2-patchified, batch-norm-normalised VAE latents packed into tokens with 4-D position
ids; the text context is Qwen3 hidden states of three layers stacked (3H wide), padded to 512 tokens.
The teacher is klein's edit branch: the target's latents ride along as reference tokens (time coordinate 10),
and the prompt asks the output to stay consistent with the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from PIL import Image

from dopsd.models.base import Context, FewStepModel

REFERENCE_SUFFIX = " Keep the output consistent with the reference image."
DEFAULT_TEXT_LAYERS = (9, 18, 27)


class Flux2KleinModel(FewStepModel):
    family = "flux2-klein"
    default_lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "to_qkv_mlp_proj",
        "linear_in",
        "linear_out",
    )

    def __init__(
        self,
        pipeline: Flux2KleinPipeline,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_caption_tokens: int = 512,
        text_layers: Sequence[int] = DEFAULT_TEXT_LAYERS,
        reference_suffix: str = REFERENCE_SUFFIX,
    ):
        self.max_caption_tokens = max_caption_tokens
        self.text_layers = tuple(text_layers)
        self.reference_suffix = reference_suffix
        super().__init__(pipeline, device, dtype)
        n_hidden = pipeline.text_encoder.config.num_hidden_layers
        if max(self.text_layers) > n_hidden:
            raise ValueError(
                f"text_encoder_layers {self.text_layers} exceed the text encoder's {n_hidden} layers; pass e.g. "
                f"--text-encoder-layers {','.join(str(n_hidden * i // 3) for i in (1, 2, 3))}"
            )

    @classmethod
    def load(cls, path_or_id: str, device="cpu", dtype=torch.float32, **kwargs) -> Flux2KleinModel:
        return cls(Flux2KleinPipeline.from_pretrained(path_or_id, dtype=dtype), device=device, dtype=dtype, **kwargs)

    def _encode(self, prompts: Sequence[str], differentiable: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(differentiable):
            embeds, _ = self.pipeline.encode_prompt(
                list(prompts),
                device=self.device,
                max_sequence_length=self.max_caption_tokens,
                text_encoder_out_layers=self.text_layers,
            )
        return embeds.to(self.dtype)

    def encode_student(self, prompts: Sequence[str], differentiable: bool = False) -> list[Context]:
        return [{"prompt_embeds": e} for e in self._encode(prompts, differentiable)]

    def encode_teacher(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> list[Context]:
        embeds = self._encode([p + self.reference_suffix for p in prompts])
        contexts = []
        for e, image in zip(embeds, images, strict=True):
            # As the edit pipeline prepares a reference: at most 1024^2 pixels, sides multiples of 16.
            image = self.pipeline.image_processor._resize_if_exceeds_area(image.convert("RGB"), 1024 * 1024)
            w, h = image.size
            m = self.resolution_multiple
            reference = self.to_latents([image], max(m, h // m * m), max(m, w // m * m))[0]
            contexts.append({"prompt_embeds": e, "reference_latents": reference.to(self.dtype)})
        return contexts

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, contexts: Sequence[Context]) -> torch.Tensor:
        pipe = self.pipeline
        b, _, h, w = latents.shape
        tokens = pipe._pack_latents(latents.to(self.dtype))
        ids = pipe._prepare_latent_ids(latents).to(self.device)
        embeds = torch.stack([c["prompt_embeds"] for c in contexts])
        text_ids = pipe._prepare_text_ids(embeds).to(self.device)
        references = [c["reference_latents"] for c in contexts if "reference_latents" in c]
        if references:
            if len(references) != b:
                raise ValueError("a batch mixes contexts with and without a reference image")
            reference = torch.stack(references)
            tokens = torch.cat([tokens, pipe._pack_latents(reference)], dim=1)
            reference_ids = pipe._prepare_image_ids([reference[:1]]).to(self.device).expand(b, -1, -1)
            ids = torch.cat([ids, reference_ids], dim=1)
        out = self.transformer(
            hidden_states=tokens,
            timestep=sigma.to(self.device, self.dtype),
            guidance=None,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        out = out[:, : h * w].float()
        return out.permute(0, 2, 1).reshape(b, -1, h, w)

    def schedule(self, steps: int, height: int, width: int) -> torch.Tensor:
        scheduler = self.pipeline.scheduler
        seq = (height // self.resolution_multiple) * (width // self.resolution_multiple)
        mu = compute_empirical_mu(image_seq_len=seq, num_steps=steps)
        if scheduler.config.get("use_flow_sigmas"):
            scheduler.set_timesteps(steps, mu=mu, device="cpu")
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device="cpu")
        return scheduler.sigmas.float().clone()

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        m = self.resolution_multiple
        return (self.pipeline.transformer.config.in_channels, height // m, width // m)

    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def to_latents(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        pipe = self.pipeline
        pixels = pipe.image_processor.preprocess(
            [im.convert("RGB") for im in images], height=height, width=width, resize_mode="crop"
        )
        with torch.no_grad():
            z = pipe._encode_vae_image(pixels.to(self.device, pipe.vae.dtype), generator=None)
        return z.float()

    def to_images(self, latents: torch.Tensor) -> list[Image.Image]:
        pipe = self.pipeline
        mean, std = self._bn_stats(latents)
        z = pipe._unpatchify_latents(latents * std + mean)
        with torch.no_grad():
            pixels = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(pixels, output_type="pil")

    def pipeline_kwargs(self) -> dict:
        return {"max_sequence_length": self.max_caption_tokens, "text_encoder_out_layers": self.text_layers}
