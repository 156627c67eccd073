"""Every MoE architecture of transformers 5.x (tests/hf_zoo.py) in both experts implementations and both
dtypes: experts and router fused and shared experts matched where we can prove them, otherwise left alone
with the reason logged —
logits equal eager either way. The same grid with the errors: tools/support_matrix.py -> docs/support_matrix.md."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from hf_zoo import NOT_FUSED, TINY, assert_fused_as_expected, zoo_model
from reference import rel_err


# Logits vs eager. bf16: Inductor's own rounding around the op, up to 2e-2 on these tiny models (the same
# error with fusion disabled: docs/support_matrix.md); a wrong block is off by O(1).
LOGIT_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("arch", sorted(TINY))
def test_architecture(arch, form, dtype, caplog):
    model = zoo_model(arch, form, dtype)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="moe_compiler"), torch.no_grad():
        ref = model(input_ids=ids).logits
        out = torch.compile(model, backend="fused_moe")(input_ids=ids).logits
    assert_fused_as_expected(arch, model, counters)
    # Where the backend leaves a block alone, the log says why.
    if arch in NOT_FUSED:
        assert NOT_FUSED[arch] in caplog.text
    assert rel_err(out, ref) <= LOGIT_TOL[dtype]
