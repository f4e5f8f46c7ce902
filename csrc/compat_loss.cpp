// Native CPU row kernel of compat_loss; the math and the contract are in
// muscle_fast/ops/compat_loss/README.md.
//
// Each row is walked in chunks of CH columns. A chunk is converted to float32 in a thread-local
// buffer (fp32 is read in place), its max is taken first, then exp sums are taken relative to the
// running max. The loops use GCC/Clang vector extensions with L lanes (one register of the ISA),
// so they are SIMD whatever the auto-vectoriser decides. Block sums are float32 lanes, row sums
// double. This file is compiled once per ISA, into namespace mf::MF_ISA; the build with
// MF_PRIMARY also holds validation and runtime dispatch.
#include "compat_loss.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "thread_pool.h"

#if defined(MF_HAVE_X86_DISPATCH)
#include <cpuid.h>
#endif

#ifndef MF_ISA
#define MF_ISA baseline
#endif

namespace mf {
namespace MF_ISA {
namespace {

constexpr int CH = 1024;  // columns per chunk (a multiple of L)
// SIMD width in floats: one register of the ISA this file is compiled for
#if defined(__AVX512F__)
constexpr int L = 16;
#elif defined(__AVX__)
constexpr int L = 8;
#else
constexpr int L = 4;
#endif
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// GCC/Clang vector extensions: explicit SIMD that does not depend on the auto-vectoriser.
typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));
typedef uint32_t vu __attribute__((vector_size(4 * L)));
typedef uint16_t vh __attribute__((vector_size(2 * L)));

inline vf splat(float c) { return vf{} + c; }
inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// n < L valid elements, the rest `pad` (-inf: exp gives 0, max ignores it)
inline vf ld_tail(const float* p, int n, float pad) {
  alignas(64) float t[L];
  for (int i = 0; i < L; ++i) t[i] = i < n ? p[i] : pad;
  return ld(t);
}
inline vf ld_any(const float* p, int j, int n) { return j + L <= n ? ld(p + j) : ld_tail(p + j, n - j, -kInf); }
inline double hsum(vf v) {
  double s = 0;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
}

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// exp for float32 lanes: 2^n * e^r with |r| <= ln2/2 (Cody-Waite split of ln2), e^r by its
// degree-7 Taylor polynomial (truncation < 6e-9 relative); <= 2 ulp measured. Exact 0 below -87
// (so exp(-inf) is 0), +inf above 88 (callers pass x <= 0), NaN in gives NaN out.
inline vf vexp(vf x) {
  const vf lo = splat(-87.0f), hi = splat(88.0f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf t = xc * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
  const vf n = t - 12582912.0f;
  const vi ni = (vi)((vu)t - 0x4b400000u);
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.984126984e-4f);
  p = p * r + 1.388888889e-3f;
  p = p * r + 8.333333333e-3f;
  p = p * r + 4.166666667e-2f;
  p = p * r + 1.666666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vf y = p * (vf)((vu)(ni + 127) << 23);
  y = x < lo ? splat(0.0f) : y;
  y = x > hi ? splat(kInf) : y;
  return y;
}

inline vf bf16_to_f(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }

inline vh f_to_bf16(vf f) {  // round to nearest even; NaN stays NaN (quieted)
  const vu u = (vu)f;
  const vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu q = (u >> 16) | 0x40u;
  return __builtin_convertvector((u & 0x7fffffffu) > 0x7f800000u ? q : r, vh);
}

inline vf f16_to_f(vh h16) {
  const vu h = __builtin_convertvector(h16, vu);
  const vu sign = (h & 0x8000u) << 16;
  const vu em = h & 0x7fffu;
  // exponent field moved into place, then 2^112 rebiases 15 -> 127 and normalises subnormals
  vu bits = (vu)((vf)(em << 13) * 5.192296858534828e33f);
  bits = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : bits;
  return (vf)(bits | sign);
}

inline vh f_to_f16(vf f) {  // round to nearest even, overflow to inf, NaN to quiet NaN
  const vu u = (vu)f;
  const vu sign = (u >> 16) & 0x8000u;
  const vu a = u & 0x7fffffffu;
  const vu normal = (a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13;
  // below 2^-14: adding 0.5f makes the FPU round at 2^-24, the fp16 subnormal step
  const vu sub = (vu)((vf)a + 0.5f) - 0x3f000000u;
  vu h = a < 0x38800000u ? sub : normal;
  h = a >= 0x477ff000u ? (vu{} + 0x7c00u) : h;
  h = a > 0x7f800000u ? (vu{} + 0x7e00u) : h;
  return __builtin_convertvector(h | sign, vh);
}

inline vh ldh(const uint16_t* p) { vh v; std::memcpy(&v, p, sizeof v); return v; }
inline void sth(uint16_t* p, vh v) { std::memcpy(p, &v, sizeof v); }

// Chunk of n <= CH columns as float32: fp32 is read in place, 16-bit types are converted.
inline const float* load(const void* base, int dtype, int64_t off, int n, float* buf) {
  if (dtype == kFloat32) return static_cast<const float*>(base) + off;
  const uint16_t* s = static_cast<const uint16_t*>(base) + off;
  const bool bf = dtype == kBFloat16;
  int j = 0;
  for (; j + L <= n; j += L) st(buf + j, bf ? bf16_to_f(ldh(s + j)) : f16_to_f(ldh(s + j)));
  if (j < n) {
    alignas(64) uint16_t t[L] = {};
    std::memcpy(t, s + j, sizeof(uint16_t) * (n - j));
    alignas(64) float o[L];
    st(o, bf ? bf16_to_f(ldh(t)) : f16_to_f(ldh(t)));
    std::memcpy(buf + j, o, sizeof(float) * (n - j));
  }
  return buf;
}

inline void store(void* base, int dtype, int64_t off, int n, const float* src) {
  if (dtype == kFloat32) {
    float* d = static_cast<float*>(base) + off;
    if (d != src) std::memcpy(d, src, sizeof(float) * n);
    return;
  }
  uint16_t* d = static_cast<uint16_t*>(base) + off;
  const bool bf = dtype == kBFloat16;
  int j = 0;
  for (; j + L <= n; j += L) sth(d + j, bf ? f_to_bf16(ld(src + j)) : f_to_f16(ld(src + j)));
  if (j < n) {
    alignas(64) uint16_t t[L];
    const vf v = ld_tail(src + j, n - j, 0.0f);
    sth(t, bf ? f_to_bf16(v) : f_to_f16(v));
    std::memcpy(d + j, t, sizeof(uint16_t) * (n - j));
  }
}

inline void fill(void* base, int dtype, int64_t off, int64_t n, float v) {
  if (dtype == kFloat32) {
    std::fill_n(static_cast<float*>(base) + off, n, v);
  } else {
    const vf x = splat(v);
    const uint16_t h = dtype == kBFloat16 ? f_to_bf16(x)[0] : f_to_f16(x)[0];
    std::fill_n(static_cast<uint16_t*>(base) + off, n, h);
  }
}

// max of x[0, n) and the first index where it occurs (0 when every entry is -inf or NaN)
inline float chunk_max(const float* x, int n, int* first) {
  vf m = splat(-kInf);
  vi idx = vi{};
  vi lane;
  for (int i = 0; i < L; ++i) lane[i] = i;
  for (int j = 0; j < n; j += L) {
    const vf v = ld_any(x, j, n);
    const vi gt = v > m;
    m = gt ? v : m;
    idx = gt ? lane + j : idx;
  }
  float best = -kInf;
  int at = 0;
  for (int i = 0; i < L; ++i) {
    if (m[i] > best || (m[i] == best && idx[i] < at)) {
      best = m[i];
      at = idx[i];
    }
  }
  *first = at;
  return best;
}

// How exp at T = 1 is obtained: 0 not needed, 1 equals the exp at T (T == 1), 2 square of it
// (T == 2), 3 its own exp.
inline int t1_variant(bool needed, float k) {
  if (!needed) return 0;
  if (k == 1.0f) return 1;
  if (k == 0.5f) return 2;
  return 3;
}

struct Stream {
  float m = -kInf;       // running max (raw logits)
  int64_t arg = 0;       // first index of the max
  float lab = kNaN;      // x[y], found by column comparison
  double s = 0, s1 = 0;  // sum exp((x - m) k), sum exp(x - m)
  // teachers only: sum exp((x - m) k) ((x - ref) - (z - zref)) k, zref = the student's ref():
  // every term is formed from differences to the row maxima (README.md, "Math per row")
  double A = 0;

  float ref() const { return m == -kInf ? 0.0f : m; }
  // x[y] - ref - log sum exp(x - ref) = log_softmax(x)[y], without forming a large lse
  double label_logp() const {
    return (static_cast<double>(lab) - ref()) - std::log(s1);
  }

  // max of the chunk, first-index argmax, label lookup, rescale of the sums on a new max
  void observe(const float* x, int n, int64_t c0, int64_t y, float k) {
    int j;
    const float cm = chunk_max(x, n, &j);
    if (cm > m) {
      arg = c0 + j;
      const double d = static_cast<double>(m) - static_cast<double>(cm);
      const double f = std::exp(d * k);
      // (x - ref) falls by -d for every term so far; f == 0 (also m == -inf, where s == 0):
      // the terms so far are negligible
      A = f == 0.0 ? 0.0 : f * (A + s * d * k);
      s *= f;
      s1 *= std::exp(d);
      m = cm;
    }
    if (y >= c0 && y < c0 + n) lab = x[y - c0];  // y is proven in this chunk before the read
  }
};

// A block's sum is taken in float lanes (MF_BLOCK_ADDS = 16 additions per lane); block sums go to the
// double row sums. Error of a row sum: about 16 float additions, whatever V.
#ifndef MF_BLOCK_ADDS
#define MF_BLOCK_ADDS 16
#endif
constexpr int BLK = MF_BLOCK_ADDS * L;

template <int V1>
inline void sum_student(const float* x, int n, float ref, float k, Stream& sm) {
  const vf vref = splat(ref);
  for (int b0 = 0; b0 < n; b0 += BLK) {
    const int b1 = std::min(n, b0 + BLK);
    vf a = vf{}, b = vf{};
    for (int j = b0; j < b1; j += L) {
      const vf d = ld_any(x, j, n) - vref;
      const vf e = V1 == 1 ? vexp(d) : vexp(d * k);
      a += e;
      if (V1 == 2) b += e * e;
      if (V1 == 3) b += vexp(d);
    }
    sm.s += hsum(a);
    sm.s1 += V1 == 1 ? 0.0 : hsum(b);
  }
  if (V1 == 1) sm.s1 = sm.s;
}

template <int V1>
inline void sum_teacher(const float* t, const float* z, int n, float ref, float zref, float k,
                        Stream& sm) {
  const vf vref = splat(ref), vzref = splat(zref), zero = vf{};
  for (int b0 = 0; b0 < n; b0 += BLK) {
    const int b1 = std::min(n, b0 + BLK);
    vf a = vf{}, b = vf{}, c = vf{};
    for (int j = b0; j < b1; j += L) {
      const vf tv = ld_any(t, j, n), zv = ld_any(z, j, n);
      const vf d = tv - vref;
      const vf e = V1 == 1 ? vexp(d) : vexp(d * k);
      a += e;
      // p_t = 0 terms are 0 even where z - zref is -inf or NaN (t = z = -inf)
      c += e > zero ? e * ((d - (zv - vzref)) * k) : zero;
      if (V1 == 2) b += e * e;
      if (V1 == 3) b += vexp(d);
    }
    sm.s += hsum(a);
    sm.A += hsum(c);
    if (V1 >= 2) sm.s1 += hsum(b);
  }
}

inline void sum_student_v(int v1, const float* x, int n, float ref, float k, Stream& sm) {
  switch (v1) {
    case 1: sum_student<1>(x, n, ref, k, sm); break;
    case 2: sum_student<2>(x, n, ref, k, sm); break;
    default: sum_student<3>(x, n, ref, k, sm); break;
  }
}

inline void sum_teacher_v(int v1, const float* t, const float* z, int n, float ref, float zref,
                          float k, Stream& sm) {
  switch (v1) {
    case 0: sum_teacher<0>(t, z, n, ref, zref, k, sm); break;
    case 1: sum_teacher<1>(t, z, n, ref, zref, k, sm); sm.s1 = sm.s; break;
    case 2: sum_teacher<2>(t, z, n, ref, zref, k, sm); break;
    default: sum_teacher<3>(t, z, n, ref, zref, k, sm); break;
  }
}

struct GradCoef {
  float zref, tref, k;
  float akl;  // kl_w * k * scale
  float rzT;  // 1 / sum exp((z - zref) k)
  float rt;   // 1 / sum exp((t - tref) k)
  float c1;   // ce_w * scale / sum exp(z - zref)
};

// out = akl (softmax(z k) - softmax(t k)) + ce_w scale softmax(z); the one-hot term is added by
// the caller. V1 as in t1_variant. out may be z itself (each lane is read before it is written).
// TCH false leaves softmax(t k) out (a KL term without a teacher: vocabulary parallel sel == 0).
template <bool KL, bool CE, bool TCH, int V1>
inline void grad_chunk(const float* z, const float* t, float* out, int n, const GradCoef& g) {
  const vf zref = splat(g.zref), tref = splat(g.tref);
  for (int j = 0; j < n; j += L) {
    const vf d = ld_any(z, j, n) - zref;
    const vf eT = (KL || V1 != 3) ? (V1 == 1 ? vexp(d) : vexp(d * g.k)) : vf{};
    vf r = vf{};
    if (KL) {
      if (TCH) r = g.akl * (eT * g.rzT - vexp((ld_any(t, j, n) - tref) * g.k) * g.rt);
      else r = g.akl * (eT * g.rzT);
    }
    if (CE) {
      const vf e1 = V1 == 1 ? eT : V1 == 2 ? eT * eT : vexp(d);
      r += g.c1 * e1;
    }
    if (j + L <= n) {
      st(out + j, r);
    } else {
      for (int i = 0; i < n - j; ++i) out[j + i] = r[i];
    }
  }
}

template <bool KL, bool CE, bool TCH>
inline void grad_chunk_t(int v1, const float* z, const float* t, float* out, int n,
                         const GradCoef& g) {
  switch (v1) {
    case 1: grad_chunk<KL, CE, TCH, 1>(z, t, out, n, g); break;
    case 2: grad_chunk<KL, CE, TCH, 2>(z, t, out, n, g); break;
    default: grad_chunk<KL, CE, TCH, 3>(z, t, out, n, g); break;
  }
}

// t == nullptr: no teacher term (only meaningful with KL)
template <bool KL, bool CE>
inline void grad_chunk_v(int v1, const float* z, const float* t, float* out, int n,
                         const GradCoef& g) {
  if (KL && !t) grad_chunk_t<KL, CE, false>(v1, z, t, out, n, g);
  else grad_chunk_t<KL, CE, true>(v1, z, t, out, n, g);
}

struct Buffers {
  alignas(64) float z[CH];
  alignas(64) float o[CH];
  alignas(64) float w[CH];
  alignas(64) float g[CH];
  std::vector<float> zk[2];  // a sparse teacher's student logits z[idx] (old, new)
};

// The student's stream over the columns outside a sparse teacher's ids K (README.md, "Sparse
// teachers"): running max m and sum exp((z - m) k) of those columns only, so that Q_tail is a
// sum of its own terms, never 1 - sum_K q (which cancels when K holds the student's mass).
struct Tail {
  float m = -kInf;
  double s = 0;
  int64_t p = 0;  // the next of the row's ascending ids

  float ref() const { return m == -kInf ? 0.0f : m; }

  void observe(const float* xz, int n, int64_t c0, const int32_t* ids, int64_t nk, float k,
               float* tmp) {
    std::memcpy(tmp, xz, sizeof(float) * n);
    for (; p < nk && ids[p] < c0 + n; ++p) tmp[ids[p] - c0] = -kInf;
    int j;
    const float cm = chunk_max(tmp, n, &j);
    if (cm > m) {
      s *= std::exp((static_cast<double>(m) - cm) * k);
      m = cm;
    }
    const vf vref = splat(ref());
    for (int b0 = 0; b0 < n; b0 += BLK) {
      const int b1 = std::min(n, b0 + BLK);
      vf a = vf{};
      for (int jj = b0; jj < b1; jj += L) {
        const vf d = ld_any(tmp, jj, n) - vref;
        a += k == 1.0f ? vexp(d) : vexp(d * k);
      }
      s += hsum(a);
    }
  }
};

inline float load1(const Operand& x, int64_t off) {
  if (x.dtype == kFloat32) return static_cast<const float*>(x.data)[off];
  const uint16_t h = static_cast<const uint16_t*>(x.data)[off];
  vh v{};
  v[0] = h;
  return x.dtype == kBFloat16 ? bf16_to_f(v)[0] : f16_to_f(v)[0];
}

// One sparse teacher of one row, after the student's stream: its KL over the k + 1 categories
// (the k ids and the tail bucket) and what its gradient needs.
struct SparseRow {
  const int32_t* ids = nullptr;
  const float* lp = nullptr;
  const float* scalars = nullptr;  // SparseCol
  int64_t k = 0;
  float* zk = nullptr;             // z[ids]
  double kl = 0;
  float tref = 0, rt = 0;          // tail target exp((z - tref) k) * rt outside K

  int64_t argmax() const { return static_cast<int64_t>(scalars[kArgmax]); }

  void finish(const Operand& z, int64_t zoff, const Stream& Z, const Tail& tl, float kT) {
    const double log_sz = std::log(Z.s), zref = Z.ref();
    double acc = 0;
    for (int64_t j = 0; j < k; ++j) {
      zk[j] = load1(z, zoff + ids[j]);
      const double p = std::exp(static_cast<double>(lp[j]));
      // p == 0 terms are 0, also against a -inf student logit
      if (p > 0) acc += p * (static_cast<double>(lp[j]) - ((zk[j] - zref) * kT - log_sz));
    }
    const double tail = scalars[kTail], p_tail = std::exp(tail);
    tref = Z.ref();
    rt = 0.0f;
    if (p_tail > 0) {
      if (tl.s > 0) {
        const double log_qt = (static_cast<double>(tl.ref()) - zref) * kT + std::log(tl.s) - log_sz;
        acc += p_tail * (tail - log_qt);
        tref = tl.ref();
        rt = static_cast<float>(p_tail / tl.s);
      } else {
        acc = kInf;  // tail mass where the student has none
      }
    }
    kl = acc;
  }
};

// One pass over a row's columns, chunk by chunk: the student's and each given teacher's stream
// (max, first argmax, label value, exp sums relative to the running max, KL partial A).
void stream_row(const Operand& z, const Operand& o, const Operand& w, int64_t zoff,
                int64_t ooff, int64_t woff, int64_t V, int64_t y, float k, int vz, int vo,
                Buffers& buf, Stream& Z, Stream& O, Stream& W, SparseRow* st = nullptr,
                Tail* to = nullptr, SparseRow* sw = nullptr, Tail* tw = nullptr) {
  for (int64_t c0 = 0; c0 < V; c0 += CH) {
    const int n = static_cast<int>(std::min<int64_t>(CH, V - c0));
    const float* xz = load(z.data, z.dtype, zoff + c0, n, buf.z);
    const float zref0 = Z.ref();
    Z.observe(xz, n, c0, y, k);
    sum_student_v(vz, xz, n, Z.ref(), k, Z);
    // a new student max: (z - zref) falls by dz for every teacher term so far
    const double dz = (static_cast<double>(Z.ref()) - zref0) * k;
    if (o.data) {
      O.A += O.s * dz;
      const float* xo = load(o.data, o.dtype, ooff + c0, n, buf.o);
      O.observe(xo, n, c0, y, k);
      sum_teacher_v(vo, xo, xz, n, O.ref(), Z.ref(), k, O);
    }
    if (w.data) {
      W.A += W.s * dz;
      const float* xw = load(w.data, w.dtype, woff + c0, n, buf.w);
      W.observe(xw, n, c0, y, k);
      sum_teacher_v(0, xw, xz, n, W.ref(), Z.ref(), k, W);
    }
    // a sparse teacher reads nothing of its own here: the student's columns outside its ids
    if (st) to->observe(xz, n, c0, st->ids, st->k, k, buf.o);
    if (sw) tw->observe(xz, n, c0, sw->ids, sw->k, k, buf.w);
  }
}

void row(const RowArgs& a, int64_t i, Buffers& buf) {
  const int64_t V = a.V;
  const int64_t b = i / a.T, tt = i % a.T;
  float* st = a.stats + i * kStatCols;
  const int64_t y = a.labels[i];
  const int64_t goff = b * a.g_s0 + tt * a.g_s1;
  if (y == a.ignore_index) {
    for (int c = 0; c < kStatCols; ++c) st[c] = 0.0f;
    if (a.g) fill(a.g, a.z.dtype, goff, V, 0.0f);
    return;
  }
  const bool bad = y < 0 || y >= V;
  // a teacher is dense (its logits row is streamed) or sparse (k ids; the student's columns
  // outside them are streamed as its Tail)
  const bool sp_o = a.so.idx != nullptr, sp_w = a.sw.idx != nullptr;
  const bool has_o = a.o.data != nullptr || sp_o, has_w = a.w.data != nullptr || sp_w;
  const float k = a.inv_t;
  const bool need_o1 = has_o && (a.mask_mode == kTokenLikelihood || a.old_label_logprob);
  const int vz = t1_variant(true, k), vo = t1_variant(need_o1 && !sp_o, k);
  const int64_t zoff = b * a.z.s0 + tt * a.z.s1;
  const int64_t ooff = b * a.o.s0 + tt * a.o.s1;
  const int64_t woff = b * a.w.s0 + tt * a.w.s1;

  Stream Z, O, W;
  Tail TO, TW;
  SparseRow SO, SW;
  const auto sparse_of = [&](const SparseOperand& x, SparseRow& r, std::vector<float>& zk) {
    r.ids = x.idx + i * x.k;
    r.lp = x.lp + i * x.k;
    r.scalars = x.row + i * kSparseCols;
    r.k = x.k;
    zk.resize(static_cast<size_t>(x.k));
    r.zk = zk.data();
  };
  if (sp_o) sparse_of(a.so, SO, buf.zk[0]);
  if (sp_w) sparse_of(a.sw, SW, buf.zk[1]);
  stream_row(a.z, a.o, a.w, zoff, ooff, woff, V, y, k, vz, vo, buf, Z, O, W,
             sp_o ? &SO : nullptr, &TO, sp_w ? &SW : nullptr, &TW);
  if (sp_o) SO.finish(a.z, zoff, Z, TO, k);
  if (sp_w) SW.finish(a.z, zoff, Z, TW, k);

  // O(1) quantities only: differences to the row maxima and logs of sums relative to them
  const double log_zT = std::log(Z.s);
  const double z_logp = Z.label_logp();  // NaN for a bad label
  const double ce = -z_logp;
  const double kl_old = sp_o ? SO.kl : has_o ? O.A / O.s - std::log(O.s) + log_zT : 0.0;
  const double kl_new = sp_w ? SW.kl : has_w ? W.A / W.s - std::log(W.s) + log_zT : 0.0;
  const double old_logp =
      !need_o1 ? 0.0 : sp_o ? static_cast<double>(SO.scalars[kLabelLp]) : O.label_logp();
  const int64_t o_arg = sp_o ? SO.argmax() : O.arg, w_arg = sp_w ? SW.argmax() : W.arg;

  bool m;
  switch (a.mask_mode) {
    case kMaskGiven: m = a.mask[i] != 0.0f; break;
    case kMuscle: m = Z.arg != y; break;
    case kOldCorrect: m = has_o && o_arg == y; break;
    case kTokenLikelihood: m = z_logp < old_logp; break;
    default: m = true; break;
  }
  const bool has_t = m ? has_o : has_w;
  const bool kl_on = a.kl_w != 0.0f && has_t;
  const SparseRow* sp_t = !kl_on ? nullptr : m ? (sp_o ? &SO : nullptr) : (sp_w ? &SW : nullptr);
  const Stream* teacher = m ? &O : &W;
  const bool ce_on = a.ce_w != 0.0f;
  double loss = 0.0;
  if (kl_on) loss += static_cast<double>(a.kl_w) * (m ? kl_old : kl_new);
  if (ce_on) loss += static_cast<double>(a.ce_w) * ce;
  if (bad) loss = kNaN;

  st[kLoss] = static_cast<float>(loss);
  st[kToOld] = m ? 1.0f : 0.0f;
  st[kHitStudent] = Z.arg == y ? 1.0f : 0.0f;
  st[kHitOld] = has_o && o_arg == y ? 1.0f : 0.0f;
  st[kHitNew] = has_w && w_arg == y ? 1.0f : 0.0f;
  st[kKlOld] = static_cast<float>(kl_old);
  st[kKlNew] = static_cast<float>(kl_new);
  st[kCe] = static_cast<float>(ce);
  st[kOldLogp] = static_cast<float>(old_logp);

  if (!a.g) return;
  if (bad) {
    fill(a.g, a.z.dtype, goff, V, kNaN);
    return;
  }
  GradCoef g{};
  g.zref = Z.ref();
  g.k = k;
  g.rzT = static_cast<float>(1.0 / Z.s);
  g.c1 = static_cast<float>(static_cast<double>(a.ce_w) * a.scale / Z.s1);
  const Operand* top = nullptr;
  if (kl_on && sp_t) {
    // outside K the teacher's target is P_tail exp((z - m_tail) k) / S_tail: the dense formula
    // with the student's own chunk as the "teacher" row; the k columns of K are set after
    g.tref = sp_t->tref;
    g.rt = sp_t->rt;
    g.akl = a.kl_w * k * a.scale;
  } else if (kl_on) {
    top = m ? &a.o : &a.w;
    g.tref = teacher->ref();
    g.rt = static_cast<float>(1.0 / teacher->s);
    g.akl = a.kl_w * k * a.scale;
  }
  const int64_t toff = top ? (m ? ooff : woff) : 0;
  const float ce_scale = a.ce_w * a.scale;
  int64_t p = 0;  // the next of the sparse teacher's ascending ids
  for (int64_t c0 = 0; c0 < V; c0 += CH) {
    const int n = static_cast<int>(std::min<int64_t>(CH, V - c0));
    const float* xz = load(a.z.data, a.z.dtype, zoff + c0, n, buf.z);
    const float* xt = top ? load(top->data, top->dtype, toff + c0, n, buf.o) : sp_t ? xz : nullptr;
    // fp32 grad is written in place of its own read (one element per lane): safe when g IS z
    float* out = a.z.dtype == kFloat32 ? static_cast<float*>(a.g) + goff + c0 : buf.g;
    if (kl_on && ce_on) grad_chunk_v<true, true>(vz, xz, xt, out, n, g);
    else if (kl_on) grad_chunk_v<true, false>(vz, xz, xt, out, n, g);
    else if (ce_on) grad_chunk_v<false, true>(vz, xz, xt, out, n, g);
    else std::fill_n(out, n, 0.0f);
    // the sparse teacher's ids in this chunk: q_j - p_j (z[ids] was read in the first pass)
    for (; sp_t && p < sp_t->k && sp_t->ids[p] < c0 + n; ++p) {
      const double zj = static_cast<double>(sp_t->zk[p]) - Z.ref();
      double v = g.akl * (std::exp(zj * k) / Z.s - std::exp(static_cast<double>(sp_t->lp[p])));
      if (ce_on) v += static_cast<double>(g.c1) * std::exp(zj);
      out[sp_t->ids[p] - c0] = static_cast<float>(v);
    }
    if (ce_on && y >= c0 && y < c0 + n) out[y - c0] -= ce_scale;
    store(a.g, a.z.dtype, goff + c0, n, out);
  }
}

// Vocabulary parallel, partials kernel (README.md): the Stream sums of this rank's slice, relative
// to its own max, for the caller to rescale to the global one.
void partials_row(const PartialArgs& a, int64_t i, Buffers& buf) {
  const int64_t V = a.V;
  const int64_t b = i / a.T, tt = i % a.T;
  float* p = a.partials + i * kPartialCols;
  const int64_t y = a.labels[i];
  std::fill_n(p, kPartialCols, 0.0f);
  if (y == a.ignore_index) return;
  // not owned here (another rank's label, or out of range): the label columns stay 0
  const bool owned = y >= 0 && y < V;
  const bool has_o = a.o.data != nullptr, has_w = a.w.data != nullptr;
  const float k = a.inv_t;
  const int vz = t1_variant(true, k), vo = t1_variant(has_o && a.old_at_one, k);
  const int64_t zoff = b * a.z.s0 + tt * a.z.s1;
  const int64_t ooff = b * a.o.s0 + tt * a.o.s1;
  const int64_t woff = b * a.w.s0 + tt * a.w.s1;

  Stream Z, O, W;
  stream_row(a.z, a.o, a.w, zoff, ooff, woff, V, y, k, vz, vo, buf, Z, O, W);

  // argmax as float: exact because validate() bounds V by 2^24
  p[kZMax] = Z.m;
  p[kZArg] = static_cast<float>(Z.arg);
  p[kZSt] = static_cast<float>(Z.s);
  p[kZS1] = static_cast<float>(Z.s1);
  p[kZY] = owned ? Z.lab : 0.0f;
  if (has_o) {
    p[kOMax] = O.m;
    p[kOArg] = static_cast<float>(O.arg);
    p[kOS] = static_cast<float>(O.s);
    p[kOA] = static_cast<float>(O.A);
    if (a.old_at_one) {
      p[kOS1] = static_cast<float>(O.s1);
      p[kOY] = owned ? O.lab : 0.0f;
    }
  }
  if (has_w) {
    p[kWMax] = W.m;
    p[kWArg] = static_cast<float>(W.arg);
    p[kWS] = static_cast<float>(W.s);
    p[kWA] = static_cast<float>(W.A);
  }
}

// Vocabulary parallel, gradient kernel (README.md): the statistics come in as row constants, so
// this is the second pass of row() with GradCoef filled from them.
void grad_rows_row(const GradRowsArgs& a, int64_t i, Buffers& buf) {
  const int64_t V = a.V;
  const int64_t b = i / a.T, tt = i % a.T;
  const float* c = a.consts + i * kRowConsts;
  const float sel = c[kSel];
  const int64_t goff = b * a.g_s0 + tt * a.g_s1;
  if (sel == -1.0f) {
    fill(a.g, a.z.dtype, goff, V, 0.0f);
    return;
  }
  const int64_t y = a.labels[i];
  const float k = a.inv_t;
  const int vz = t1_variant(true, k);
  const int64_t zoff = b * a.z.s0 + tt * a.z.s1;
  // the teacher term is on only with a teacher selected; validate() proved that one is given
  const Operand* top = !a.has_kl ? nullptr : sel == 1.0f ? &a.o : sel == 2.0f ? &a.w : nullptr;
  const int64_t toff = top ? b * top->s0 + tt * top->s1 : 0;

  // no special case for NaN coefficients: c_kl or c_ce NaN turns its term, hence the row, NaN
  GradCoef g{};
  g.zref = c[kZRef];
  g.k = k;
  g.rzT = static_cast<float>(1.0 / static_cast<double>(c[kSt]));
  g.c1 = static_cast<float>(static_cast<double>(c[kCCe]) / static_cast<double>(c[kS1]));
  g.tref = c[kTRef];
  g.rt = static_cast<float>(1.0 / static_cast<double>(c[kStt]));
  g.akl = c[kCKl];
  const float ce_scale = c[kCCe];
  for (int64_t c0 = 0; c0 < V; c0 += CH) {
    const int n = static_cast<int>(std::min<int64_t>(CH, V - c0));
    const float* xz = load(a.z.data, a.z.dtype, zoff + c0, n, buf.z);
    const float* xt = top ? load(top->data, top->dtype, toff + c0, n, buf.o) : nullptr;
    // fp32 grad is written in place of its own read (one element per lane): safe when g IS z
    float* out = a.z.dtype == kFloat32 ? static_cast<float*>(a.g) + goff + c0 : buf.g;
    if (a.has_kl && a.has_ce) grad_chunk_v<true, true>(vz, xz, xt, out, n, g);
    else if (a.has_kl) grad_chunk_v<true, false>(vz, xz, xt, out, n, g);
    else if (a.has_ce) grad_chunk_v<false, true>(vz, xz, xt, out, n, g);
    else std::fill_n(out, n, 0.0f);
    if (a.has_ce && y >= c0 && y < c0 + n) out[y - c0] -= ce_scale;
    store(a.g, a.z.dtype, goff + c0, n, out);
  }
}

// Rows in chunks of `grain`, handed out dynamically to the pool's threads, one Buffers per
// thread; returns the number of threads that ran.
template <typename RowFn>
int for_rows(int64_t N, int num_threads, RowFn row_fn) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, N)));
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(16, N / (8 * nt)));
  std::atomic<int64_t> next{0};
  return thread_pool().run(nt, [&](int) {
    Buffers buf;
    for (;;) {
      const int64_t i0 = next.fetch_add(grain, std::memory_order_relaxed);
      if (i0 >= N) return;
      const int64_t i1 = std::min<int64_t>(N, i0 + grain);
      for (int64_t i = i0; i < i1; ++i) row_fn(i, buf);
    }
  });
}

}  // namespace

