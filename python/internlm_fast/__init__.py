"""internlm_fast: InternLM, fast. Compiled kernels, a lean trainer and inference."""

import torch  # noqa: F401  (loads libtorch, which internlm_fast._C links against)

__version__ = "0.1.0"
