// torch.library registration of the CUTLASS kernels: `moe_compiler_cutlass::grouped_mm`, a CUDA kernel the
// experts op's lowering calls (lowering/cutlass.py), not a user-facing op. Every check that would otherwise
// be a CUTLASS failure or a wrong answer is made here, with what was expected.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "check.h"
#include "configs.h"

namespace moe_cutlass {
MOE_CUTLASS_CONFIGS(MOE_CUTLASS_DECLARE)
MOE_CUTLASS_FP8_CONFIGS(MOE_CUTLASS_FP8_DECLARE)
MOE_CUTLASS_WGRAD_CONFIGS(MOE_CUTLASS_WGRAD_DECLARE)

using GroupedMM = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, bool);
#define MOE_CUTLASS_ENTRY(name, Config) &grouped_mm_##name,
constexpr GroupedMM kConfigs[] = {MOE_CUTLASS_CONFIGS(MOE_CUTLASS_ENTRY)};
#undef MOE_CUTLASS_ENTRY
constexpr int64_t kNumConfigs = sizeof(kConfigs) / sizeof(kConfigs[0]);

using GroupedMMSiluMul = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  at::Tensor&);
#define MOE_CUTLASS_SILU_MUL_ENTRY(name, Config) &grouped_mm_silu_mul_##name,
constexpr GroupedMMSiluMul kSiluMulConfigs[] = {MOE_CUTLASS_CONFIGS(MOE_CUTLASS_SILU_MUL_ENTRY)};
#undef MOE_CUTLASS_SILU_MUL_ENTRY

using GroupedMMFp8 = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, at::Tensor&);
#define MOE_CUTLASS_FP8_ENTRY(name, Config) &grouped_mm_fp8_##name,
constexpr GroupedMMFp8 kFp8Configs[] = {MOE_CUTLASS_FP8_CONFIGS(MOE_CUTLASS_FP8_ENTRY)};
#undef MOE_CUTLASS_FP8_ENTRY
constexpr int64_t kNumFp8Configs = sizeof(kFp8Configs) / sizeof(kFp8Configs[0]);

using GroupedMMWgrad = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&);
#define MOE_CUTLASS_WGRAD_ENTRY(name, Config) &grouped_mm_wgrad_##name,
constexpr GroupedMMWgrad kWgradConfigs[] = {MOE_CUTLASS_WGRAD_CONFIGS(MOE_CUTLASS_WGRAD_ENTRY)};
#undef MOE_CUTLASS_WGRAD_ENTRY
constexpr int64_t kNumWgradConfigs = sizeof(kWgradConfigs) / sizeof(kWgradConfigs[0]);

namespace {
bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }
}  // namespace

// The checks of a bf16 / fp16 grouped GEMM's operands (errors named by `what`), then its output [S, N], allocated.
at::Tensor checked_out(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs, bool b_nk, int64_t config,
                       const std::string& what) {
  using std::string, std::to_string;
  MOE_CHECK(x.is_cuda() && w.is_cuda() && offs.is_cuda(), string(what + ": expected CUDA tensors"));
  MOE_CHECK(x.dim() == 2 && w.dim() == 3 && offs.dim() == 1,
            what + ": expected x [S, K], w [E, ., .], offs [E], got " + dims(x.sizes()) + ", " + dims(w.sizes()) +
                ", " + dims(offs.sizes()));
  MOE_CHECK(x.scalar_type() == w.scalar_type() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf),
            string(what + ": expected bf16 or fp16 x and w of one dtype, got ") + c10::toString(x.scalar_type()) +
                " and " + c10::toString(w.scalar_type()));
  MOE_CHECK(offs.scalar_type() == at::kInt && offs.size(0) == w.size(0),
            what + ": expected int32 offs of E = " + to_string(w.size(0)) + " entries, got " +
                c10::toString(offs.scalar_type()) + " " + dims(offs.sizes()));
  MOE_CHECK(0 <= config && config < kNumConfigs,
            what + ": config " + to_string(config) + " not in [0, " + to_string(kNumConfigs - 1) + "]");
  const int64_t K = x.size(1);
  const int64_t N = b_nk ? w.size(1) : w.size(2);
  MOE_CHECK((b_nk ? w.size(2) : w.size(1)) == K, what + ": w " + dims(w.sizes()) + " does not reduce over K = " +
                                                      to_string(K) + (b_nk ? " (expected [E, N, K])" : " (expected [E, K, N])"));
  // Packed rows (the strides CUTLASS is given are derived from N and K) and 16-byte rows for TMA.
  MOE_CHECK(x.stride(1) == 1 && x.stride(0) == K, what + ": x must be contiguous, got strides " + dims(x.strides()));
  MOE_CHECK(w.stride(2) == 1 && w.stride(1) == (b_nk ? K : N),
            what + ": each expert's weight must be a packed row-major matrix, got strides " + dims(w.strides()));
  MOE_CHECK(K % 8 == 0 && N % 8 == 0 && w.stride(0) % 8 == 0 && aligned16(x) && aligned16(w),
            what + ": rows must be 16-byte aligned (K and N multiples of 8 elements), got K = " + to_string(K) +
                ", N = " + to_string(N));
  MOE_CHECK(K <= INT32_MAX && N <= INT32_MAX && x.size(0) <= INT32_MAX, string(what + ": sizes past 2^31"));
  return at::empty({x.size(0), N}, x.options());
}

