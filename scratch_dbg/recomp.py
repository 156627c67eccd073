import torch, logging
import moe_compiler  # noqa
torch._logging.set_logs(recompiles=True, recompiles_verbose=True)
E, k, H, I = 8, 2, 256, 128
g = torch.Generator("cuda").manual_seed(3)
w1 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * H**-0.5).bfloat16().requires_grad_(True)
w2 = (torch.randn(E, H, I, device="cuda", generator=g) * I**-0.5).bfloat16().requires_grad_(True)
def f(hidden, logits, w1, w2):
    weights, ids = torch.ops.moe_compiler.route(logits, top_k=k, norm_topk_prob=True)
    return torch.ops.moe_compiler.experts_train(hidden, ids, weights.to(hidden.dtype), w1, w2)[0]
compiled = torch.compile(f, dynamic=None)
for T in (300, 260, 290):
    hidden = torch.randn(T, H, device="cuda", generator=g).bfloat16().requires_grad_(True)
    logits = torch.randn(T, E, device="cuda", generator=g).bfloat16().requires_grad_(True)
    torch._dynamo.mark_dynamic(hidden, 0); torch._dynamo.mark_dynamic(logits, 0)
    out = compiled(hidden, logits, w1, w2)
    torch.autograd.grad(out, (hidden, logits, w1, w2), torch.randn_like(out))
    print("T", T, "frames", torch._dynamo.utils.counters["stats"]["unique_graphs"], flush=True)
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
for e in _debug_get_cache_entry_list(f.__code__):
    print("GUARDS", str(e.guard_manager)[:6000])
