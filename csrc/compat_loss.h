// Native CPU backend of the compat_loss row contract (muscle_fast/ops/compat_loss/README.md).
//
// Tensors cross as raw pointers, sizes, strides in elements and dtype codes; no libtorch.
// compat_loss.cpp is compiled once per instruction set (namespace baseline / avx2 / avx512);
// compat_loss_rows() (and the vocabulary-parallel compat_partials() and compat_grad_rows()) pick
// the best one the running CPU supports.
#pragma once

#include <cstdint>

namespace mf {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum MaskMode : int { kMaskGiven = 0, kMuscle = 1, kOldCorrect = 2, kTokenLikelihood = 3, kAllOld = 4 };

// Column names of the three per-row tensors (contract.py's Stat, Partial, RowConst).
enum StatCol : int {
  kLoss = 0, kToOld, kHitStudent, kHitOld, kHitNew, kKlOld, kKlNew, kCe, kOldLogp, kStatCols
};
// vocabulary parallel: partial statistics per row (kOA, kWA: the KL partial, relative to this
// slice's maxima of teacher and student; README.md)
enum PartialCol : int {
  kZMax = 0, kZArg, kZSt, kZS1, kZY, kOMax, kOArg, kOS, kOA, kOS1, kOY, kWMax, kWArg, kWS, kWA,
  kPartialCols
};
// vocabulary parallel: gradient constants per row
enum RowConstCol : int { kZRef = 0, kSt, kS1, kTRef, kStt, kCKl, kCCe, kSel, kRowConsts };

// A sparse teacher (README.md, "Sparse teachers"): per row k distinct ids in ascending order,
// their log-probabilities at the loss's temperature, and three row scalars (contract.py SparseCol).
enum SparseCol : int { kTail = 0, kArgmax, kLabelLp, kSparseCols };
struct SparseOperand {
  const int32_t* idx = nullptr;  // [B*T, k], nullptr: the teacher is dense (or absent)
  const float* lp = nullptr;     // [B*T, k]
  const float* row = nullptr;    // [B*T, kSparseCols]
  int64_t k = 0;
};

struct Operand {           // a [B, T, V] tensor with stride(-1) == 1
  const void* data = nullptr;
  int dtype = kFloat32;
  int64_t s0 = 0, s1 = 0;  // strides of the B and T dims, in elements
};

struct RowArgs {
  int64_t B = 0, T = 0, V = 0;
  Operand z, o, w;         // student, old teacher (nullable), new teacher (nullable)
  SparseOperand so, sw;    // a teacher given sparsely instead of o / w (at most one of each pair)
  void* g = nullptr;       // gradient, logits dtype, may alias z.data; nullable
  int64_t g_s0 = 0, g_s1 = 0;
  const int64_t* labels = nullptr;  // [B*T]
  const float* mask = nullptr;      // [B*T], read when mask_mode == kMaskGiven
  float* stats = nullptr;           // [B*T, 9]
  float scale = 1.f, inv_t = 1.f, kl_w = 1.f, ce_w = 0.f;
  int64_t ignore_index = -100;
  int mask_mode = kMuscle;
  bool old_label_logprob = false;
  int num_threads = 1;
};

// Vocabulary parallel (README.md): one rank's column slice; labels are local ids.
struct PartialArgs {
  int64_t B = 0, T = 0, V = 0;
  Operand z, o, w;                  // student, old teacher (nullable), new teacher (nullable)
  const int64_t* labels = nullptr;  // [B*T]
  float* partials = nullptr;        // [B*T, 15]
  float inv_t = 1.f;
  int64_t ignore_index = -2;
  bool old_at_one = false;
  int num_threads = 1;
};

struct GradRowsArgs {
  int64_t B = 0, T = 0, V = 0;
  Operand z, o, w;                  // student, old teacher (nullable), new teacher (nullable)
  void* g = nullptr;                // gradient, logits dtype, may alias z.data
  int64_t g_s0 = 0, g_s1 = 0;
  const int64_t* labels = nullptr;  // [B*T]
  const float* consts = nullptr;    // [B*T, 8]
  float inv_t = 1.f;
  bool has_kl = false, has_ce = false;
  int num_threads = 1;
};

// nullptr when args satisfy the contract, else a message naming the bad argument.
const char* validate(const RowArgs& a);
const char* validate(const PartialArgs& a);
const char* validate(const GradRowsArgs& a);  // also reads consts' sel column

// isa: "" picks the best supported; else one of available_isas(). Returns false on an unknown or
// unsupported isa. Arguments must have passed validate(). threads_used: the threads that ran.
bool compat_loss_rows(const RowArgs& a, const char* isa = "", int* threads_used = nullptr);
bool compat_partials(const PartialArgs& a, const char* isa = "", int* threads_used = nullptr);
bool compat_grad_rows(const GradRowsArgs& a, const char* isa = "", int* threads_used = nullptr);
const char* best_isa();
const char* available_isas();  // comma separated, best last

// Test hooks: element-wise conversion between dtype codes and the vectorised exp.
bool convert(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n, const char* isa);
bool exp_f32(const float* src, float* dst, int64_t n, const char* isa);

#define MF_DECLARE_ISA(ns)                                                                  \
  namespace ns {                                                                            \
  int run(const RowArgs& a);                                                                \
  int run_partials(const PartialArgs& a);                                                   \
  int run_grad_rows(const GradRowsArgs& a);                                                 \
  void convert(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n);        \
  void exp_f32(const float* src, float* dst, int64_t n);                                    \
  }
MF_DECLARE_ISA(baseline)
#if defined(MF_HAVE_X86_DISPATCH)
MF_DECLARE_ISA(avx2)
MF_DECLARE_ISA(avx512)
#endif
#undef MF_DECLARE_ISA

}  // namespace mf
