// Grouped GEMM over rows sorted by expert, sm90a (H100/H200), CUTLASS 3 ptr-array TMA warp-specialized kernels.
//
// Data contract (E experts, S sorted rows, K reduced, N output columns):
//     x      [S, K]        bf16/fp16, row-major: rows of expert e are x[offs[e-1] : offs[e]] (offs[-1] = 0)
//     w      [E, N, K]     B_NK: w[e] is N x K, K contiguous (out = x_e @ w[e]^T; the experts' stacked weights)
//            [E, K, N]     B_KN: w[e] is K x N, N contiguous (out = x_e @ w[e]; transposed weights, mm_nn)
//     offs   [E] int32     exclusive end of each expert's rows (torch._grouped_mm's `offs`), on the device
//     out    [S, N]        row-major; rows past offs[E-1] are left unwritten
//     gate   [S, N]        Epi::kSiluMul only: out = silu(gate) * (x @ w[e]^T), gate read as the epilogue's source
//
//     offs --(one tiny kernel: problem sizes, pointers, strides per expert, on the device)--> grouped GEMM
//
// The gated activation in the epilogue (Epi::kSiluMul): a SwiGLU gate_up projection as two GEMMs over the same
// rows, the gate GEMM (plain, w_gate_up's first I rows: a view, no copy) writing g [S, I], then the up GEMM (its
// last I rows) whose epilogue loads g by TMA beside the accumulator and stores silu(g) * acc: A [S, I] directly,
// without the [S, 2I] pre-activation round trip and the activation pass between the GEMMs.
//
// Nothing is read on the host: the problem sizes live only on the device (CUTLASS's device-side group
// scheduling), so a call is CUDA-graph capturable and adds no sync. An expert with no rows is a 0 x N problem
// that gets no tiles. The weights are read in place through their strides: no copy, no transposition.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace moe_cutlass {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per expert

// Tile / cluster / schedule choices, listed in configs.h (the order the Python side indexes). Cooperative: two
// consumer warp groups share one tile (M >= 128); ping-pong: each warp group its own tile, one group's epilogue
// under the other's main loop (short K loops). An M x 1 cluster multicasts each weight tile to the CTAs working on
// different rows of the same expert (fewer weight streams per row); 1 x N multicasts the activation rows to CTAs
// working on different columns.
// Fp8Blockwise: the FP8 kernels whose main loop promotes each K block by its scales (grouped_gemm_fp8.cuh), with
// K tiles one 128-deep scale block.
template <int M, int N, int ClusterM, int ClusterN, bool Pingpong, bool Fp8Blockwise = false>
struct TileConfig {
  using Tile = cute::Shape<cute::Int<M>, cute::Int<N>, cute::Int<Fp8Blockwise ? 128 : 64>>;
  using Cluster = cute::Shape<cute::Int<ClusterM>, cute::Int<ClusterN>, cute::_1>;
  using Kernel = std::conditional_t<
      Fp8Blockwise,
      std::conditional_t<Pingpong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>,
      std::conditional_t<Pingpong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>>;
  using Epilogue = std::conditional_t<Pingpong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                                      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
};
using Coop128x128 = TileConfig<128, 128, 1, 1, false>;
using Coop128x256Cluster2x1 = TileConfig<128, 256, 2, 1, false>;
using Pingpong64x128 = TileConfig<64, 128, 1, 1, true>;
using Coop128x128Cluster2x1 = TileConfig<128, 128, 2, 1, false>;
using Coop128x256Cluster1x2 = TileConfig<128, 256, 1, 2, false>;
using Coop256x128Cluster2x1 = TileConfig<256, 128, 2, 1, false>;
using Pingpong128x128Cluster2x1 = TileConfig<128, 128, 2, 1, true>;
using Pingpong64x256 = TileConfig<64, 256, 1, 1, true>;
using Pingpong64x256Cluster1x2 = TileConfig<64, 256, 1, 2, true>;

// What the epilogue stores: the accumulator (kPlain), or silu(source) * accumulator (kSiluMul, source = the gate
// GEMM's output rows, same shape as D).
enum class Epi { kPlain, kSiluMul };

