// Fused sparse attention on CPU: online softmax over each query tile's key list, read in place.
//
// The block-sparse engine's plan (nearfar/plan.py) gives, per tile group, the query tile ``q_idx (1, 1, c, T)`` and
// its key list ``k_idx (1, Hp, c, W)``; run-time selections (nearfar/backends/native_selected.py) give lists per batch
// item too, ``(B, Hp, c, W)``, and queries per (batch item, head) where only some rows attend. This kernel walks
// each key list in sub-blocks of 64 keys. Per (tile, sub-block) the
// caller precomputes (once per plan) the rows ``[r0, r1)`` of the tile that see any of its keys, whether all pairs
// there are allowed, and per row a 64-bit mask of the allowed keys. A sub-block no query sees is skipped and the
// score matrix covers only rows [r0, r1), so a neighbourhood's box corners and a causal diagonal cost little.
// Q/K/V rows are read from the caller's tensors through their strides (no gathered copy of K/V per tile),
// converted to float32 into small per-thread buffers, and multiplied by register-blocked micro-kernels
// (ATen's Vectorized: AVX-512 or AVX2, as built). Forward (this file): output and LSE. Backward
// (sparse_attention_backward.cpp): recomputes the scores from the LSE (flash style); dK/dV accumulate in float32
// per (batch, kv head), each owned by one thread: in the caller's float32 accumulators (float32 inputs, or split
// over ``nsplit`` of them when there are fewer owners than threads), or, for half-precision inputs, in a float32
// scratch row block per thread that every tile group adds into before it is converted into the gradients.
#include "sparse_attention.h"

#include <torch/library.h>

