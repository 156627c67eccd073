// Block-scaled FP8 grouped GEMM (w8a8, DeepSeek-V3's recipe) over rows sorted by expert, sm90a: CUTLASS 3
// ptr-array TMA warp-specialized kernels whose main loop promotes each 128-deep K block's fp32 partial product
// by its two scales (KernelPtrArrayTmaWarpSpecialized*FP8Blockwise; CUTLASS example 68).
//
// Data contract (E experts, S sorted rows, K reduced, N output columns, Kb = ceil(K / 128), Nb = ceil(N / 128))
//     x      [S, K]        float8_e4m3fn, row-major: rows of expert e are x[offs[e-1] : offs[e]] (offs[-1] = 0)
//     xs     [S, Kb]       fp32, row-major: xs[r, j] scales x[r, 128 j : 128 (j + 1)] (the 1 x 128 activation
//                          groups of transformers' and DeepSeek's dynamic quantization)
//     w      [E, N, K]     float8_e4m3fn, K contiguous (the checkpoint's experts, read in place)
//     ws     [E, Nb, Kb]   fp32: ws[e, i, j] scales w[e, 128 i : 128 (i + 1), 128 j : 128 (j + 1)]
//     offs   [E] int32     exclusive end of each expert's rows, on the device
//     out    [S, N]        bf16: out[r, n] = sum_j xs[r, j] ws[e, n / 128, j] sum_{c in block j} x[r, c] w[e, n, c]
//
//     offs --(one tiny kernel: problem sizes, pointers, strides per expert, on the device)--> grouped GEMM
//
// Both scale tensors are K-major (a row's scales contiguous), as the quantizer and the checkpoint write them:
// the collective rebuilds each expert's scale layout from its problem shape, whose K-major strides are exactly
// those of a row-major [rows, Kb] slice (SFA) and of a packed [Nb, Kb] matrix (SFB). Nothing is dequantized to
// memory; nothing is read on the host (CUDA-graph capturable, no sync).
#pragma once

#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "grouped_gemm.cuh"

namespace moe_cutlass {

// FP8 tile / cluster / schedule choices (configs.h's MOE_CUTLASS_FP8_CONFIGS): K tiles one scale block deep.
template <int M, int N, int ClusterM, int ClusterN, bool Pingpong>
using Fp8TileConfig = TileConfig<M, N, ClusterM, ClusterN, Pingpong, /*Fp8Blockwise=*/true>;
using Fp8Coop128x128 = Fp8TileConfig<128, 128, 1, 1, false>;
using Fp8Coop128x128Cluster1x2 = Fp8TileConfig<128, 128, 1, 2, false>;
using Fp8Coop128x128Cluster2x1 = Fp8TileConfig<128, 128, 2, 1, false>;
using Fp8Pingpong64x128 = Fp8TileConfig<64, 128, 1, 1, true>;

template <typename Config>
struct Fp8GroupedGemm {
  using ElementAB = cutlass::float_e4m3_t;
  using ElementD = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;  // w[e]: N x K, K contiguous
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;  // 16-byte rows for TMA
  static constexpr int kAlignD = 8;

  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::Tile, typename Config::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlignD,  // no source tensor: D = accumulator
      ElementD, LayoutD*, kAlignD, typename Config::Epilogue,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, cute::tuple<LayoutA*, LayoutSFA*>, kAlignAB,
      ElementAB, cute::tuple<LayoutB*, LayoutSFB*>, kAlignAB, float, typename Config::Tile, typename Config::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::Kernel>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// Per-expert arguments, written on the device from offs: one thread per expert. Row offsets are 64-bit (S * K
// passes 2^31 at large T); the scale layouts are filled for completeness (the grouped collective derives them
// from each problem shape: the same values).
template <typename G>
__global__ void build_fp8_groups(const int32_t* __restrict__ offs, int E, int N, int K, const uint8_t* x,
                                 const float* xs, const uint8_t* w, int64_t stride_we, const float* ws,
                                 int64_t stride_wse, typename G::ElementD* out,
                                 ProblemShape::UnderlyingProblemShape* shapes, const typename G::ElementAB** ptr_a,
                                 const typename G::ElementAB** ptr_b, typename G::ElementD** ptr_d,
                                 const float** ptr_sfa, const float** ptr_sfb, typename G::StrideA* sa,
                                 typename G::StrideB* sb, typename G::StrideD* sd, typename G::LayoutSFA* lsfa,
                                 typename G::LayoutSFB* lsfb, typename G::StrideA a, typename G::StrideB b,
                                 typename G::StrideD d) {
  int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= E) return;
  const int64_t kb = (K + 127) / 128;
  int64_t start = e == 0 ? 0 : offs[e - 1];
  int rows = static_cast<int>(offs[e] - start);
  shapes[e] = ProblemShape::UnderlyingProblemShape(rows, N, K);
  ptr_a[e] = reinterpret_cast<const typename G::ElementAB*>(x + start * K);
  ptr_b[e] = reinterpret_cast<const typename G::ElementAB*>(w + static_cast<int64_t>(e) * stride_we);
  ptr_d[e] = out + start * N;
  ptr_sfa[e] = xs + start * kb;
  ptr_sfb[e] = ws + static_cast<int64_t>(e) * stride_wse;
  sa[e] = a;
  sb[e] = b;
  sd[e] = d;
  lsfa[e] = G::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(rows, N, K, 1));
  lsfb[e] = G::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(rows, N, K, 1));
}