// silu(C) * acc in fp32, rounded once to Element: an epilogue visitor tree (EVT) over the source and the accumulator.
template <typename Element>
using SiluMul = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, Element, float, cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::epilogue::thread::SiLu, float, float,
                                               cutlass::FloatRoundStyle::round_to_nearest>,
        cutlass::epilogue::fusion::Sm90SrcFetch<Element>>,
    cutlass::epilogue::fusion::Sm90AccFetch>;

// LayoutA: RowMajor for the rows of x (K contiguous); ColumnMajor for the weight gradients' transposed left
// operand (M contiguous: WgradRunner below).
template <typename Element, typename LayoutB, typename Config, Epi kEpi = Epi::kPlain,
          typename LayoutA_ = cutlass::layout::RowMajor>
struct GroupedGemm {
  using LayoutA = LayoutA_;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte rows for TMA
  static constexpr bool kSource = kEpi == Epi::kSiluMul;
  using ElementC = std::conditional_t<kSource, Element, void>;  // void: no source tensor, no C loads
  using Fusion = std::conditional_t<kSource, SiluMul<Element>, cutlass::epilogue::fusion::LinearCombination<Element, float>>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::Tile, typename Config::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      ElementC, LayoutD*, kAlign,
      Element, LayoutD*, kAlign, typename Config::Epilogue, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign,
      float, typename Config::Tile, typename Config::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::Kernel>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideC;
  using StrideD = typename Kernel::InternalStrideD;
};

// Per-expert arguments, written on the device from offs: one thread per expert. `c` (the epilogue's source, rows
// like out's) may be null: then ptr_c and sc are not written.
template <typename Element, typename StrideA, typename StrideB, typename StrideC, typename StrideD>
__global__ void build_groups(const int32_t* __restrict__ offs, int E, int N, int K, const Element* x,
                             const Element* w, int64_t stride_we, const Element* c, Element* out,
                             ProblemShape::UnderlyingProblemShape* shapes, const Element** ptr_a,
                             const Element** ptr_b, const Element** ptr_c, Element** ptr_d, StrideA* sa, StrideB* sb,
                             StrideC* sc, StrideD* sd, StrideA a, StrideB b, StrideC cs, StrideD d) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int64_t start = e == 0 ? 0 : offs[e - 1];
  int64_t rows = offs[e] - start;
  shapes[e] = ProblemShape::UnderlyingProblemShape(static_cast<int>(rows), N, K);
  ptr_a[e] = x + start * K;  // 64-bit offsets: S * K passes 2^31 at large T
  ptr_b[e] = w + static_cast<int64_t>(e) * stride_we;
  ptr_d[e] = out + start * N;
  sa[e] = a;
  sb[e] = b;
  sd[e] = d;
  if (c != nullptr) {
    ptr_c[e] = c + start * N;
    sc[e] = cs;
  }
}

// Bytes of device scratch (per-expert arguments + CUTLASS's workspace) a call needs; the caller allocates it
// from torch's allocator on the current stream (so a capture reuses the same memory at every replay).
struct Scratch {
  void* base;
  size_t bytes;
};

inline size_t align_up(size_t n) { return (n + 127) / 128 * 128; }

template <typename Element, typename LayoutB, typename Config, Epi kEpi = Epi::kPlain>
struct Runner {
  using G = GroupedGemm<Element, LayoutB, Config, kEpi>;

  static size_t arg_bytes(int E) {
    return align_up(E * sizeof(ProblemShape::UnderlyingProblemShape)) + 4 * align_up(E * sizeof(void*)) +
           align_up(E * sizeof(typename G::StrideA)) + align_up(E * sizeof(typename G::StrideB)) +
           align_up(E * sizeof(typename G::StrideC)) + align_up(E * sizeof(typename G::StrideD));
  }

