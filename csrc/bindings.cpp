// pybind11 bindings of the native CPU kernels. Tensors cross as data pointers (uintptr_t, 0 for
// None), sizes, strides in elements and dtype codes, so the module does not depend on libtorch.
// Every argument is checked again here; a bad one raises ValueError, never crashes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "compat_loss.h"

namespace py = pybind11;

namespace {

using Strides = std::array<int64_t, 3>;
// a sparse teacher: (idx, lp, row) addresses (0 for none) and k
using SparseArg = std::tuple<uintptr_t, uintptr_t, uintptr_t, int64_t>;

[[noreturn]] void fail(const std::string& msg) { throw py::value_error("muscle_fast._native: " + msg); }

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

mf::Operand operand(const char* name, uintptr_t p, int dtype, const Strides& s) {
  mf::Operand op;
  op.data = ptr<const void>(p);
  op.dtype = dtype;
  if (p && s[2] != 1) fail(std::string(name) + ": stride of the last dim must be 1, got " + std::to_string(s[2]));
  op.s0 = s[0];
  op.s1 = s[1];
  return op;
}

int compat_loss_rows(int64_t B, int64_t T, int64_t V, uintptr_t logits, int logits_dtype,
                          Strides logits_strides, uintptr_t labels, uintptr_t old_logits,
                          int old_dtype, Strides old_strides, uintptr_t new_logits, int new_dtype,
                          Strides new_strides, uintptr_t mask, uintptr_t grad, int grad_dtype,
                          Strides grad_strides, uintptr_t row_stats, double scale, int mask_mode,
                          double inv_temperature, double kl_weight, double ce_weight,
                          int64_t ignore_index, bool old_label_logprob, int num_threads,
                          const std::string& isa, const SparseArg& old_sparse,
                          const SparseArg& new_sparse) {
  mf::RowArgs a;
  for (auto [dst, src] : {std::make_pair(&a.so, &old_sparse), std::make_pair(&a.sw, &new_sparse)}) {
    dst->idx = ptr<const int32_t>(std::get<0>(*src));
    dst->lp = ptr<const float>(std::get<1>(*src));
    dst->row = ptr<const float>(std::get<2>(*src));
    dst->k = std::get<3>(*src);
  }
  a.B = B;
  a.T = T;
  a.V = V;
  a.z = operand("logits", logits, logits_dtype, logits_strides);
  a.o = operand("old_logits", old_logits, old_dtype, old_strides);
  a.w = operand("new_logits", new_logits, new_dtype, new_strides);
  if (grad) {
    if (grad_dtype != logits_dtype) fail("grad dtype code must equal the logits dtype code");
    if (grad_strides[2] != 1) fail("grad: stride of the last dim must be 1, got " + std::to_string(grad_strides[2]));
  }
  a.g = ptr<void>(grad);
  a.g_s0 = grad_strides[0];
  a.g_s1 = grad_strides[1];
  a.labels = ptr<const int64_t>(labels);
  a.mask = ptr<const float>(mask);
  a.stats = ptr<float>(row_stats);
  a.scale = static_cast<float>(scale);
  a.mask_mode = mask_mode;
  a.inv_t = static_cast<float>(inv_temperature);
  a.kl_w = static_cast<float>(kl_weight);
  a.ce_w = static_cast<float>(ce_weight);
  a.ignore_index = ignore_index;
  a.old_label_logprob = old_label_logprob;
  a.num_threads = num_threads;
  if (const char* err = mf::validate(a)) fail(err);
  bool ok;
  int threads_used = 0;
  {
    py::gil_scoped_release release;
    ok = mf::compat_loss_rows(a, isa.c_str(), &threads_used);
  }
  if (!ok) fail("isa '" + isa + "' is not available on this CPU (have: " + mf::available_isas() + ")");
  return threads_used;
}

// Vocabulary parallel partials kernel (README.md); labels are local ids.
int compat_partials(int64_t B, int64_t T, int64_t V, uintptr_t logits, int logits_dtype,
                    Strides logits_strides, uintptr_t labels, uintptr_t old_logits, int old_dtype,
                    Strides old_strides, uintptr_t new_logits, int new_dtype, Strides new_strides,
                    uintptr_t partials, double inv_temperature, int64_t ignore_index,
                    bool old_at_one, int num_threads, const std::string& isa) {
  mf::PartialArgs a;
  a.B = B;
  a.T = T;
  a.V = V;
  a.z = operand("logits", logits, logits_dtype, logits_strides);
  a.o = operand("old_logits", old_logits, old_dtype, old_strides);
  a.w = operand("new_logits", new_logits, new_dtype, new_strides);
  a.labels = ptr<const int64_t>(labels);
  a.partials = ptr<float>(partials);
  a.inv_t = static_cast<float>(inv_temperature);
  a.ignore_index = ignore_index;
  a.old_at_one = old_at_one;
  a.num_threads = num_threads;
  if (const char* err = mf::validate(a)) fail(err);
  bool ok;
  int threads_used = 0;
  {
    py::gil_scoped_release release;
    ok = mf::compat_partials(a, isa.c_str(), &threads_used);
  }
  if (!ok) fail("isa '" + isa + "' is not available on this CPU (have: " + mf::available_isas() + ")");
  return threads_used;
}

// Vocabulary parallel gradient kernel (README.md): the gradient from 8 float32 row constants.
int compat_grad_rows(int64_t B, int64_t T, int64_t V, uintptr_t logits, int logits_dtype,
                     Strides logits_strides, uintptr_t labels, uintptr_t old_logits, int old_dtype,
                     Strides old_strides, uintptr_t new_logits, int new_dtype, Strides new_strides,
                     uintptr_t grad, int grad_dtype, Strides grad_strides, uintptr_t consts,
                     double inv_temperature, bool has_kl, bool has_ce, int num_threads,
                     const std::string& isa) {
  mf::GradRowsArgs a;
  a.B = B;
  a.T = T;
  a.V = V;
  a.z = operand("logits", logits, logits_dtype, logits_strides);
  a.o = operand("old_logits", old_logits, old_dtype, old_strides);
  a.w = operand("new_logits", new_logits, new_dtype, new_strides);
  if (!grad) fail("grad pointer is null");
  if (grad_dtype != logits_dtype) fail("grad dtype code must equal the logits dtype code");
  if (grad_strides[2] != 1) fail("grad: stride of the last dim must be 1, got " + std::to_string(grad_strides[2]));
  a.g = ptr<void>(grad);
  a.g_s0 = grad_strides[0];
  a.g_s1 = grad_strides[1];
  a.labels = ptr<const int64_t>(labels);
  a.consts = ptr<const float>(consts);
  a.inv_t = static_cast<float>(inv_temperature);
  a.has_kl = has_kl;
  a.has_ce = has_ce;
  a.num_threads = num_threads;
  if (const char* err = mf::validate(a)) fail(err);
  bool ok;
  int threads_used = 0;
  {
    py::gil_scoped_release release;
    ok = mf::compat_grad_rows(a, isa.c_str(), &threads_used);
  }
  if (!ok) fail("isa '" + isa + "' is not available on this CPU (have: " + mf::available_isas() + ")");
  return threads_used;
}

void check_test_args(uintptr_t src, uintptr_t dst, int64_t n) {
  if (!src || !dst) fail("null pointer");
  if (n < 0) fail("n must be >= 0");
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "muscle_fast native CPU kernels (pointer-level API; use muscle_fast.ops.compat_loss.native)";
  // The row contract's numbers, compared with muscle_fast/ops/compat_loss/contract.py at import.
  m.attr("N_STATS") = static_cast<int>(mf::kStatCols);
  m.attr("N_PARTIALS") = static_cast<int>(mf::kPartialCols);
  m.attr("N_ROW_CONSTS") = static_cast<int>(mf::kRowConsts);
  m.attr("N_SPARSE_COLS") = static_cast<int>(mf::kSparseCols);
  py::dict modes;
  modes["GIVEN"] = static_cast<int>(mf::kMaskGiven);
  modes["MUSCLE"] = static_cast<int>(mf::kMuscle);
  modes["OLD_CORRECT"] = static_cast<int>(mf::kOldCorrect);
  modes["TOKEN_LIKELIHOOD"] = static_cast<int>(mf::kTokenLikelihood);
  modes["ALL_OLD"] = static_cast<int>(mf::kAllOld);
  m.attr("MASK_MODES") = modes;
  m.def("compat_loss_rows", &compat_loss_rows, py::arg("B"), py::arg("T"), py::arg("V"),
        py::arg("logits"), py::arg("logits_dtype"), py::arg("logits_strides"), py::arg("labels"),
        py::arg("old_logits"), py::arg("old_dtype"), py::arg("old_strides"), py::arg("new_logits"),
        py::arg("new_dtype"), py::arg("new_strides"), py::arg("mask"), py::arg("grad"),
        py::arg("grad_dtype"), py::arg("grad_strides"), py::arg("row_stats"), py::arg("scale"),
        py::arg("mask_mode"), py::arg("inv_temperature"), py::arg("kl_weight"),
        py::arg("ce_weight"), py::arg("ignore_index"), py::arg("old_label_logprob"),
        py::arg("num_threads"), py::arg("isa") = "",
        py::arg("old_sparse") = SparseArg{0, 0, 0, 0}, py::arg("new_sparse") = SparseArg{0, 0, 0, 0},
        "Row kernel of compat_loss (see ops/compat_loss/README.md). Pointers are addresses, 0 "
        "for None; strides are in elements; dtype codes 0 float32, 1 bfloat16, 2 float16. "
        "old_sparse / new_sparse: (idx int32 [B*T, k], lp float32 [B*T, k], row float32 "
        "[B*T, 3], k) of a teacher given sparsely, zeros for none. "
        "Returns the number of threads that ran.");
  m.def("compat_partials", &compat_partials, py::arg("B"), py::arg("T"), py::arg("V"),
        py::arg("logits"), py::arg("logits_dtype"), py::arg("logits_strides"), py::arg("labels"),
        py::arg("old_logits"), py::arg("old_dtype"), py::arg("old_strides"), py::arg("new_logits"),
        py::arg("new_dtype"), py::arg("new_strides"), py::arg("partials"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("old_at_one"),
        py::arg("num_threads"), py::arg("isa") = "",
        "Vocabulary-parallel partials kernel (see ops/compat_loss/README.md): writes float32 "
        "[B*T, 15] at `partials`. Labels are local ids. Returns the number of threads that ran.");
  m.def("compat_grad_rows", &compat_grad_rows, py::arg("B"), py::arg("T"), py::arg("V"),
        py::arg("logits"), py::arg("logits_dtype"), py::arg("logits_strides"), py::arg("labels"),
        py::arg("old_logits"), py::arg("old_dtype"), py::arg("old_strides"), py::arg("new_logits"),
        py::arg("new_dtype"), py::arg("new_strides"), py::arg("grad"), py::arg("grad_dtype"),
        py::arg("grad_strides"), py::arg("consts"), py::arg("inv_temperature"),
        py::arg("has_kl"), py::arg("has_ce"), py::arg("num_threads"), py::arg("isa") = "",
        "Vocabulary-parallel gradient kernel (see ops/compat_loss/README.md): the gradient from "
        "float32 row constants [B*T, 8]; grad may be logits. Returns the number of threads that ran.");
  m.def("best_isa", &mf::best_isa, "The instruction set compat_loss_rows uses by default.");
  m.def("available_isas", [] {
    py::list out;
    std::string s = mf::available_isas();
    size_t start = 0;
    while (start <= s.size()) {
      size_t end = s.find(',', start);
      if (end == std::string::npos) end = s.size();
      out.append(s.substr(start, end - start));
      start = end + 1;
    }
    return out;
  });
  m.def("_convert", [](uintptr_t src, int src_dtype, uintptr_t dst, int dst_dtype, int64_t n,
                       const std::string& isa) {
    check_test_args(src, dst, n);
    auto ok_dtype = [](int d) { return d >= 0 && d <= 2; };
    if (!ok_dtype(src_dtype) || !ok_dtype(dst_dtype)) fail("dtype code must be 0, 1 or 2");
    bool ok;
    {
      py::gil_scoped_release release;
      ok = mf::convert(ptr<const void>(src), src_dtype, ptr<void>(dst), dst_dtype, n, isa.c_str());
    }
    if (!ok) fail("isa '" + isa + "' is not available");
  }, py::arg("src"), py::arg("src_dtype"), py::arg("dst"), py::arg("dst_dtype"), py::arg("n"),
     py::arg("isa") = "", "Test hook: element-wise dtype conversion (round to nearest even).");
  m.def("_exp", [](uintptr_t src, uintptr_t dst, int64_t n, const std::string& isa) {
    check_test_args(src, dst, n);
    bool ok;
    {
      py::gil_scoped_release release;
      ok = mf::exp_f32(ptr<const float>(src), ptr<float>(dst), n, isa.c_str());
    }
    if (!ok) fail("isa '" + isa + "' is not available");
  }, py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("isa") = "",
     "Test hook: the kernel's float32 exp.");
}
