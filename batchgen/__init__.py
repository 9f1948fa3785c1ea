"""batchgen: declarative batch renderer for Stable Diffusion TIs and LoRAs."""

__version__ = "0.1.0"
