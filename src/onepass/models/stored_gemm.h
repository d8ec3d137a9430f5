// onepass's GEMM over weights kept in their stored format (stored_gemm.cpp), shared with the
// fused decoder.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace onepass {

// Whether `packed` is a weight from stored_pack of this ISA's build (and not, e.g., fp32 tiles
// from small_gemm_pack).
bool is_stored(const at::Tensor& packed);

// y [M, N] = x [M, K] @ (W * scale).T for a stored weight W (scale: a column scale [K], or
// none); x contiguous float32. Row i does not depend on the other rows, and equals small_gemm
// on the dequantized (and scaled) weight bit for bit.
void stored_gemm_into(const at::Tensor& x, const at::Tensor& packed,
                      const std::optional<at::Tensor>& scale, int64_t N, at::Tensor& y);

}  // namespace onepass