namespace {

using namespace nearfar_native;

// ------------------------------------------------------------------------------------------------ forward
template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Geometry& G, float scale,
                  bool accumulate, at::Tensor& out, at::Tensor& lse) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t sob = out.stride(0), soh = out.stride(1), son = out.stride(2);
  const int64_t slb = lse.stride(0), slh = lse.stride(1), sln = lse.stride(2);
  const int d = G.d, dv = G.dv, T_ = G.T, Tp = G.Tp, g = G.g;
  const int64_t dvp = G.dvp;
  const int64_t units = G.B * G.HX * G.c;
  parallel_items(units, [&](std::atomic<int64_t>& next) {
    // Qt: (d, g * Tp) scaled queries, one column per query; acc: (g * Tp, dvp); m, l, alpha: per query column
    const int64_t ldq = padded_ld(g * Tp);
    std::vector<float> Qt(d * ldq, 0.f), St(KB * padded_ld(Tp)), acc(g * Tp * dvp), m(g * Tp), l(g * Tp),
        alpha(Tp);
    std::vector<char> bad(g * Tp);
    std::vector<float> lim(Tp);
    SubBlock<T> sb(G);
    for (int64_t u = next++; u < units; u = next++) {
      const int64_t t = u % G.c, hx = (u / G.c) % G.HX, b = u / (G.c * G.HX);
      const int64_t hkv = G.kv_head(hx), pt = G.klist(b, hx, t);
      const int64_t* qi = G.qrows(b, hx, t);
      const int nv = G.row_causal ? G.tile_limits(qi, lim.data()) : 0;
      const int64_t* ki = G.k_idx + pt * G.W;
      for (int j = 0; j < g; ++j) {
        const T* qb = qp + b * G.sqb + G.head(hx, j) * G.sqh;
        for (int r = 0; r < T_; ++r) {
          float* col = Qt.data() + j * Tp + r;
          if (qi[r] < 0) {
            for (int e = 0; e < d; ++e) col[e * ldq] = 0.f;
          } else {
            const T* src = qb + qi[r] * G.sqn;
            for (int e = 0; e < d; ++e) col[e * ldq] = static_cast<float>(src[e]) * scale;
          }
        }
      }
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(bad.begin(), bad.end(), 0);
      if (accumulate) {  // continue the softmax of an earlier call over other keys: its (out, lse) as the state
        for (int j = 0; j < g; ++j) {
          const int64_t h = G.head(hx, j);
          for (int r = 0; r < T_; ++r) {
            if (qi[r] < 0) continue;
            const int idx = j * Tp + r;
            const float L = lp[b * slb + h * slh + qi[r] * sln];
            if (std::isnan(L)) {
              bad[idx] = 1;
            } else if (L != kNegInf) {
              m[idx] = L, l[idx] = 1.f;
              load_row(op + b * sob + h * soh + qi[r] * son, acc.data() + idx * dvp, dv, 1.f);
            }
          }
        }
      }
      const T* kbase = kp + b * G.skb + hkv * G.skh;
      const T* vbase = vp + b * G.svb + hkv * G.svh;
      Span sp;
      for (int64_t s = 0; s < G.nsub; ++s) {
        if (!(G.row_causal ? G.span_causal(lim.data(), nv, s, sp) : G.span(pt, s, sp))) continue;
        const int n = sp.n, mc = sp.mc, ls = sp.ld;
        sb.load(G, ki + sp.k0, n, kbase, vbase, b);
        for (int j = 0; j < g; ++j) {
          const int jc = j * Tp + sp.c0;
          masked_scores(G, sb, sp, Qt.data(), ldq, jc, b, G.head(hx, j), t, pt, ki, lim.data(), St.data());
          // per strip of VS query columns: the new running max, then exp and row sum in one pass (the strip's
          // scores are still in L1 from the max pass)
          for (int cc = 0; cc < mc; cc += VS) {
            Vec mx(kNegInf);
            for (int i = 0; i < n; ++i) mx = at::vec::maximum(mx, Vec::loadu(St.data() + i * ls + cc));
            const Vec mold = Vec::loadu(m.data() + jc + cc);
            const Vec mnew = at::vec::maximum(mold, mx);
            mnew.store(m.data() + jc + cc);
            // a column without any key so far subtracts 0 (exp(-inf) = 0); NaN/+inf are flagged below
            const Vec safe = Vec::blendv(mnew, Vec(0.f), mnew == Vec(kNegInf));
            const Vec al = Vec::blendv(exp_score(mold - safe), Vec(1.f), mold == mnew);
            al.store(alpha.data() + cc);
            Vec sum(0.f);
            for (int i = 0; i < n; ++i) {
              float* x = St.data() + i * ls + cc;
              const Vec e = exp_score(Vec::loadu(x) - safe);
              e.store(x);
              sum = sum + e;
            }
            (Vec::loadu(l.data() + jc + cc) * al + sum).store(l.data() + jc + cc);
          }
          for (int cc = 0; cc < mc; ++cc) {
            const float mv = m[jc + cc];
            if (std::isnan(mv) || mv == kInf) bad[jc + cc] = 1;
          }
          for (int cc = 0; cc < mc; ++cc)
            if (alpha[cc] != 1.f) scale_row(acc.data() + (jc + cc) * dvp, dvp, alpha[cc]);
          // acc[columns] += St^T · V
          gemm(mc, dvp, n, St.data(), 1, ls, sb.V.data(), dvp, acc.data() + jc * dvp, dvp, true);
        }
      }
      for (int j = 0; j < g; ++j) {
        const int64_t h = G.head(hx, j);
        for (int r = 0; r < T_; ++r) {
          if (qi[r] < 0) continue;
          const int idx = j * Tp + r;
          T* o = op + b * sob + h * soh + qi[r] * son;
          float* L = lp + b * slb + h * slh + qi[r] * sln;
          if (bad[idx]) {
            std::fill(o, o + dv, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
            *L = std::numeric_limits<float>::quiet_NaN();
          } else if (l[idx] == 0.f) {
            std::fill(o, o + dv, static_cast<T>(0.f));
            *L = kNegInf;
          } else {
            store_row(acc.data() + idx * dvp, o, dv, 1.f / l[idx]);
            *L = m[idx] + std::log(l[idx]);
          }
        }
      }
    }
  });
}

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_idx,
             const at::Tensor& k_idx, const at::Tensor& bits, const at::Tensor& rows, const at::Tensor& full,
             const c10::optional<at::Tensor>& kpm, const c10::optional<at::Tensor>& bias,
             const c10::optional<at::Tensor>& rpb_table, const c10::optional<at::Tensor>& rpb_index, double scale,
             bool row_causal, int64_t offset, bool accumulate, at::Tensor out, at::Tensor lse) {
  check_inputs(q, k, v, q_idx, k_idx, bits, rows, full, kpm, row_causal);
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && unit_last(out), "out: q's dtype, unit last stride");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse: float32");
  Geometry G(q, k, v, q_idx, k_idx, bits, rows, full, kpm);
  G.row_causal = row_causal, G.offset = offset;
  TORCH_CHECK(!row_causal || (!bias.has_value() && !rpb_table.has_value()), "row-causal mode: no bias");
  G.set_bias(bias);
  G.set_rpb(rpb_table, rpb_index);
  switch (q.scalar_type()) {
    case at::kFloat: forward_impl<float>(q, k, v, G, static_cast<float>(scale), accumulate, out, lse); break;
    case at::kBFloat16: forward_impl<at::BFloat16>(q, k, v, G, static_cast<float>(scale), accumulate, out, lse); break;
    case at::kHalf: forward_impl<at::Half>(q, k, v, G, static_cast<float>(scale), accumulate, out, lse); break;
    default: TORCH_CHECK(false, "nearfar native kernel: float32, bfloat16 or float16 inputs");
  }
}

}  // namespace

TORCH_LIBRARY(nearfar_native, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor q_idx, Tensor k_idx, Tensor bits, Tensor rows, Tensor full, "
        "Tensor? kpm, Tensor? bias, Tensor? rpb_table, Tensor? rpb_index, float scale, bool row_causal, int offset, "
        "bool accumulate, Tensor(a!) out, Tensor(b!) lse) "
        "-> ()");
  m.def("backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor dout, Tensor lse, Tensor q_idx, Tensor k_idx, "
        "Tensor bits, Tensor rows, Tensor full, Tensor? kpm, Tensor? bias, Tensor? rpb_table, Tensor? rpb_index, "
        "float scale, bool row_causal, int offset, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor(d!)? dbias, "
        "Tensor(e!)? drpb) -> ()");
  m.def("backward_owned(Tensor q, Tensor k, Tensor v, Tensor out, Tensor dout, Tensor lse, Tensor[] q_idx, "
        "Tensor[] k_idx, Tensor[] bits, Tensor[] rows, Tensor[] full, Tensor? kpm, Tensor? rpb_table, "
        "Tensor[] rpb_index, float scale, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor(d!) scratch, "
        "Tensor(e!)? drpb) -> ()");
}

TORCH_LIBRARY_IMPL(nearfar_native, CPU, m) {
  m.impl("forward", &forward);
}