template <typename Config>
struct Fp8Runner {
  using G = Fp8GroupedGemm<Config>;

  static size_t arg_bytes(int E) {
    return align_up(E * sizeof(ProblemShape::UnderlyingProblemShape)) + 5 * align_up(E * sizeof(void*)) +
           align_up(E * sizeof(typename G::StrideA)) + align_up(E * sizeof(typename G::StrideB)) +
           align_up(E * sizeof(typename G::StrideD)) + align_up(E * sizeof(typename G::LayoutSFA)) +
           align_up(E * sizeof(typename G::LayoutSFB));
  }

  // Fills the per-expert arguments (in scratch, on the device) and returns CUTLASS's. Strides in elements.
  static typename G::Gemm::Arguments arguments(const uint8_t* x, const float* xs, const uint8_t* w, int64_t w_stride,
                                               const float* ws, int64_t ws_stride, const int32_t* offs,
                                               typename G::ElementD* out, int E, int N, int K, char* scratch,
                                               int sm_count, int device, cudaStream_t stream) {
    using Shape = ProblemShape::UnderlyingProblemShape;
    char* p = scratch;
    auto take = [&](size_t bytes) { char* q = p; p += align_up(bytes); return q; };
    auto* shapes = reinterpret_cast<Shape*>(take(E * sizeof(Shape)));
    auto* ptr_a = reinterpret_cast<const typename G::ElementAB**>(take(E * sizeof(void*)));
    auto* ptr_b = reinterpret_cast<const typename G::ElementAB**>(take(E * sizeof(void*)));
    auto* ptr_d = reinterpret_cast<typename G::ElementD**>(take(E * sizeof(void*)));
    auto* ptr_sfa = reinterpret_cast<const float**>(take(E * sizeof(void*)));
    auto* ptr_sfb = reinterpret_cast<const float**>(take(E * sizeof(void*)));
    auto* sa = reinterpret_cast<typename G::StrideA*>(take(E * sizeof(typename G::StrideA)));
    auto* sb = reinterpret_cast<typename G::StrideB*>(take(E * sizeof(typename G::StrideB)));
    auto* sd = reinterpret_cast<typename G::StrideD*>(take(E * sizeof(typename G::StrideD)));
    auto* lsfa = reinterpret_cast<typename G::LayoutSFA*>(take(E * sizeof(typename G::LayoutSFA)));
    auto* lsfb = reinterpret_cast<typename G::LayoutSFB*>(take(E * sizeof(typename G::LayoutSFB)));
    auto a = cutlass::make_cute_packed_stride(typename G::StrideA{}, cute::make_shape(1, K, 1));
    auto b = cutlass::make_cute_packed_stride(typename G::StrideB{}, cute::make_shape(N, K, 1));
    auto d = cutlass::make_cute_packed_stride(typename G::StrideD{}, cute::make_shape(1, N, 1));
    build_fp8_groups<G><<<(E + 127) / 128, 128, 0, stream>>>(offs, E, N, K, x, xs, w, w_stride, ws, ws_stride, out,
                                                             shapes, ptr_a, ptr_b, ptr_d, ptr_sfa, ptr_sfb, sa, sb,
                                                             sd, lsfa, lsfb, a, b, d);
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count;
    typename G::Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {E, shapes, nullptr},  // no host copy of the problem sizes: device-side scheduling only
        {ptr_a, sa, ptr_b, sb, ptr_sfa, lsfa, ptr_sfb, lsfb},
        {{}, nullptr, nullptr, ptr_d, sd},
        hw};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
  }
};

}  // namespace moe_cutlass