  // Fills `args` (pointing into scratch); returns the CUTLASS arguments. w_expert_stride in elements; `c` the
  // epilogue's source [S, N] (kSiluMul), null for kPlain.
  static typename G::Gemm::Arguments arguments(const Element* x, const Element* w, int64_t w_expert_stride,
                                               const int32_t* offs, const Element* c, Element* out, int E, int N,
                                               int K, char* scratch, int sm_count, int device, cudaStream_t stream) {
    using Shape = ProblemShape::UnderlyingProblemShape;
    char* p = scratch;
    auto take = [&](size_t bytes) { char* q = p; p += align_up(bytes); return q; };
    auto* shapes = reinterpret_cast<Shape*>(take(E * sizeof(Shape)));
    auto* ptr_a = reinterpret_cast<const Element**>(take(E * sizeof(void*)));
    auto* ptr_b = reinterpret_cast<const Element**>(take(E * sizeof(void*)));
    auto* ptr_c = reinterpret_cast<const Element**>(take(E * sizeof(void*)));
    auto* ptr_d = reinterpret_cast<Element**>(take(E * sizeof(void*)));
    auto* sa = reinterpret_cast<typename G::StrideA*>(take(E * sizeof(typename G::StrideA)));
    auto* sb = reinterpret_cast<typename G::StrideB*>(take(E * sizeof(typename G::StrideB)));
    auto* sc = reinterpret_cast<typename G::StrideC*>(take(E * sizeof(typename G::StrideC)));
    auto* sd = reinterpret_cast<typename G::StrideD*>(take(E * sizeof(typename G::StrideD)));
    // The strides do not depend on an expert's row count (no batch mode): one value for every expert.
    auto a = cutlass::make_cute_packed_stride(typename G::StrideA{}, cute::make_shape(1, K, 1));
    auto b = cutlass::make_cute_packed_stride(typename G::StrideB{}, cute::make_shape(N, K, 1));
    auto cs = cutlass::make_cute_packed_stride(typename G::StrideC{}, cute::make_shape(1, N, 1));
    auto d = cutlass::make_cute_packed_stride(typename G::StrideD{}, cute::make_shape(1, N, 1));
    build_groups<<<(E + 127) / 128, 128, 0, stream>>>(offs, E, N, K, x, w, w_expert_stride, c, out, shapes, ptr_a,
                                                       ptr_b, ptr_c, ptr_d, sa, sb, sc, sd, a, b, cs, d);

    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count;
    typename G::Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {E, shapes, nullptr},  // no host copy of the problem sizes: device-side scheduling only
        {ptr_a, sa, ptr_b, sb},
        {},
        hw};
    args.epilogue.ptr_D = ptr_d;
    args.epilogue.dD = sd;
    if constexpr (G::kSource) {  // (the EVT's nodes take no arguments)
      args.epilogue.ptr_C = ptr_c;
      args.epilogue.dC = sc;
    } else {
      args.epilogue.thread.alpha = 1.0f;
      args.epilogue.thread.beta = 0.0f;
    }
    return args;
  }

};

// The weight gradients: out[e] = a_e^T @ b_e per expert, the reduction over each expert's rows (varlen K).
//     a      [S, M]        rows sorted by expert (e.g. dO's rows for d w_down, dz's for d w_gate_up)
//     b      [S, N]        the same rows of the other operand (act's / x's)
//     offs   [E] int32     exclusive end of each expert's rows, on the device (a row past offs[E-1] is never read)
//     out    [E, M, N]     row-major per expert (the weight's own [E, M, N] layout); an expert without rows gets 0
// As a CUTLASS GEMM of expert e: A = a_e^T (M x rows, M contiguous: ColumnMajor), B = b_e as rows x N (N contiguous:
// RowMajor), K = its row count. The accumulators of a tile with no K steps are never written by the main loop
// (CUTLASS 4.2's ptr-array kernels issue no MMA when K = 0, so the epilogue would store registers as they are):
// such an expert is given no tiles (M = 0) and its output is zeroed by zero_empty_groups.
template <typename Element, typename StrideA, typename StrideB, typename StrideD>
__global__ void build_wgrad_groups(const int32_t* __restrict__ offs, int E, int M, int N, const Element* a,
                                   const Element* b, Element* out, ProblemShape::UnderlyingProblemShape* shapes,
                                   const Element** ptr_a, const Element** ptr_b, Element** ptr_d, StrideA* sa,
                                   StrideB* sb, StrideD* sd, StrideA as, StrideB bs, StrideD d) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  int64_t start = e == 0 ? 0 : offs[e - 1];
  int64_t rows = offs[e] - start;
  shapes[e] = ProblemShape::UnderlyingProblemShape(rows > 0 ? M : 0, N, static_cast<int>(rows));
  ptr_a[e] = a + start * M;  // 64-bit offsets: S * M passes 2^31 at large T
  ptr_b[e] = b + start * N;
  ptr_d[e] = out + static_cast<int64_t>(e) * M * N;
  sa[e] = as;
  sb[e] = bs;
  sd[e] = d;
}