int run(const RowArgs& a) {
  return for_rows(a.B * a.T, a.num_threads, [&a](int64_t i, Buffers& buf) { row(a, i, buf); });
}

int run_partials(const PartialArgs& a) {
  return for_rows(a.B * a.T, a.num_threads,
                  [&a](int64_t i, Buffers& buf) { partials_row(a, i, buf); });
}

int run_grad_rows(const GradRowsArgs& a) {
  return for_rows(a.B * a.T, a.num_threads,
                  [&a](int64_t i, Buffers& buf) { grad_rows_row(a, i, buf); });
}

void convert(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n) {
  Buffers buf;
  for (int64_t c0 = 0; c0 < n; c0 += CH) {
    const int m = static_cast<int>(std::min<int64_t>(CH, n - c0));
    const float* x = load(src, src_dtype, c0, m, buf.z);
    std::memcpy(buf.g, x, sizeof(float) * m);
    store(dst, dst_dtype, c0, m, buf.g);
  }
}

void exp_f32(const float* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; j += L) {
    const int m = static_cast<int>(std::min<int64_t>(L, n - j));
    const vf y = vexp(m == L ? ld(src + j) : ld_tail(src + j, m, 0.0f));
    for (int i = 0; i < m; ++i) dst[j + i] = y[i];
  }
}

}  // namespace MF_ISA

