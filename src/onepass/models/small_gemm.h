// onepass's GEMM for a few rows (small_gemm.cpp), shared with the fused decoder and top_k.cpp.
#pragma once
#include <ATen/ATen.h>

#include "simd.h"

// The namespace of this build's ops, e.g. onepass_avx2 (cpu_kernels.py): one per ISA, so that
// builds for several ISAs can be loaded in one process.
#ifndef ONEPASS_OPS
#error "build with -DONEPASS_OPS=<op namespace>"
#endif

namespace onepass {

// Output columns per tile: two registers (see small_gemm.cpp). Threads split the columns at
// tiles, which top_k.cpp follows.
constexpr int64_t kTileRegisters = 2;
constexpr int64_t kTile = kTileRegisters * simd::kLanes;

// W [N, K] -> the tiled layout small_gemm reads.
at::Tensor small_gemm_pack(const at::Tensor& weight);

// x [M, K] float32 times pack(W) with W [N, K]: x @ W.T, [M, N]. Row i does not depend on the
// other rows.
at::Tensor small_gemm(const at::Tensor& x, const at::Tensor& packed, int64_t N);

}  // namespace onepass
