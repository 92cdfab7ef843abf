"""internlm_fast: InternLM, fast. Compiled kernels, a lean trainer and inference.

torch is not imported here: every module that loads the native module (internlm_fast._C, linked
against libtorch) imports torch first, and an entry point may set the environment that torch's
OpenMP runtime reads when it loads (python -m internlm_fast.serve does)."""

__version__ = "0.1.0"