// out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ (b_nk ? w[e]^T : w[e]); rows past offs[E-1] unwritten.
at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs, bool b_nk, int64_t config) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = checked_out(x, w, offs, b_nk, config, "grouped_mm");
  if (out.numel() == 0 || w.size(0) == 0) return out;
  if (x.size(1) == 0) return out.zero_();
  kConfigs[config](x, w, offs.contiguous(), out, b_nk);
  return out;
}

// out[offs[e-1]:offs[e]] = silu(gate[offs[e-1]:offs[e]]) * (x[offs[e-1]:offs[e]] @ w[e]^T): the up GEMM of a SwiGLU
// gate_up projection with the activation in its epilogue, gate the gate GEMM's output (grouped_gemm.cuh). w is
// [E, N, K] with K contiguous (w_gate_up[:, I:], a view); rows past offs[E-1] unwritten.
at::Tensor grouped_mm_silu_mul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& gate, const at::Tensor& offs,
                               int64_t config) {
  using std::string, std::to_string;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = checked_out(x, w, offs, true, config, "grouped_mm_silu_mul");
  MOE_CHECK(x.scalar_type() == at::kBFloat16, string("grouped_mm_silu_mul: expected bf16 x and w (the fused "
                                                     "activation is built for bf16 only), got ") +
                                                  c10::toString(x.scalar_type()));
  MOE_CHECK(gate.is_cuda() && gate.dim() == 2 && gate.size(0) == x.size(0) && gate.size(1) == w.size(1),
            "grouped_mm_silu_mul: expected a CUDA gate [S, N] = [" + to_string(x.size(0)) + ", " +
                to_string(w.size(1)) + "] (x's rows, w's N), got " + dims(gate.sizes()));
  MOE_CHECK(gate.scalar_type() == x.scalar_type() && gate.stride(1) == 1 && gate.stride(0) == gate.size(1) &&
                aligned16(gate),
            string("grouped_mm_silu_mul: gate must be a contiguous, 16-byte aligned tensor of x's dtype, got ") +
                c10::toString(gate.scalar_type()) + " with strides " + dims(gate.strides()));
  if (out.numel() == 0 || w.size(0) == 0) return out;
  if (x.size(1) == 0) return out.zero_();  // silu(gate) * 0
  kSiluMulConfigs[config](x, w, gate, offs.contiguous(), out);
  return out;
}

