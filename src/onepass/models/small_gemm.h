// onepass's AVX-512 GEMM for a few rows (small_gemm.cpp), shared with the fused decoder.
#pragma once
#include <ATen/ATen.h>

namespace onepass {

// W [N, K] -> the tiled layout small_gemm reads.
at::Tensor small_gemm_pack(const at::Tensor& weight);

// x [M, K] float32 times pack(W) with W [N, K]: x @ W.T, [M, N]. Row i does not depend on the
// other rows.
at::Tensor small_gemm(const at::Tensor& x, const at::Tensor& packed, int64_t N);

}  // namespace onepass