#ifdef MF_PRIMARY

namespace {

bool ok_dtype(int d) { return d == kFloat32 || d == kBFloat16 || d == kFloat16; }

// the checks every kernel shares: sizes, the operands, inv_temperature, threads
const char* validate_common(int64_t B, int64_t T, int64_t V, const Operand& z, const Operand& o,
                            const Operand& w, const int64_t* labels, float inv_t,
                            int num_threads) {
  if (B <= 0 || T <= 0 || V <= 0) return "sizes B, T, V must be positive";
  if (B > INT64_MAX / T) return "B * T overflows int64";
  if (!z.data) return "logits pointer is null";
  if (!labels) return "labels pointer is null";
  if (!ok_dtype(z.dtype)) return "logits dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16)";
  if (o.data && !ok_dtype(o.dtype)) return "old_logits dtype code must be 0, 1 or 2";
  if (w.data && !ok_dtype(w.dtype)) return "new_logits dtype code must be 0, 1 or 2";
  if (!(inv_t > 0.0f) || !std::isfinite(inv_t)) return "inv_temperature must be finite and > 0";
  if (num_threads < 1) return "num_threads must be >= 1";
  return nullptr;
}

}  // namespace

const char* validate(const RowArgs& a) {
  if (const char* e = validate_common(a.B, a.T, a.V, a.z, a.o, a.w, a.labels, a.inv_t, a.num_threads))
    return e;
  if (!a.stats) return "row_stats pointer is null";
  if (a.mask_mode < kMaskGiven || a.mask_mode > kAllOld) return "mask_mode must be in 0..4";
  if (a.mask_mode == kMaskGiven && !a.mask) return "mask_mode 0 needs a mask pointer";
  if ((a.mask_mode == kOldCorrect || a.mask_mode == kTokenLikelihood || a.mask_mode == kAllOld ||
       a.old_label_logprob) && !a.o.data && !a.so.idx)
    return "this mask_mode (or old_label_logprob) needs old_logits";
  if (a.o.data && a.so.idx) return "old teacher given both dense and sparse";
  if (a.w.data && a.sw.idx) return "new teacher given both dense and sparse";
  for (const SparseOperand* x : {&a.so, &a.sw}) {
    if (!x->idx) continue;
    if (!x->lp || !x->row) return "a sparse teacher needs idx, lp and row pointers";
    if (x->k < 1 || x->k > a.V) return "a sparse teacher's k must lie in [1, V]";
    const int64_t N = a.B * a.T;
    for (int64_t r = 0; r < N; ++r) {  // ids decide the columns written: checked, never trusted
      const int32_t* ids = x->idx + r * x->k;
      for (int64_t j = 0; j < x->k; ++j) {
        if (ids[j] < 0 || ids[j] >= a.V || (j > 0 && ids[j] <= ids[j - 1]))
          return "a sparse teacher's ids must be distinct, ascending and in [0, V) in every row";
      }
    }
  }
  return nullptr;
}

