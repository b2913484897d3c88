"""personalize: personalize text-to-image diffusion models from a few photos, evaluate and sweep them."""

__version__ = "0.1.0"
