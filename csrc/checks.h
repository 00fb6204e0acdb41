// Host-side argument checks shared by the CPU and CUDA torch bindings.
// The Python layer validates first with friendlier messages; these named checks keep the
// extension safe when it is called directly.
#pragma once
#include <torch/extension.h>

#include <limits>
#include <string>

#include "../kernels/sf_common.h"

namespace sharpfast {

#define SF_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "sharpfast: ", __VA_ARGS__)

inline int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    case at::kDouble: return kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "sharpfast: ", name, " must be float32, float16, bfloat16 or float64, got ",
                       t.scalar_type());
  }
  return -1;
}

// Test hook: when set, every output and workspace is filled with NaN before a kernel runs,
// so a test can prove that the kernel writes every element.
inline bool& poison_outputs() {
  static bool flag = false;
  return flag;
}

inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  auto t = at::empty(shape, opts);
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// dtype of per-sample outputs (norms, traces): fp32, or fp64 for fp64 inputs.
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks a (B, ...) tensor: device type, contiguity, non-empty; returns D (elements per sample).
inline int64_t row_size(const at::Tensor& t, const char* name, at::DeviceType device) {
  SF_CHECK(t.device().type() == device, name, " must be on ", at::DeviceTypeName(device), ", got ",
           t.device());
  SF_CHECK(t.dim() >= 1 && t.size(0) > 0 && t.numel() > 0, name,
           " must have a non-empty batch dimension, got shape ", t.sizes());
  SF_CHECK(t.is_contiguous(), name, " must be contiguous");
  dtype_code(t, name);
  const int64_t D = t.numel() / t.size(0);
  SF_CHECK(D < (int64_t(1) << 31), name, " has too many elements per sample (", D, ")");
  return D;
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  SF_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ", ref.sizes(),
           ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "sharpfast: ", name, " must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  SF_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (", ref.device(),
           "), got ", t.device());
  SF_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline int64_t probe_count(int64_t K, bool central) {
  SF_CHECK(K > 0, "num_probes must be positive, got ", K);
  return central ? 2 * K : K;
}

inline void check_step(double h) { SF_CHECK(std::isfinite(h) && h > 0, "h must be finite and positive, got ", h); }

// Shape (n * B, ...) from a (B, ...) shape.
inline std::vector<int64_t> repeat_batch(at::IntArrayRef shape, int64_t n) {
  std::vector<int64_t> out(shape.begin(), shape.end());
  out[0] *= n;
  return out;
}

// y_probes holds nprobe * B rows of y0's (or any) row shape; returns B.
inline int64_t probe_batch(const at::Tensor& y, int64_t nprobe) {
  SF_CHECK(y.size(0) % nprobe == 0, "y_probes has ", y.size(0), " rows, not a multiple of ", nprobe);
  return y.size(0) / nprobe;
}

// The base values y0 of a Hutchinson reduction: checked against y_probes (B samples of D
// elements); null when absent (allowed only for central differences, which do not read it).
inline const void* base_values(const c10::optional<at::Tensor>& y0, const at::Tensor& y, int64_t B, int64_t D,
                               bool central) {
  if (!y0.has_value()) {
    SF_CHECK(central, "y0 is required for forward differences (central=False)");
    return nullptr;
  }
  SF_CHECK(y0->size(0) == B && y0->numel() == B * D, "y0 must hold ", B, " samples of ", D,
           " elements, got shape ", y0->sizes());
  SF_CHECK(y0->scalar_type() == y.scalar_type() && y0->device() == y.device() && y0->is_contiguous(),
           "y0 must be a contiguous tensor of y_probes' dtype and device");
  return y0->data_ptr();
}

}  // namespace sharpfast