const char* validate(const PartialArgs& a) {
  if (const char* e = validate_common(a.B, a.T, a.V, a.z, a.o, a.w, a.labels, a.inv_t, a.num_threads))
    return e;
  if (!a.partials) return "partials pointer is null";
  // the argmax columns are float32, exact for indices below 2^24
  if (a.V > (int64_t{1} << 24)) return "V must be <= 2**24 (argmax columns are float32)";
  return nullptr;
}

const char* validate(const GradRowsArgs& a) {
  if (const char* e = validate_common(a.B, a.T, a.V, a.z, a.o, a.w, a.labels, a.inv_t, a.num_threads))
    return e;
  if (!a.g) return "grad pointer is null";
  if (!a.consts) return "consts pointer is null";
  // sel decides which teacher row is read: checked here so that no row reads a missing operand
  const int64_t N = a.B * a.T;
  for (int64_t i = 0; i < N; ++i) {
    const float sel = a.consts[i * kRowConsts + kSel];
    if (!(sel == -1.0f || sel == 0.0f || sel == 1.0f || sel == 2.0f))
      return "consts[:, 7] (sel) must be -1, 0, 1 or 2";
    if (a.has_kl && sel == 1.0f && !a.o.data) return "a row with sel == 1 needs old_logits";
    if (a.has_kl && sel == 2.0f && !a.w.data) return "a row with sel == 2 needs new_logits";
  }
  return nullptr;
}

