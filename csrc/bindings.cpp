// torch bindings of the CPU implementations (module sharpfast._C).
#include <torch/extension.h>

#include "checks.h"
#include "cpu_kernels.h"

namespace sharpfast {
namespace {

constexpr auto kCPU = at::DeviceType::CPU;

std::tuple<at::Tensor, at::Tensor> cfg_combine(const at::Tensor& u, const at::Tensor& c, double w) {
  const int64_t D = row_size(u, "eps_uncond", kCPU);
  check_like(c, "eps_cond", u, "eps_uncond");
  SF_CHECK(std::isfinite(w), "guidance_scale must be finite, got ", w);
  const int64_t B = u.size(0);
  auto guided = new_output(u.sizes(), u.options());
  auto norm = new_output({B}, u.options().dtype(acc_dtype(u)));
  cpu::cfg_combine(dtype_code(u, "eps_uncond"), u.data_ptr(), c.data_ptr(), guided.data_ptr(),
                   norm.data_ptr(), B, D, w);
  return {guided, norm};
}

at::Tensor rademacher_perturb(const at::Tensor& x, int64_t K, double h, uint64_t seed, bool central) {
  const int64_t D = row_size(x, "x", kCPU);
  const int64_t n = probe_count(K, central);
  check_step(h);
  auto out = new_output(repeat_batch(x.sizes(), n), x.options());
  cpu::rademacher_perturb(dtype_code(x, "x"), x.data_ptr(), out.data_ptr(), x.size(0), D, K, central,
                          h, seed);
  return out;
}

at::Tensor hutchinson_reduce(const at::Tensor& y, const c10::optional<at::Tensor>& y0, int64_t K,
                             double h, uint64_t seed, bool central) {
  const int64_t D = row_size(y, "y_probes", kCPU);
  const int64_t B = probe_batch(y, probe_count(K, central));
  check_step(h);
  const void* y0_ptr = base_values(y0, y, B, D, central);
  auto trace = new_output({B}, y.options().dtype(acc_dtype(y)));
  cpu::hutchinson_reduce(dtype_code(y, "y_probes"), y.data_ptr(), y0_ptr, trace.data_ptr(), B, D, K,
                         central, h, seed);
  return trace;
}

at::Tensor fd_direction(const at::Tensor& x, const at::Tensor& u, const at::Tensor& c, double h) {
  const int64_t D = row_size(x, "x", kCPU);
  check_like(u, "eps_uncond", x, "x");
  check_like(c, "eps_cond", x, "x");
  check_step(h);
  auto out = new_output(x.sizes(), x.options());
  cpu::fd_direction(dtype_code(x, "x"), x.data_ptr(), u.data_ptr(), c.data_ptr(), out.data_ptr(),
                    x.size(0), D, h);
  return out;
}

at::Tensor diff_of_diffs_norm(const at::Tensor& u0, const at::Tensor& c0, const at::Tensor& u1,
                              const at::Tensor& c1) {
  const int64_t D = row_size(u0, "u0", kCPU);
  check_like(c0, "c0", u0, "u0");
  check_like(u1, "u1", u0, "u0");
  check_like(c1, "c1", u0, "u0");
  auto out = new_output({u0.size(0)}, u0.options().dtype(acc_dtype(u0)));
  cpu::diff_of_diffs_norm(dtype_code(u0, "u0"), u0.data_ptr(), c0.data_ptr(), u1.data_ptr(),
                          c1.data_ptr(), out.data_ptr(), u0.size(0), D);
  return out;
}

}  // namespace
}  // namespace sharpfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", [] { return std::string(sharpfast::cpu::isa()); }, "Instruction set of the CPU kernels in use");
  m.def("set_cpu_isa", [](const std::string& name) { return sharpfast::cpu::set_isa(name.c_str()); },
        "Choose 'baseline', 'avx2' or 'auto'; returns False if unsupported");
  m.def("set_poison", [](bool on) { sharpfast::poison_outputs() = on; },
        "Test hook: fill outputs and workspaces with NaN before each kernel");
  m.doc() = "sharpfast CPU kernels (C++ / OpenMP)";
  m.def("cfg_combine", &sharpfast::cfg_combine, "guided = u + w (c - u) and ||c - u|| per sample");
  m.def("rademacher_perturb", &sharpfast::rademacher_perturb, "x + h v_k (and x - h v_k) per probe");
  m.def("hutchinson_reduce", &sharpfast::hutchinson_reduce, "(1/K) sum_k v_k . (y_k - y0) / h");
  m.def("fd_direction", &sharpfast::fd_direction, "x + h (c - u) / ||c - u|| per sample");
  m.def("diff_of_diffs_norm", &sharpfast::diff_of_diffs_norm, "||(c1 - u1) - (c0 - u0)|| per sample");
}
