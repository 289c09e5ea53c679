"""Z-Image (Z-Image-Turbo and the nano model) as a FewStepModel over the real `ZImagePipeline`.

Z-Image's own conventions, hidden here: the transformer takes timestep 1 - sigma and predicts x0 - noise (the
pipeline negates it); latents are lists of (C, 1, H, W); captions are variable-length lists of (L_i, D).
The teacher sees [target image, prompt] through a Qwen3-VL encoder that carries the text encoder's own Qwen3
weights, so its caption features live in the same space as the student's and simply carry image tokens too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift
from PIL import Image
from transformers import AutoImageProcessor, Qwen3VLForConditionalGeneration

from dopsd.models.base import Context, FewStepModel
from dopsd.models.tiny import TEACHER_ENCODER_FOLDER, TEACHER_PROCESSOR_FOLDER, transplant_text_weights

DEFAULT_TEACHER_ENCODER = "Qwen/Qwen3-VL-4B-Instruct"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class ZImageModel(FewStepModel):
    family = "zimage"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")

    def __init__(
        self,
        pipeline: ZImagePipeline,
        teacher_encoder: Qwen3VLForConditionalGeneration | None,
        teacher_processor=None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_caption_tokens: int = 512,
        max_teacher_tokens: int = 1024,
    ):
        self.teacher_encoder = teacher_encoder
        self.teacher_processor = teacher_processor
        self.max_caption_tokens = max_caption_tokens
        self.max_teacher_tokens = max_teacher_tokens
        super().__init__(pipeline, device, dtype)
        if teacher_encoder is not None:
            teacher_encoder.to(self.device)

    def encoder_modules(self) -> list[torch.nn.Module]:
        extra = [self.teacher_encoder] if self.teacher_encoder is not None else []
        return [*super().encoder_modules(), *extra]

    @classmethod
    def load(
        cls,
        path_or_id: str,
        teacher_encoder: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        with_teacher_encoder: bool = True,
        max_caption_tokens: int = 512,
    ) -> ZImageModel:
        """Load the pipeline and its Qwen3-VL teacher encoder (a `teacher_encoder/` folder beside the pipeline,
        else `teacher_encoder`, else Qwen3-VL-4B), transplanting the text encoder's weights into it."""
        pipeline = ZImagePipeline.from_pretrained(path_or_id, dtype=dtype)
        if not with_teacher_encoder:
            return cls(pipeline, None, None, device=device, dtype=dtype, max_caption_tokens=max_caption_tokens)
        local = Path(path_or_id) / TEACHER_ENCODER_FOLDER
        source = teacher_encoder or (str(local) if local.is_dir() else DEFAULT_TEACHER_ENCODER)
        processor_local = Path(path_or_id) / TEACHER_PROCESSOR_FOLDER
        processor_source = str(processor_local) if processor_local.is_dir() and not teacher_encoder else source
        vl = Qwen3VLForConditionalGeneration.from_pretrained(source, dtype=dtype)
        transplant_text_weights(pipeline.text_encoder, vl)
        processor = AutoImageProcessor.from_pretrained(processor_source)
        return cls(pipeline, vl, processor, device=device, dtype=dtype, max_caption_tokens=max_caption_tokens)

    def encode_student(self, prompts: Sequence[str], differentiable: bool = False) -> list[Context]:
        with torch.set_grad_enabled(differentiable):
            # _encode_prompt rewrites the list it is given: pass a copy.
            feats = self.pipeline._encode_prompt(
                list(prompts), device=self.device, max_sequence_length=self.max_caption_tokens
            )
        return [{"cap_feats": f.to(self.dtype)} for f in feats]

    def encode_teacher(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> list[Context]:
        with torch.no_grad():
            features = self.teacher_features(self.teacher_inputs(prompts, images))
        return [{"cap_feats": f.to(self.dtype)} for f in features]

    def teacher_inputs(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Tokens and pixels of the chat turns [image, prompt], padded into one batch.

        The turn is built from a string so any Qwen3 chat template serves; the image placeholder is expanded to
        one pad token per merged vision patch, as the Qwen3-VL processor does. Images larger than the token
        budget (max_teacher_tokens minus the text) are downscaled by the processor.
        """
        if self.teacher_encoder is None or self.teacher_processor is None:
            raise ValueError("this Z-Image model was loaded without a teacher encoder (Qwen3-VL); D-OPSD needs one")
        tokenizer, vision_config = self.pipeline.tokenizer, self.teacher_encoder.config.vision_config
        pixels_per_token = (vision_config.patch_size * vision_config.spatial_merge_size) ** 2
        texts, pixel_values, grids = [], [], []
        for prompt, image in zip(prompts, images, strict=True):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": IMAGE_PLACEHOLDER + prompt}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
            budget = self.max_teacher_tokens - len(tokenizer(text).input_ids) + 1
            if budget < 4:
                raise ValueError(f"prompt too long for the teacher's {self.max_teacher_tokens} tokens: {prompt[:60]!r}")
            vision = self.teacher_processor(
                images=[image.convert("RGB")], max_pixels=budget * pixels_per_token, return_tensors="pt"
            )
            n_image_tokens = int(vision["image_grid_thw"].prod()) // vision_config.spatial_merge_size**2
            texts.append(text.replace("<|image_pad|>", "<|image_pad|>" * n_image_tokens, 1))
            pixel_values.append(vision["pixel_values"])
            grids.append(vision["image_grid_thw"])
        tokens = tokenizer(texts, return_tensors="pt", padding=True)
        ids = tokens.input_ids
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": tokens.attention_mask.to(self.device),
            "pixel_values": torch.cat(pixel_values).to(self.device, self.teacher_encoder.dtype),
            "image_grid_thw": torch.cat(grids).to(self.device),
            "mm_token_type_ids": (ids == self.teacher_encoder.config.image_token_id).int().to(self.device),
        }

    def vision_tokens(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Qwen3-VL's merged vision tokens (what replaces the image placeholder at the language model's input), one
        image at a time so a large set does not meet the vision tower at once."""
        tokens = []
        for image in images:
            inputs = self.teacher_inputs([""], [image])
            assert self.teacher_encoder is not None  # teacher_inputs refuses a model without one
            with torch.no_grad():
                found = self.teacher_encoder.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            tokens.append(found.pooler_output[0].float())
        return tokens

    def teacher_features(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Qwen3-VL hidden_states[-2] per sample, padding removed, image tokens kept (differentiable)."""
        assert self.teacher_encoder is not None
        hidden = self.teacher_encoder(**inputs, output_hidden_states=True).hidden_states[-2]
        mask = inputs["attention_mask"].bool()
        return [h[m] for h, m in zip(hidden, mask, strict=True)]

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, contexts: Sequence[Context]) -> torch.Tensor:
        x = list(latents.to(self.dtype).unsqueeze(2).unbind(0))
        timestep = (1.0 - sigma).to(self.device, torch.float32)  # as the pipeline passes it: bf16 would round t
        caps = [c["cap_feats"] for c in contexts]
        out = self.transformer(x, timestep, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2).float()

    def schedule(self, steps: int, height: int, width: int) -> torch.Tensor:
        # Same call the pipeline makes; the shift is the scheduler's (3 for Z-Image-Turbo: 1, .9, .75, .5, 0).
        scheduler = self.pipeline.scheduler
        sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist()
        seq = (height // self.resolution_multiple) * (width // self.resolution_multiple)
        mu = calculate_shift(
            seq,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=sigmas, mu=mu, device="cpu")
        return scheduler.sigmas.float().clone()

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.pipeline.vae_scale_factor
        return (int(self.pipeline.transformer.config.in_channels), height // f, width // f)

    def to_latents(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        vae = self.pipeline.vae
        pixels = self.pipeline.image_processor.preprocess(
            [im.convert("RGB") for im in images], height=height, width=width, resize_mode="crop"
        )
        with torch.no_grad():
            z = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()

    def to_images(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipeline.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            pixels = vae.decode(z, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(pixels, output_type="pil")

    def pipeline_kwargs(self) -> dict:
        return {"guidance_scale": 0.0, "max_sequence_length": self.max_caption_tokens}
