// Fused sparse attention on CPU: online softmax over each query tile's key list, read in place.
//
// The block-sparse engine's plan (nearfar/plan.py) gives, per tile group, the query tile ``q_idx (1, 1, c, T)`` and
// its key list ``k_idx (1, Hp, c, W)``; run-time selections (nearfar/backends/native_selected.py) give lists per batch
// item too, ``(B, Hp, c, W)``, and queries per (batch item, head) where only some rows attend. This kernel walks each key list in sub-blocks of 64 keys. Per (tile, sub-block) the
// caller precomputes (once per plan) the rows ``[r0, r1)`` of the tile that see any of its keys, whether all pairs
// there are allowed, and per row a 64-bit mask of the allowed keys. A sub-block no query sees is skipped and the
// score matrix covers only rows [r0, r1), so a neighbourhood's box corners and a causal diagonal cost little.
// Q/K/V rows are read from the caller's tensors through their strides (no gathered copy of K/V per tile),
// converted to float32 into small per-thread buffers, and multiplied by register-blocked micro-kernels
// (ATen's Vectorized: AVX-512 or AVX2, as built). Forward: output and LSE. Backward: recomputes the scores from the
// LSE (flash style); dK/dV accumulate in float32 per (batch, kv head), each owned by one thread, so no atomics and
// no per-tile copies; with fewer (batch, kv head) pairs than threads, the tiles are split over ``nsplit``
// accumulators that the caller sums.
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
    // Qt: (d, g * Tp) scaled queries, one column per query; acc: (g * Tp, dvp); m, l, sub: per query column
    std::vector<float> Qt(d * g * Tp, 0.f), St(KB * Tp), acc(g * Tp * dvp), m(g * Tp), l(g * Tp), sub(Tp), alpha(Tp);
    std::vector<char> bad(g * Tp);
    std::vector<float> lim(Tp);
    SubBlock<T> sb(G);
    const int64_t ldq = g * Tp;
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
        const int n = sp.n, mc = sp.mc;
        sb.load(G, ki + sp.k0, n, kbase, vbase, b);
        for (int j = 0; j < g; ++j) {
          const int jc = j * Tp + sp.c0;
          masked_scores(G, sb, sp, Qt.data(), ldq, jc, b, G.head(hx, j), t, pt, ki, lim.data(), St.data());
          for (int cc = 0; cc < mc; cc += VS) {
            Vec mx(kNegInf);
            for (int i = 0; i < n; ++i) mx = at::vec::maximum(mx, Vec::loadu(St.data() + i * mc + cc));
            const Vec mold = Vec::loadu(m.data() + jc + cc);
            const Vec mnew = at::vec::maximum(mold, mx);
            mnew.store(m.data() + jc + cc);
            // a column without any key so far subtracts 0 (exp(-inf) = 0); NaN/+inf are flagged below
            const Vec zero(0.f);
            const Vec safe = Vec::blendv(mnew, zero, mnew == Vec(kNegInf));
            safe.store(sub.data() + cc);
            Vec::blendv((mold - safe).exp_u20(), Vec(1.f), mold == mnew).store(alpha.data() + cc);
          }
          for (int cc = 0; cc < mc; ++cc) {
            const float mv = m[jc + cc];
            if (std::isnan(mv) || mv == kInf) bad[jc + cc] = 1;
          }
          for (int i = 0; i < n; ++i) exp_sub(St.data() + i * mc, sub.data(), mc);
          for (int cc = 0; cc < mc; cc += VS) {
            Vec sum(0.f);
            for (int i = 0; i < n; ++i) sum = sum + Vec::loadu(St.data() + i * mc + cc);
            (Vec::loadu(l.data() + jc + cc) * Vec::loadu(alpha.data() + cc) + sum).store(l.data() + jc + cc);
          }
          for (int cc = 0; cc < mc; ++cc)
            if (alpha[cc] != 1.f) scale_row(acc.data() + (jc + cc) * dvp, dvp, alpha[cc]);
          // acc[columns] += St^T · V
          gemm(mc, dvp, n, St.data(), 1, mc, sb.V.data(), dvp, acc.data() + jc * dvp, dvp, true);
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

// ----------------------------------------------------------------------------------------------- backward
template <typename T>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& dout, const at::Tensor& lse, const Geometry& G, float scale, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv_acc, float* dbp, float* drp) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* op = out.data_ptr<T>();
  const T* dop = dout.data_ptr<T>();
  const float* lp = lse.data_ptr<float>();
  T* dqp = dq.data_ptr<T>();
  float* dkp = dk.data_ptr<float>();
  float* dvp_ = dv_acc.data_ptr<float>();
  const int64_t sob = out.stride(0), soh = out.stride(1), son = out.stride(2);
  const int64_t sdb = dout.stride(0), sdh = dout.stride(1), sdn = dout.stride(2);
  const int64_t slb = lse.stride(0), slh = lse.stride(1), sln = lse.stride(2);
  const int64_t sqb = dq.stride(0), sqh = dq.stride(1), sqn = dq.stride(2);
  const int64_t nsplit = dk.size(0);
  const int d = G.d, dv = G.dv, T_ = G.T, Tp = G.Tp, g = G.g;
  const int64_t dp = G.dp, dvp = G.dvp;
  const int64_t items = G.B * G.Hkv * nsplit;
  const int64_t hx_per_kv = G.per_head ? G.grp : 1;
  parallel_items(items, [&](std::atomic<int64_t>& next) {
    // per query column: Q (rows, scaled) and Qt, dO and dOt, Di = rowsum(dO * O), L = LSE (+inf: no key)
    const int64_t ldq = g * Tp;
    std::vector<float> Q(ldq * dp, 0.f), Qt(d * ldq, 0.f), dO(ldq * dvp, 0.f), dOt(dv * ldq, 0.f), Di(ldq), L(ldq),
        dQ(ldq * dp), P(KB * Tp), dP(KB * Tp), dKb(KB * dp), dVb(KB * dvp), lim(Tp);
    SubBlock<T> sb(G);
    for (int64_t it = next++; it < items; it = next++) {
      const int64_t sp = it % nsplit, hkv = (it / nsplit) % G.Hkv, b = it / (nsplit * G.Hkv);
      const int64_t t_lo = G.c * sp / nsplit, t_hi = G.c * (sp + 1) / nsplit;
      float* dkbase = dkp + ((sp * G.B + b) * G.Hkv + hkv) * G.Nk * d;
      float* dvbase = dvp_ + ((sp * G.B + b) * G.Hkv + hkv) * G.Nk * dv;
      const T* kbase = kp + b * G.skb + hkv * G.skh;
      const T* vbase = vp + b * G.svb + hkv * G.svh;
      for (int64_t hh = 0; hh < hx_per_kv; ++hh) {
        const int64_t hx = G.per_head ? hkv * G.grp + hh : hkv;
        for (int64_t t = t_lo; t < t_hi; ++t) {
          const int64_t pt = G.klist(b, hx, t);
          const int64_t* qi = G.qrows(b, hx, t);
          const int nv = G.row_causal ? G.tile_limits(qi, lim.data()) : 0;
          const int64_t* ki = G.k_idx + pt * G.W;
          for (int j = 0; j < g; ++j) {
            const int64_t h = G.head(hx, j);
            for (int r = 0; r < T_; ++r) {
              const int idx = j * Tp + r;
              float* qd = Q.data() + idx * dp;
              float* dd = dO.data() + idx * dvp;
              if (qi[r] < 0) {
                std::fill(qd, qd + d, 0.f);
                std::fill(dd, dd + dv, 0.f);
                Di[idx] = 0.f;
                L[idx] = kInf;
              } else {
                load_row(qp + b * G.sqb + h * G.sqh + qi[r] * G.sqn, qd, d, scale);
                load_row(dop + b * sdb + h * sdh + qi[r] * sdn, dd, dv, 1.f);
                const T* orow = op + b * sob + h * soh + qi[r] * son;
                float di = 0.f;
                for (int e = 0; e < dv; ++e) di += dd[e] * static_cast<float>(orow[e]);
                Di[idx] = di;
                const float lv = lp[b * slb + h * slh + qi[r] * sln];
                L[idx] = lv == kNegInf ? kInf : lv;
              }
              for (int e = 0; e < d; ++e) Qt[e * ldq + idx] = qd[e];
              for (int e = 0; e < dv; ++e) dOt[e * ldq + idx] = dd[e];
            }
            for (int r = T_; r < Tp; ++r) L[j * Tp + r] = kInf;
          }
          std::fill(dQ.begin(), dQ.end(), 0.f);
          Span sp;
          for (int64_t s = 0; s < G.nsub; ++s) {
            if (!(G.row_causal ? G.span_causal(lim.data(), nv, s, sp) : G.span(pt, s, sp))) continue;
            const int64_t k0 = sp.k0;
            const int n = sp.n, c0 = sp.c0, mc = sp.mc;
            sb.load(G, ki + k0, n, kbase, vbase, b);
            for (int j = 0; j < g; ++j) {
              const int jc = j * Tp + c0;
              const int64_t h = G.head(hx, j);
              masked_scores(G, sb, sp, Qt.data(), ldq, jc, b, h, t, pt, ki, lim.data(), P.data());
              for (int i = 0; i < n; ++i) exp_sub(P.data() + i * mc, L.data() + jc, mc);  // P = exp(S - LSE)
              gemm(n, dvp, mc, P.data(), mc, 1, dO.data() + jc * dvp, dvp, dVb.data(), dvp, j > 0);  // dV (+)= P dO
              gemm(n, mc, dv, sb.V.data(), dvp, 1, dOt.data() + jc, ldq, dP.data(), mc, false);  // dPt = V dOt
              for (int i = 0; i < n; ++i) {
                float* pr = P.data() + i * mc;
                const float* dpr = dP.data() + i * mc;
                for (int cc = 0; cc < mc; cc += VS)
                  (Vec::loadu(pr + cc) * (Vec::loadu(dpr + cc) - Vec::loadu(Di.data() + jc + cc))).store(pr + cc);
                if (dbp) std::copy(pr, pr + mc, dbp + ((((b * G.Hq + h) * G.c + t) * G.W + k0 + i) * Tp + c0));
                if (drp) {  // this work item's own copy of the table gradient: no other thread writes it
                  float* dt = drp + (it * G.Hq + h) * G.rpbS;
                  const int32_t* ix = G.rpb_idx + (t * G.W + k0 + i) * Tp + c0;
                  for (int cc = 0; cc < mc; ++cc) dt[ix[cc]] += pr[cc];
                }
              }
              gemm(mc, dp, n, P.data(), 1, mc, sb.K.data(), dp, dQ.data() + jc * dp, dp, true);  // dQ += dSt^T K
              gemm(n, dp, mc, P.data(), mc, 1, Q.data() + jc * dp, dp, dKb.data(), dp, j > 0);  // dK (+)= dSt (s q)
            }
            for (int i = 0; i < n; ++i) {
              const int64_t key = ki[k0 + i];
              if (key < 0) continue;
              add_row(dkbase + key * d, dKb.data() + i * dp, d);
              add_row(dvbase + key * dv, dVb.data() + i * dvp, dv);
            }
          }
          for (int j = 0; j < g; ++j) {
            const int64_t h = G.head(hx, j);
            for (int r = 0; r < T_; ++r) {
              if (qi[r] < 0) continue;
              store_row(dQ.data() + (j * Tp + r) * dp, dqp + b * sqb + h * sqh + qi[r] * sqn, d, scale);
            }
          }
        }
      }
    }
  });
}

void backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& q_idx, const at::Tensor& k_idx,
              const at::Tensor& bits, const at::Tensor& rows, const at::Tensor& full,
              const c10::optional<at::Tensor>& kpm, const c10::optional<at::Tensor>& bias,
              const c10::optional<at::Tensor>& rpb_table, const c10::optional<at::Tensor>& rpb_index, double scale,
              bool row_causal, int64_t offset, at::Tensor dq, at::Tensor dk, at::Tensor dv,
              const c10::optional<at::Tensor>& dbias, const c10::optional<at::Tensor>& drpb) {
  check_inputs(q, k, v, q_idx, k_idx, bits, rows, full, kpm, row_causal);
  TORCH_CHECK(unit_last(out) && unit_last(dout) && unit_last(dq), "unit last-dim strides");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type() &&
                  dq.scalar_type() == q.scalar_type(), "out, dout, dq: q's dtype");
  TORCH_CHECK(dk.scalar_type() == at::kFloat && dv.scalar_type() == at::kFloat && dk.is_contiguous() &&
                  dv.is_contiguous() && dk.dim() == 5 && dv.dim() == 5, "dk, dv: float32 (S, B, Hkv, Nk, e)");
  Geometry G(q, k, v, q_idx, k_idx, bits, rows, full, kpm);
  G.row_causal = row_causal, G.offset = offset;
  TORCH_CHECK(!row_causal || (!bias.has_value() && !rpb_table.has_value()), "row-causal mode: no bias");
  G.set_bias(bias);
  G.set_rpb(rpb_table, rpb_index);
  float* drp = nullptr;
  if (drpb.has_value()) {
    TORCH_CHECK(G.rpb && drpb->scalar_type() == at::kFloat && drpb->is_contiguous() && drpb->dim() == 3 &&
                    drpb->size(0) == G.B * G.Hkv * dk.size(0) && drpb->size(1) == G.Hq && drpb->size(2) == G.rpbS,
                "drpb: float32 (B * Hkv * nsplit, Hq, S), with rpb_table");
    drp = drpb->data_ptr<float>();
  }
  float* dbp = nullptr;
  if (dbias.has_value()) {
    TORCH_CHECK(dbias->scalar_type() == at::kFloat && dbias->is_contiguous() && dbias->dim() == 5 &&
                    dbias->size(0) == G.B && dbias->size(1) == G.Hq && dbias->size(2) == G.c &&
                    dbias->size(3) == G.W && dbias->size(4) == G.Tp,
                "dbias: float32 (B, Hq, c, W, T rounded up to the vector width)");
    dbp = dbias->data_ptr<float>();
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      backward_impl<float>(q, k, v, out, dout, lse, G, static_cast<float>(scale), dq, dk, dv, dbp, drp);
      break;
    case at::kBFloat16:
      backward_impl<at::BFloat16>(q, k, v, out, dout, lse, G, static_cast<float>(scale), dq, dk, dv, dbp, drp);
      break;
    case at::kHalf:
      backward_impl<at::Half>(q, k, v, out, dout, lse, G, static_cast<float>(scale), dq, dk, dv, dbp, drp);
      break;
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
}

TORCH_LIBRARY_IMPL(nearfar_native, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
