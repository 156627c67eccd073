import os

import torch

# The tuner's kernel launches run under the Triton interpreter on a machine without CUDA (tiny fp32 shapes). It
# must be set before any kernel is decorated, i.e. before moe_compiler.tune.search is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
