"""LesionGen: concept-guided diffusion for dermatology image synthesis."""

__version__ = "0.1.0"
