"""`DiffusionCLIPTranslationMixin.translate`: unseen-domain translation and stroke-to-image (DiffusionCLIP, arXiv
2110.02711, Sec. 3.3), on the pipeline's family seam (`noise_to`, the generation scheduler, the original model)."""

from __future__ import annotations

import torch

from .image_processing import PreparedImages, postprocess_image
from .loaders import lora_state
from .pipeline_output import DiffusionCLIPTranslationOutput
from .utils.checks import check_positive_int
from .utils.locking import holds_unet_lock


class DiffusionCLIPTranslationMixin:
    """`translate`: pull an out-of-domain image onto the model's domain, then edit it with the active adapters."""

    # ---- unseen-domain translation ---------------------------------------------------------------------------

    @holds_unet_lock
    @torch.no_grad()
    def translate(
        self,
        image,
        t0: int = 500,
        n_iter: int = 10,
        num_denoise_steps: int = 6,
        edit_t0: int | None = None,
        num_inversion_steps: int = 40,
        num_inference_steps: int = 40,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_fixed_point_iterations: int = 0,
    ) -> DiffusionCLIPTranslationOutput | tuple:
        r"""
        Unseen-domain translation and stroke-to-image (DiffusionCLIP, arXiv 2110.02711, Sec. 3.3): ``n_iter`` rounds
        of stochastic forward noising to ``t0`` (``x_t0 = sqrt(a_t0) x0 + sqrt(1 - a_t0) z``) and a few deterministic
        DDIM steps back with the *original* model pull an out-of-domain image (a stroke drawing, a wrong background)
        onto the model's domain; then, if an adapter is active, deterministic inversion and the edit (`edit`).

        The official code noises with ``a_{t0-1}`` and then starts generation at ``t0``; here both use ``a_t0``.

        Args:
            image: The out-of-domain image(s), any form `invert` accepts.
            t0 (`int`, *optional*, defaults to 500): Noise level of each round.
            n_iter (`int`, *optional*, defaults to 10): Noising/denoising rounds (the official README: more than 8).
            num_denoise_steps (`int`, *optional*, defaults to 6): DDIM steps of each round back to 0.
            edit_t0 (`int`, *optional*): ``t0`` of the final edit (defaults to ``t0``).
            num_inversion_steps / num_inference_steps (`int`, *optional*, defaults to 40): Of the final edit.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): For the noise of every round.
            output_type (`str`, *optional*, defaults to `"pil"`): ``"pil"``, ``"np"`` or ``"pt"``.
            return_dict (`bool`, *optional*, defaults to `True`): Return a dataclass instead of a tuple.
            num_fixed_point_iterations (`int`, *optional*, defaults to 0): Of the final edit's inversion (`invert`).

        Returns:
            [`DiffusionCLIPTranslationOutput`] or `tuple`: ``(images, domain_images)``.
        """
        # 1. Check inputs
        edit_t0 = t0 if edit_t0 is None else edit_t0
        self.check_inputs(image, t0, num_inversion_steps, num_inference_steps, 0.0, generator, None, output_type)
        if output_type == "latent":
            raise ValueError("`output_type`='latent' is for the edit's call; `translate` returns images.")
        self.check_inputs(
            image, edit_t0, num_inversion_steps, num_inference_steps,
            num_fixed_point_iterations=num_fixed_point_iterations,
        )  # fmt: skip
        check_positive_int(n_iter, "n_iter")
        check_positive_int(num_denoise_steps, "num_denoise_steps")
        # 2. Preprocess image, into the UNet's space
        x0 = self.encode_image(self.prepare_image(image))
        condition = self.encode_prompt(None, x0.shape[0])
        scheduler = self.family.generation_scheduler(self.family.timesteps(t0, num_denoise_steps))
        # 3. Rounds of q-sampling to t0 and deterministic DDIM back with the original model
        for _ in self.progress_bar(range(n_iter), desc="translation"):
            x = self.noise_to(x0, t0, generator)
            for t in scheduler.timesteps:
                x = scheduler.step(self._predict_noise(x, t, adapted=False, condition=condition), t, x).prev_sample
            x0 = x
        domain = self.decode_latents(x0).clamp(-1, 1)  # a generated image, edited in the valid range
        # 4. Edit with the active adapters, if any
        if lora_state.adapters_enabled(self.denoiser):
            images = self.edit(
                PreparedImages(domain), t0=edit_t0, num_inversion_steps=num_inversion_steps,
                num_inference_steps=num_inference_steps, output_type=output_type,
                num_fixed_point_iterations=num_fixed_point_iterations,
            ).images  # fmt: skip
        else:
            images = postprocess_image(domain, output_type)
        domain_images = postprocess_image(domain, output_type)
        if not return_dict:
            return (images, domain_images)
        return DiffusionCLIPTranslationOutput(images=images, domain_images=domain_images)
