"""The stock Stable Diffusion pipelines' conveniences, for the families whose components have them: FreeU, fused
QKV projections, VAE slicing and tiling, the attention backend. Each delegates to the component's own method and
refuses clearly where the component lacks it."""

from __future__ import annotations


class DiffusionCLIPConveniencesMixin:
    """`enable_freeu` / `disable_freeu`, `fuse_qkv_projections` / `unfuse_qkv_projections`, `enable_vae_slicing` /
    `disable_vae_slicing`, `enable_vae_tiling` / `disable_vae_tiling` and `set_attention_backend`, as the stock
    pipelines have them. FreeU and the attention backend change the UNet for the inversion too, so invert and edit
    with the same setting. Also the running call's state that diffusers' step callbacks read: `guidance_scale`,
    `num_timesteps`, `interrupt`."""

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale of the running call (a step callback may change it)."""
        return getattr(self, "_guidance_scale", 1.0)

    @property
    def num_timesteps(self) -> int:
        """The number of generation steps of the running (or last) call."""
        return getattr(self, "_num_timesteps", 0)

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a step callback to skip the remaining generation steps."""
        return getattr(self, "_interrupt", False)

    def _component_method(self, component: str, method: str):
        module = getattr(self, component, None)
        if module is None or not hasattr(module, method):
            raise ValueError(
                f"`{method}` needs a `{component}` that has it; this pipeline's is "
                f"{type(module).__name__ if module is not None else 'absent'} (family {self.family.name!r})."
            )
        return getattr(module, method)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al., arXiv 2309.11497) on a `UNet2DConditionModel`, as the stock pipelines' `enable_freeu`."""
        self._component_method(self.family.denoiser_name, "enable_freeu")(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        self._component_method(self.family.denoiser_name, "disable_freeu")()

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Fuses the attention's query, key and value projections (diffusers' experimental speed-up). Refused while
        adapters are loaded: the fused layer replaces the ``to_q`` / ``to_k`` / ``to_v`` modules they wrap."""
        if self.lora_adapters:
            raise ValueError(
                f"`fuse_qkv_projections` replaces the modules that the adapters {self.lora_adapters} wrap: unload "
                "them first."
            )
        if unet:
            self._component_method(self.family.denoiser_name, "fuse_qkv_projections")()
        if vae and self.vae is not None:
            self._component_method("vae", "fuse_qkv_projections")()

    def unfuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        if unet:
            self._component_method(self.family.denoiser_name, "unfuse_qkv_projections")()
        if vae and self.vae is not None:
            self._component_method("vae", "unfuse_qkv_projections")()

    def enable_vae_slicing(self) -> None:
        """Decodes a batch one image at a time (less memory, same result)."""
        self._component_method("vae", "enable_slicing")()

    def disable_vae_slicing(self) -> None:
        self._component_method("vae", "disable_slicing")()

    def enable_vae_tiling(self) -> None:
        """Encodes and decodes in overlapping tiles (large images in less memory; results differ slightly)."""
        self._component_method("vae", "enable_tiling")()

    def disable_vae_tiling(self) -> None:
        self._component_method("vae", "disable_tiling")()

    def set_attention_backend(self, backend: str) -> None:
        """diffusers' attention backend for the UNet (e.g. ``"native"``, ``"flash"``), see
        `ModelMixin.set_attention_backend`."""
        self._component_method(self.family.denoiser_name, "set_attention_backend")(backend)
