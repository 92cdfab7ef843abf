"""internlm_fast: InternLM, fast. Compiled kernels, a lean trainer, inference and serving."""

__version__ = "0.1.0"
