// torch bindings of the CUDA launchers (module sharpfast._C_cuda).
//
// Compiled by the host compiler with torch headers only (no CUDA headers): the CUDA stream
// arrives from Python as an integer (torch.cuda.current_stream().cuda_stream) and the device is
// made current by the caller, so this file builds even against a CPU wheel of torch.
#include <torch/extension.h>

#include "../kernels/sharpfast_kernels.h"
#include "checks.h"

namespace sharpfast {
namespace {

constexpr auto kCUDA = at::DeviceType::CUDA;

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "sharpfast: CUDA kernel ", op, " failed with cudaError ", err);
}

at::Tensor workspace(const at::Tensor& like, int64_t B, int64_t D) {
  return new_output({sf_cuda_workspace_elems(B, D)}, like.options().dtype(at::kDouble));
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

std::tuple<at::Tensor, at::Tensor> cfg_combine(const at::Tensor& u, const at::Tensor& c, double w,
                                               int64_t stream) {
  const int64_t D = row_size(u, "eps_uncond", kCUDA);
  check_like(c, "eps_cond", u, "eps_uncond");
  SF_CHECK(std::isfinite(w), "guidance_scale must be finite, got ", w);
  const int64_t B = u.size(0);
  auto guided = new_output(u.sizes(), u.options());
  auto norm = new_output({B}, u.options().dtype(acc_dtype(u)));
  auto ws = workspace(u, B, D);
  check_launch(sf_cuda_cfg_combine(dtype_code(u, "eps_uncond"), u.data_ptr(), c.data_ptr(), guided.data_ptr(),
                                   norm.data_ptr(), ws.data_ptr<double>(), B, D, w, as_stream(stream)),
               "cfg_combine");
  return {guided, norm};
}

at::Tensor rademacher_perturb(const at::Tensor& x, int64_t K, double h, uint64_t seed, bool central,
                              int64_t stream) {
  const int64_t D = row_size(x, "x", kCUDA);
  const int64_t n = probe_count(K, central);
  check_step(h);
  auto out = new_output(repeat_batch(x.sizes(), n), x.options());
  check_launch(sf_cuda_rademacher_perturb(dtype_code(x, "x"), x.data_ptr(), out.data_ptr(), x.size(0), D, K,
                                          central, h, seed, as_stream(stream)),
               "rademacher_perturb");
  return out;
}

at::Tensor hutchinson_reduce(const at::Tensor& y, const c10::optional<at::Tensor>& y0, int64_t K, double h,
                             uint64_t seed, bool central, int64_t stream) {
  const int64_t D = row_size(y, "y_probes", kCUDA);
  const int64_t B = probe_batch(y, probe_count(K, central));
  check_step(h);
  const void* y0_ptr = base_values(y0, y, B, D, central);
  auto trace = new_output({B}, y.options().dtype(acc_dtype(y)));
  auto ws = workspace(y, B, D);
  check_launch(sf_cuda_hutchinson_reduce(dtype_code(y, "y_probes"), y.data_ptr(), y0_ptr, trace.data_ptr(),
                                         ws.data_ptr<double>(), B, D, K, central, h, seed, as_stream(stream)),
               "hutchinson_reduce");
  return trace;
}

at::Tensor fd_direction(const at::Tensor& x, const at::Tensor& u, const at::Tensor& c, double h, int64_t stream) {
  const int64_t D = row_size(x, "x", kCUDA);
  check_like(u, "eps_uncond", x, "x");
  check_like(c, "eps_cond", x, "x");
  check_step(h);
  auto out = new_output(x.sizes(), x.options());
  auto ws = workspace(x, x.size(0), D);
  check_launch(sf_cuda_fd_direction(dtype_code(x, "x"), x.data_ptr(), u.data_ptr(), c.data_ptr(), out.data_ptr(),
                                    ws.data_ptr<double>(), x.size(0), D, h, as_stream(stream)),
               "fd_direction");
  return out;
}

at::Tensor diff_of_diffs_norm(const at::Tensor& u0, const at::Tensor& c0, const at::Tensor& u1,
                              const at::Tensor& c1, int64_t stream) {
  const int64_t D = row_size(u0, "u0", kCUDA);
  check_like(c0, "c0", u0, "u0");
  check_like(u1, "u1", u0, "u0");
  check_like(c1, "c1", u0, "u0");
  auto out = new_output({u0.size(0)}, u0.options().dtype(acc_dtype(u0)));
  auto ws = workspace(u0, u0.size(0), D);
  check_launch(sf_cuda_diff_of_diffs_norm(dtype_code(u0, "u0"), u0.data_ptr(), c0.data_ptr(), u1.data_ptr(),
                                          c1.data_ptr(), out.data_ptr(), ws.data_ptr<double>(), u0.size(0), D,
                                          as_stream(stream)),
               "diff_of_diffs_norm");
  return out;
}

}  // namespace
}  // namespace sharpfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_poison", [](bool on) { sharpfast::poison_outputs() = on; },
        "Test hook: fill outputs and workspaces with NaN before each kernel");
  m.doc() = "sharpfast CUDA kernels";
  m.def("cfg_combine", &sharpfast::cfg_combine);
  m.def("rademacher_perturb", &sharpfast::rademacher_perturb);
  m.def("hutchinson_reduce", &sharpfast::hutchinson_reduce);
  m.def("fd_direction", &sharpfast::fd_direction);
  m.def("diff_of_diffs_norm", &sharpfast::diff_of_diffs_norm);
}