// out[e] = 0 for each expert without rows; one 16-byte store per thread and step, blockIdx.y the expert. The
// other experts' blocks return at once.
template <typename Element>
__global__ void zero_empty_groups(const int32_t* __restrict__ offs, int64_t per_expert, Element* out) {
  const int e = blockIdx.y;
  const int32_t start = e == 0 ? 0 : offs[e - 1];
  if (offs[e] != start) return;
  auto* dst = reinterpret_cast<uint4*>(out + static_cast<int64_t>(e) * per_expert);
  const int64_t n = per_expert * static_cast<int64_t>(sizeof(Element)) / 16;  // per_expert * size: a multiple of 16
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = make_uint4(0, 0, 0, 0);
  }
}

template <typename Element, typename Config>
struct WgradRunner {
  using G = GroupedGemm<Element, cutlass::layout::RowMajor, Config, Epi::kPlain, cutlass::layout::ColumnMajor>;

  static size_t arg_bytes(int E) {
    return align_up(E * sizeof(ProblemShape::UnderlyingProblemShape)) + 3 * align_up(E * sizeof(void*)) +
           align_up(E * sizeof(typename G::StrideA)) + align_up(E * sizeof(typename G::StrideB)) +
           align_up(E * sizeof(typename G::StrideD));
  }

  // Fills `args` (pointing into scratch) and zeroes the outputs of experts without rows; returns the CUTLASS
  // arguments.
  static typename G::Gemm::Arguments arguments(const Element* a, const Element* b, const int32_t* offs, Element* out,
                                               int E, int M, int N, char* scratch, int sm_count, int device,
                                               cudaStream_t stream) {
    using Shape = ProblemShape::UnderlyingProblemShape;
    char* p = scratch;
    auto take = [&](size_t bytes) { char* q = p; p += align_up(bytes); return q; };
    auto* shapes = reinterpret_cast<Shape*>(take(E * sizeof(Shape)));
    auto* ptr_a = reinterpret_cast<const Element**>(take(E * sizeof(void*)));
    auto* ptr_b = reinterpret_cast<const Element**>(take(E * sizeof(void*)));
    auto* ptr_d = reinterpret_cast<Element**>(take(E * sizeof(void*)));
    auto* sa = reinterpret_cast<typename G::StrideA*>(take(E * sizeof(typename G::StrideA)));
    auto* sb = reinterpret_cast<typename G::StrideB*>(take(E * sizeof(typename G::StrideB)));
    auto* sd = reinterpret_cast<typename G::StrideD*>(take(E * sizeof(typename G::StrideD)));
    // M-major A and N-major B: the leading dimensions are a's and b's row widths, whatever an expert's row count.
    auto as = cutlass::make_cute_packed_stride(typename G::StrideA{}, cute::make_shape(M, 1, 1));
    auto bs = cutlass::make_cute_packed_stride(typename G::StrideB{}, cute::make_shape(N, 1, 1));
    auto d = cutlass::make_cute_packed_stride(typename G::StrideD{}, cute::make_shape(M, N, 1));
    build_wgrad_groups<<<(E + 127) / 128, 128, 0, stream>>>(offs, E, M, N, a, b, out, shapes, ptr_a, ptr_b, ptr_d,
                                                             sa, sb, sd, as, bs, d);
    const int64_t per_expert = static_cast<int64_t>(M) * N;
    const int64_t vectors = per_expert * static_cast<int64_t>(sizeof(Element)) / 16;
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((vectors + 255) / 256, 64)), E);
    zero_empty_groups<<<grid, 256, 0, stream>>>(offs, per_expert, out);

    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count;
    typename G::Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped, {E, shapes, nullptr}, {ptr_a, sa, ptr_b, sb}, {}, hw};
    args.epilogue.ptr_D = ptr_d;
    args.epilogue.dD = sd;
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
  }
};

// One GEMM of a Runner's arguments (bf16 here, FP8 in grouped_gemm_fp8.cuh): CUTLASS's checks, then the launch.
template <typename Gemm>
cutlass::Status run_gemm(typename Gemm::Arguments& args, void* workspace, cudaStream_t stream) {
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) return status;
  status = gemm.initialize(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) return status;
  return gemm.run(stream);
}

}  // namespace moe_cutlass