namespace {

#if defined(MF_HAVE_X86_DISPATCH)
// cpuid + xgetbv rather than __builtin_cpu_supports, which reports nothing under zig's
// compiler-rt (the manylinux wheel's compiler). The OS must also save the wider registers.
struct X86Isas {
  bool avx2 = false, avx512 = false;
};

X86Isas x86_isas() {
  X86Isas r;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return r;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!osxsave || !avx || __get_cpuid_max(0, nullptr) < 7) return r;
  unsigned xlo, xhi;
  __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const bool ymm = (xlo & 0x6u) == 0x6u, zmm = (xlo & 0xE6u) == 0xE6u;
  __cpuid_count(7, 0, a, b, c, d);
  r.avx2 = ymm && fma && f16c && (b & (1u << 5));
  r.avx512 = r.avx2 && zmm && (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) &&
             (b & (1u << 31));  // avx512 f, dq, bw, vl
  return r;
}
#endif

bool cpu_has(const char* isa) {
  if (std::strcmp(isa, "baseline") == 0) return true;
#if defined(MF_HAVE_X86_DISPATCH)
  static const X86Isas have = x86_isas();
  if (std::strcmp(isa, "avx2") == 0) return have.avx2;
  if (std::strcmp(isa, "avx512") == 0) return have.avx512;
#endif
  return false;
}

