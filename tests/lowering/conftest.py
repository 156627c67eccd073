import os

import torch

# Triton kernels run under the interpreter on a machine without CUDA (tiny fp32/fp16 shapes). It must be
# set before any kernel is decorated, i.e. before moe_compiler.lowering.triton_* is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