// out[offs[e-1]:offs[e]] = rows of x times w[e]^T, each 128-deep K block's product scaled by xs[r, j] * ws[e, n / 128,
// j] (grouped_gemm_fp8.cuh's contract); bf16 out, rows past offs[E-1] unwritten.
at::Tensor grouped_mm_fp8(const at::Tensor& x, const at::Tensor& xs, const at::Tensor& w, const at::Tensor& ws,
                          const at::Tensor& offs, int64_t config) {
  using std::string, std::to_string;
  MOE_CHECK(x.is_cuda() && xs.is_cuda() && w.is_cuda() && ws.is_cuda() && offs.is_cuda(),
            string("grouped_mm_fp8: expected CUDA tensors"));
  MOE_CHECK(x.dim() == 2 && xs.dim() == 2 && w.dim() == 3 && ws.dim() == 3 && offs.dim() == 1,
            "grouped_mm_fp8: expected x [S, K], xs [S, ceil(K/128)], w [E, N, K], ws [E, ceil(N/128), ceil(K/128)], "
            "offs [E], got " + dims(x.sizes()) + ", " + dims(xs.sizes()) + ", " + dims(w.sizes()) + ", " +
                dims(ws.sizes()) + ", " + dims(offs.sizes()));
  MOE_CHECK(x.scalar_type() == at::kFloat8_e4m3fn && w.scalar_type() == at::kFloat8_e4m3fn,
            string("grouped_mm_fp8: expected float8_e4m3fn x and w, got ") + c10::toString(x.scalar_type()) +
                " and " + c10::toString(w.scalar_type()));
  MOE_CHECK(xs.scalar_type() == at::kFloat && ws.scalar_type() == at::kFloat,
            string("grouped_mm_fp8: expected fp32 scales, got ") + c10::toString(xs.scalar_type()) + " and " +
                c10::toString(ws.scalar_type()) + " (convert bf16 / e8m0 scales to fp32 first)");
  MOE_CHECK(offs.scalar_type() == at::kInt && offs.size(0) == w.size(0),
            "grouped_mm_fp8: expected int32 offs of E = " + to_string(w.size(0)) + " entries, got " +
                c10::toString(offs.scalar_type()) + " " + dims(offs.sizes()));
  MOE_CHECK(0 <= config && config < kNumFp8Configs,
            "grouped_mm_fp8: config " + to_string(config) + " not in [0, " + to_string(kNumFp8Configs - 1) + "]");
  const int64_t S = x.size(0), K = x.size(1), E = w.size(0), N = w.size(1);
  const int64_t Kb = (K + 127) / 128, Nb = (N + 127) / 128;
  MOE_CHECK(w.size(2) == K, "grouped_mm_fp8: w " + dims(w.sizes()) + " does not reduce over K = " + to_string(K) +
                                " (expected [E, N, K])");
  MOE_CHECK(xs.size(0) == S && xs.size(1) == Kb && ws.size(0) == E && ws.size(1) == Nb && ws.size(2) == Kb,
            "grouped_mm_fp8: expected 128 x 128 weight blocks and 1 x 128 activation groups: xs [" + to_string(S) +
                ", " + to_string(Kb) + "], ws [" + to_string(E) + ", " + to_string(Nb) + ", " + to_string(Kb) +
                "], got " + dims(xs.sizes()) + ", " + dims(ws.sizes()));
  // The strides CUTLASS is given are derived from N and K: packed rows, and K-major packed scale rows.
  MOE_CHECK(x.stride(1) == 1 && x.stride(0) == K && xs.stride(1) == 1 && xs.stride(0) == Kb,
            "grouped_mm_fp8: x and xs must be contiguous, got strides " + dims(x.strides()) + ", " +
                dims(xs.strides()));
  MOE_CHECK(w.stride(2) == 1 && w.stride(1) == K && ws.stride(2) == 1 && ws.stride(1) == Kb,
            "grouped_mm_fp8: each expert's weight and scales must be packed row-major matrices, got strides " +
                dims(w.strides()) + ", " + dims(ws.strides()));
  MOE_CHECK(K % 16 == 0 && N % 8 == 0 && w.stride(0) % 16 == 0 && aligned16(x) && aligned16(w),
            "grouped_mm_fp8: rows must be 16-byte aligned (K a multiple of 16, N of 8), got K = " + to_string(K) +
                ", N = " + to_string(N));
  MOE_CHECK(K <= INT32_MAX && N <= INT32_MAX && S <= INT32_MAX, string("grouped_mm_fp8: sizes past 2^31"));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({S, N}, x.options().dtype(at::kBFloat16));
  if (S == 0 || E == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  auto offs_c = offs.contiguous();
  kFp8Configs[config](x, xs, w, ws, offs_c, out);
  return out;
}
// out[e] = a[offs[e-1]:offs[e]]^T @ b[offs[e-1]:offs[e]] (grouped_gemm.cuh's WgradRunner): [E, M, N], bf16; an expert
// without rows gets zeros; rows past offs[E-1] are never read.
at::Tensor grouped_mm_wgrad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs, int64_t config) {
  using std::string, std::to_string;
  MOE_CHECK(a.is_cuda() && b.is_cuda() && offs.is_cuda(), string("grouped_mm_wgrad: expected CUDA tensors"));
  MOE_CHECK(a.dim() == 2 && b.dim() == 2 && offs.dim() == 1 && a.size(0) == b.size(0),
            "grouped_mm_wgrad: expected a [S, M], b [S, N] (the same rows) and offs [E], got " + dims(a.sizes()) +
                ", " + dims(b.sizes()) + ", " + dims(offs.sizes()));
  MOE_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16,
            string("grouped_mm_wgrad: expected bf16 a and b (built for bf16 only; torch._grouped_mm takes the "
                   "others), got ") + c10::toString(a.scalar_type()) + " and " + c10::toString(b.scalar_type()));
  MOE_CHECK(offs.scalar_type() == at::kInt, string("grouped_mm_wgrad: expected int32 offs, got ") +
                                                c10::toString(offs.scalar_type()));
  MOE_CHECK(0 <= config && config < kNumWgradConfigs, "grouped_mm_wgrad: config " + to_string(config) +
                                                          " not in [0, " + to_string(kNumWgradConfigs - 1) + "]");
  const int64_t S = a.size(0), M = a.size(1), N = b.size(1), E = offs.size(0);
  // Packed rows (the leading dimensions CUTLASS is given are M and N) and 16-byte rows for TMA.
  MOE_CHECK(a.stride(1) == 1 && a.stride(0) == M && b.stride(1) == 1 && b.stride(0) == N,
            "grouped_mm_wgrad: a and b must be contiguous, got strides " + dims(a.strides()) + ", " +
                dims(b.strides()));
  MOE_CHECK(M % 8 == 0 && N % 8 == 0 && aligned16(a) && aligned16(b),
            "grouped_mm_wgrad: rows must be 16-byte aligned (M and N multiples of 8 elements), got M = " +
                to_string(M) + ", N = " + to_string(N));
  MOE_CHECK(M <= INT32_MAX && N <= INT32_MAX && S <= INT32_MAX, string("grouped_mm_wgrad: sizes past 2^31"));
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({E, M, N}, a.options());
  if (out.numel() == 0) return out;
  if (S == 0) return out.zero_();  // no rows: every expert's gradient is 0
  kWgradConfigs[config](a, b, offs.contiguous(), out);
  return out;
}
}  // namespace moe_cutlass

TORCH_LIBRARY(moe_compiler_cutlass, m) {
  m.def("grouped_mm(Tensor x, Tensor w, Tensor offs, bool b_nk, int config) -> Tensor");
  m.def("grouped_mm_silu_mul(Tensor x, Tensor w, Tensor gate, Tensor offs, int config) -> Tensor");
  m.def("grouped_mm_fp8(Tensor x, Tensor xs, Tensor w, Tensor ws, Tensor offs, int config) -> Tensor");
  m.def("grouped_mm_wgrad(Tensor a, Tensor b, Tensor offs, int config) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_compiler_cutlass, CUDA, m) {
  m.impl("grouped_mm", &moe_cutlass::grouped_mm);
  m.impl("grouped_mm_silu_mul", &moe_cutlass::grouped_mm_silu_mul);
  m.impl("grouped_mm_fp8", &moe_cutlass::grouped_mm_fp8);
  m.impl("grouped_mm_wgrad", &moe_cutlass::grouped_mm_wgrad);
}