const char* pick(const char* isa) {
  if (isa && *isa) return cpu_has(isa) ? isa : nullptr;
  return best_isa();
}

}  // namespace

const char* best_isa() {
  static const char* best = cpu_has("avx512") ? "avx512" : cpu_has("avx2") ? "avx2" : "baseline";
  return best;
}

const char* available_isas() {
  static const char* list = cpu_has("avx512") ? "baseline,avx2,avx512"
                            : cpu_has("avx2") ? "baseline,avx2"
                                              : "baseline";
  return list;
}

// Runs ns::call for the picked ISA; returns false from the caller when there is none.
#if defined(MF_HAVE_X86_DISPATCH)
#define MF_DISPATCH_SET(isa, assign_call)                                      \
  do {                                                                         \
    const char* p_ = pick(isa);                                                \
    if (!p_) return false;                                                     \
    if (std::strcmp(p_, "avx512") == 0) { using namespace avx512; assign_call; } \
    else if (std::strcmp(p_, "avx2") == 0) { using namespace avx2; assign_call; } \
    else { using namespace baseline; assign_call; }                            \
  } while (0)
#else
#define MF_DISPATCH_SET(isa, assign_call)                 \
  do {                                                    \
    if (!pick(isa)) return false;                         \
    { using namespace baseline; assign_call; }            \
  } while (0)
