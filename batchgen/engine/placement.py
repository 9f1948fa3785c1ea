"""Where a loaded model's components sit while it renders, under its memory plan (batchgen/plan/memory.py chooses).

- `none`: every component on the device, as loaded.
- `encoders`: the text encoders and the rest take turns. batchgen knows every job before it renders the first, so
  the encoders come onto the device once, encode every text the worker's jobs of this model need (per text-encoder
  LoRA state), and leave before the denoiser and VAE come back: the peak is the larger of the two halves, not their
  sum. A job whose texts were not encoded yet (a unit that arrived later) brings the encoders back for what is
  still missing, all of it at once.
- `model`: as `encoders`, and the denoiser also leaves the device while the VAE decodes.
- `sequential`: diffusers' group offloading at leaf level: each layer's weights come onto the device for its own
  forward only. The weights stay real CPU tensors (not accelerate's meta stand-ins), so LoRAs patch them in place.

LoRAs patch a component only while it is where its LoRA factors are: under `encoders` and `model` the factors live
on the device, so the text encoders are patched in the encode phase and the denoiser in the denoise phase (a state
passed to the patcher keeps the other half as it is, `LoraStacks.use_part`); under `sequential` the factors stay on
the CPU with the weights. Every plan computes the same operations on the same device, so it gives the pixels that
`none` gives (tests/test_placement.py).
"""

from __future__ import annotations

import torch

from batchgen.assets.bases import Base

PLANS = ("none", "encoders", "model", "sequential")


class Placement:
    """One loaded pipeline's components and the phase they are in: "encode", "denoise" or "decode"."""

    def __init__(self, pipe, base: Base, device: str, offload: str) -> None:
        if offload not in PLANS:
            raise ValueError(f"unknown offload plan {offload!r}")
        self.pipe = pipe
        self.device = torch.device(device)
        self.offload = offload
        self.encoders = tuple(c for c in base.text_encoders if getattr(pipe, c, None) is not None)
        self.denoiser = base.denoiser
        self.phase = ""
        self.switches = 0  # phase changes that moved weights (the tests count them)

    @property
    def swaps(self) -> bool:
        """Whether encoders and denoiser take turns on the device (the plans that encode ahead)."""
        return self.offload in ("encoders", "model")

    @property
    def lora_device(self) -> torch.device:
        """Where LoRA factors live: beside the weights they patch when those are patched."""
        return torch.device("cpu") if self.offload == "sequential" else self.device

    def settle(self) -> None:
        """After loading on the CPU (or on the device for `none`): put the components where the plan starts."""
        if self.offload == "none":
            self.pipe.to(self.device)
        elif self.offload == "sequential":
            from diffusers.hooks import apply_group_offloading

            for name in (*self.encoders, self.denoiser, "vae"):
                apply_group_offloading(
                    getattr(self.pipe, name),
                    onload_device=self.device,
                    offload_device=torch.device("cpu"),
                    offload_type="leaf_level",
                )
        else:
            self.to_phase("encode")
            if self.offload == "model":
                decode = self.pipe.vae.decode

                def on_device(*args, **kwargs):
                    self.to_phase("decode")  # the denoiser leaves before the VAE's activations arrive
                    return decode(*args, **kwargs)

                self.pipe.vae.decode = on_device

    def to_phase(self, phase: str) -> None:
        """Move weights so that `phase` can run; a no-op for `none` and `sequential`, and when already there."""
        if not self.swaps or phase == self.phase:
            return
        on = {
            "encode": self.encoders,
            "denoise": (self.denoiser, "vae") if self.offload == "encoders" else (self.denoiser,),
            "decode": ("vae",) if self.offload == "model" else (self.denoiser, "vae"),
        }[phase]
        # Off first, so the device never holds both halves.
        for name in (*self.encoders, self.denoiser, "vae"):
            if name not in on:
                getattr(self.pipe, name).to("cpu")
        for name in on:
            getattr(self.pipe, name).to(self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.phase = phase
        self.switches += 1

    @property
    def encode_device(self) -> torch.device:
        """Where texts are encoded: the device, whatever the encoders' weights say between forwards."""
        return self.device