#endif
#define MF_DISPATCH(isa, call) \
  do {                         \
    MF_DISPATCH_SET(isa, call); \
    return true;               \
  } while (0)

bool compat_loss_rows(const RowArgs& a, const char* isa, int* threads_used) {
  int used = 0;
  MF_DISPATCH_SET(isa, used = run(a));
  if (threads_used) *threads_used = used;
  return true;
}

bool compat_partials(const PartialArgs& a, const char* isa, int* threads_used) {
  int used = 0;
  MF_DISPATCH_SET(isa, used = run_partials(a));
  if (threads_used) *threads_used = used;
  return true;
}

bool compat_grad_rows(const GradRowsArgs& a, const char* isa, int* threads_used) {
  int used = 0;
  MF_DISPATCH_SET(isa, used = run_grad_rows(a));
  if (threads_used) *threads_used = used;
  return true;
}

bool convert(const void* src, int src_dtype, void* dst, int dst_dtype, int64_t n,
             const char* isa) {
  MF_DISPATCH(isa, convert(src, src_dtype, dst, dst_dtype, n));
}

bool exp_f32(const float* src, float* dst, int64_t n, const char* isa) {
  MF_DISPATCH(isa, exp_f32(src, dst, n));
}

#endif  // MF_PRIMARY

}  // namespace mf
