// Backward pass of the fused sparse attention kernel (forward and the op schemas: sparse_attention.cpp).
//
// It recomputes each sub-block's scores from the LSE (flash style, as FlashAttention-2's backward) and writes dQ per
// query tile. dK/dV are sums over every tile that lists a key, so they are accumulated in float32 per
// (batch, kv head) "owner", each owned by one thread at a time: no atomics and no per-tile copies. Two ways:
// - ``backward`` (float32 inputs, or fewer owners than threads): the caller's float32 accumulators
//   ``(nsplit, B, Hkv, Nk, e)``, one kernel call per tile group (added into); with fewer owners than threads, an
//   owner's tiles are split over ``nsplit`` accumulators that the caller sums. For float32 with nsplit = 1 the
//   accumulator is the gradient itself.
// - ``backward_owned`` (half precision, at least as many owners as threads): every tile group of the plan in one
//   call, so an owner's whole sum is formed in one float32 scratch of ``(Nk, d + dv)`` per thread (zeroed at the
//   owner's start, converted into the bfloat16/float16 gradients at its end). The result is the float32 sum
//   rounded once, as the first way gives it, without float32 accumulators of the gradients' size (twice it, in
//   half precision) or the conversion's copies: the caller allocates ``min(threads, B * Hkv)`` scratch slots as a
//   tensor (so memory meters see them) and each thread takes one.
#include "sparse_attention.h"

#include <torch/library.h>

namespace {

using namespace nearfar_native;

// The tensors every tile group of one backward call shares: pointers and strides.
template <typename T>
struct Io {
  const T *qp, *kp, *vp, *op, *dop;
  const float* lp;
  T* dqp;
  int64_t sob, soh, son, sdb, sdh, sdn, slb, slh, sln, sqb, sqh, sqn;
  Io(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& dout,
     const at::Tensor& lse, const at::Tensor& dq)
      : qp(q.data_ptr<T>()), kp(k.data_ptr<T>()), vp(v.data_ptr<T>()), op(out.data_ptr<T>()),
        dop(dout.data_ptr<T>()), lp(lse.data_ptr<float>()), dqp(dq.data_ptr<T>()),
        sob(out.stride(0)), soh(out.stride(1)), son(out.stride(2)), sdb(dout.stride(0)), sdh(dout.stride(1)),
        sdn(dout.stride(2)), slb(lse.stride(0)), slh(lse.stride(1)), sln(lse.stride(2)), sqb(dq.stride(0)),
        sqh(dq.stride(1)), sqn(dq.stride(2)) {}
};

// Per-thread buffers, per query column: Q (rows, scaled) and Qt, dO and dOt, Di = rowsum(dO * O), L = LSE (+inf: no
// key), dQ; per sub-block: P / dS (transposed), dP, the sub-block's dK and dV rows.
struct Buffers {
  std::vector<float> Q, Qt, dO, dOt, Di, L, dQ, P, dP, dKb, dVb, lim;
  explicit Buffers(const Geometry& G)
      : Q(G.g * G.Tp * G.dp, 0.f), Qt(G.d * padded_ld(G.g * G.Tp), 0.f), dO(G.g * G.Tp * G.dvp, 0.f),
        dOt(G.dv * padded_ld(G.g * G.Tp), 0.f), Di(G.g * G.Tp), L(G.g * G.Tp), dQ(G.g * G.Tp * G.dp),
        P(KB * padded_ld(G.Tp)), dP(KB * padded_ld(G.Tp)), dKb(KB * G.dp), dVb(KB * G.dvp), lim(G.Tp) {}
};

// Tiles [t_lo, t_hi) of one tile group for batch item b and kv head hkv: writes their dQ rows, adds their dK/dV into
// the float32 rows ``dkbase + key * ldk`` / ``dvbase + key * ldv``, their score gradients into ``dbp`` (block bias)
// and ``drp`` (this work item's own copy of the relative-position table's gradient, (Hq, S)).
template <typename T>
void tiles_backward(const Geometry& G, const Io<T>& io, Buffers& w, SubBlock<T>& sb, float scale, int64_t b,
                    int64_t hkv, int64_t t_lo, int64_t t_hi, float* dkbase, int64_t ldk, float* dvbase, int64_t ldv,
                    float* dbp, float* drp) {
  const int d = G.d, dv = G.dv, T_ = G.T, Tp = G.Tp, g = G.g;
  const int64_t dp = G.dp, dvp = G.dvp, ldq = padded_ld(g * Tp);
  const int64_t hx_per_kv = G.per_head ? G.grp : 1;
  const T* kbase = io.kp + b * G.skb + hkv * G.skh;
  const T* vbase = io.vp + b * G.svb + hkv * G.svh;
  float *Q = w.Q.data(), *Qt = w.Qt.data(), *dO = w.dO.data(), *dOt = w.dOt.data(), *Di = w.Di.data();
  float *L = w.L.data(), *dQ = w.dQ.data(), *P = w.P.data(), *dP = w.dP.data(), *lim = w.lim.data();
  for (int64_t hh = 0; hh < hx_per_kv; ++hh) {
    const int64_t hx = G.per_head ? hkv * G.grp + hh : hkv;
    for (int64_t t = t_lo; t < t_hi; ++t) {
      const int64_t pt = G.klist(b, hx, t);
      const int64_t* qi = G.qrows(b, hx, t);
      const int nv = G.row_causal ? G.tile_limits(qi, lim) : 0;
      const int64_t* ki = G.k_idx + pt * G.W;
      for (int j = 0; j < g; ++j) {
        const int64_t h = G.head(hx, j);
        for (int r = 0; r < T_; ++r) {
          const int idx = j * Tp + r;
          float* qd = Q + idx * dp;
          float* dd = dO + idx * dvp;
          if (qi[r] < 0) {
            std::fill(qd, qd + d, 0.f);
            std::fill(dd, dd + dv, 0.f);
            Di[idx] = 0.f;
            L[idx] = kInf;
          } else {
            load_row(io.qp + b * G.sqb + h * G.sqh + qi[r] * G.sqn, qd, d, scale);
            load_row(io.dop + b * io.sdb + h * io.sdh + qi[r] * io.sdn, dd, dv, 1.f);
            const T* orow = io.op + b * io.sob + h * io.soh + qi[r] * io.son;
            float di = 0.f;
            for (int e = 0; e < dv; ++e) di += dd[e] * static_cast<float>(orow[e]);
            Di[idx] = di;
            const float lv = io.lp[b * io.slb + h * io.slh + qi[r] * io.sln];
            L[idx] = lv == kNegInf ? kInf : lv;
          }
          for (int e = 0; e < d; ++e) Qt[e * ldq + idx] = qd[e];
          for (int e = 0; e < dv; ++e) dOt[e * ldq + idx] = dd[e];
        }
        for (int r = T_; r < Tp; ++r) L[j * Tp + r] = kInf;
      }
      std::fill(w.dQ.begin(), w.dQ.end(), 0.f);
      Span sp;
      for (int64_t s = 0; s < G.nsub; ++s) {
        if (!(G.row_causal ? G.span_causal(lim, nv, s, sp) : G.span(pt, s, sp))) continue;
        const int64_t k0 = sp.k0;
        const int n = sp.n, c0 = sp.c0, mc = sp.mc, ls = sp.ld;
        sb.load(G, ki + k0, n, kbase, vbase, b);
        for (int j = 0; j < g; ++j) {
          const int jc = j * Tp + c0;
          const int64_t h = G.head(hx, j);
          masked_scores(G, sb, sp, Qt, ldq, jc, b, h, t, pt, ki, lim, P);
          for (int i = 0; i < n; ++i) exp_sub(P + i * ls, L + jc, mc);  // P = exp(S - LSE)
          gemm(n, dvp, mc, P, ls, 1, dO + jc * dvp, dvp, w.dVb.data(), dvp, j > 0);  // dV (+)= P dO
          gemm(n, mc, dv, sb.V.data(), dvp, 1, dOt + jc, ldq, dP, ls, false);  // dPt = V dOt
          for (int i = 0; i < n; ++i) {
            float* pr = P + i * ls;
            const float* dpr = dP + i * ls;
            for (int cc = 0; cc < mc; cc += VS)
              (Vec::loadu(pr + cc) * (Vec::loadu(dpr + cc) - Vec::loadu(Di + jc + cc))).store(pr + cc);
            if (dbp) std::copy(pr, pr + mc, dbp + ((((b * G.Hq + h) * G.c + t) * G.W + k0 + i) * Tp + c0));
            if (drp) {  // the work item's own copy of the table gradient: no other thread writes it
              float* dt = drp + h * G.rpbS;
              const int32_t* ix = G.rpb_idx + (t * G.W + k0 + i) * Tp + c0;
              for (int cc = 0; cc < mc; ++cc) dt[ix[cc]] += pr[cc];
            }
          }
          gemm(mc, dp, n, P, 1, ls, sb.K.data(), dp, dQ + jc * dp, dp, true);  // dQ += dSt^T K
          gemm(n, dp, mc, P, ls, 1, Q + jc * dp, dp, w.dKb.data(), dp, j > 0);  // dK (+)= dSt (s q)
        }
        for (int i = 0; i < n; ++i) {
          const int64_t key = ki[k0 + i];
          if (key < 0) continue;
          add_row(dkbase + key * ldk, w.dKb.data() + i * dp, d);
          add_row(dvbase + key * ldv, w.dVb.data() + i * dvp, dv);
        }
      }
      for (int j = 0; j < g; ++j) {
        const int64_t h = G.head(hx, j);
        for (int r = 0; r < T_; ++r) {
          if (qi[r] < 0) continue;
          store_row(dQ + (j * Tp + r) * dp, io.dqp + b * io.sqb + h * io.sqh + qi[r] * io.sqn, d, scale);
        }
      }
    }
  }
}

// One tile group into float32 accumulators (nsplit, B, Hkv, Nk, e): work items (b, hkv, split).
template <typename T>
void backward_impl(const Io<T>& io, const Geometry& G, float scale, at::Tensor& dk, at::Tensor& dv_acc, float* dbp,
                   float* drp) {
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv_acc.data_ptr<float>();
  const int64_t nsplit = dk.size(0);
  const int64_t items = G.B * G.Hkv * nsplit;
  parallel_items(items, [&](std::atomic<int64_t>& next) {
    Buffers w(G);
    SubBlock<T> sb(G);
    for (int64_t it = next++; it < items; it = next++) {
      const int64_t sp = it % nsplit, hkv = (it / nsplit) % G.Hkv, b = it / (nsplit * G.Hkv);
      const int64_t own = (sp * G.B + b) * G.Hkv + hkv;
      tiles_backward(G, io, w, sb, scale, b, hkv, G.c * sp / nsplit, G.c * (sp + 1) / nsplit,
                     dkp + own * G.Nk * G.d, G.d, dvp + own * G.Nk * G.dv, G.dv, dbp,
                     drp ? drp + it * G.Hq * G.rpbS : nullptr);
    }
  });
}

// Every tile group at once, straight into q's dtype: work items (b, hkv), each summed in its thread's scratch slot.
template <typename T>
void owned_impl(const Io<T>& io, const std::vector<Geometry>& Gs, float scale, at::Tensor& dk, at::Tensor& dv,
                at::Tensor& scratch, float* drp) {
  const Geometry& G0 = Gs.front();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  float* slots = scratch.data_ptr<float>();
  const int64_t e = G0.d + G0.dv, rows = G0.Nk, items = G0.B * G0.Hkv;
  std::atomic<int64_t> slot_next{0};
  parallel_items(
      items,
      [&](std::atomic<int64_t>& next) {
        float* acc = slots + slot_next++ * rows * e;  // at most scratch.size(0) workers: one slot each
        Buffers w(G0);
        SubBlock<T> sb(G0);
        for (int64_t it = next++; it < items; it = next++) {
          const int64_t hkv = it % G0.Hkv, b = it / G0.Hkv;
          std::fill(acc, acc + rows * e, 0.f);
          for (const Geometry& G : Gs)
            tiles_backward(G, io, w, sb, scale, b, hkv, 0, G.c, acc, e, acc + G0.d, e, nullptr,
                           drp ? drp + it * G0.Hq * G0.rpbS : nullptr);
          T* dkrow = dkp + it * rows * G0.d;
          T* dvrow = dvp + it * rows * G0.dv;
          for (int64_t key = 0; key < rows; ++key) {
            store_row(acc + key * e, dkrow + key * G0.d, G0.d, 1.f);
            store_row(acc + key * e + G0.d, dvrow + key * G0.dv, G0.dv, 1.f);
          }
        }
      },
      scratch.size(0));
}

void check_grads(const at::Tensor& q, const at::Tensor& out, const at::Tensor& dout, const at::Tensor& dq) {
  TORCH_CHECK(unit_last(out) && unit_last(dout) && unit_last(dq), "unit last-dim strides");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type() &&
                  dq.scalar_type() == q.scalar_type(), "out, dout, dq: q's dtype");
}

float* table_grad(const Geometry& G, const c10::optional<at::Tensor>& drpb, int64_t items) {
  if (!drpb.has_value()) return nullptr;
  TORCH_CHECK(G.rpb && drpb->scalar_type() == at::kFloat && drpb->is_contiguous() && drpb->dim() == 3 &&
                  drpb->size(0) == items && drpb->size(1) == G.Hq && drpb->size(2) == G.rpbS,
              "drpb: float32 (work items, Hq, S), with rpb_table");
  return drpb->data_ptr<float>();
}

template <template <typename> class F, typename... A>
void dispatch(at::ScalarType dt, A&&... args) {
  switch (dt) {
    case at::kFloat: F<float>::run(std::forward<A>(args)...); break;
    case at::kBFloat16: F<at::BFloat16>::run(std::forward<A>(args)...); break;
    case at::kHalf: F<at::Half>::run(std::forward<A>(args)...); break;
    default: TORCH_CHECK(false, "nearfar native kernel: float32, bfloat16 or float16 inputs");
  }
}

template <typename T>
struct RunBackward {
  static void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& dq, const Geometry& G, float scale,
                  at::Tensor& dk, at::Tensor& dv, float* dbp, float* drp) {
    backward_impl<T>(Io<T>(q, k, v, out, dout, lse, dq), G, scale, dk, dv, dbp, drp);
  }
};

template <typename T>
struct RunOwned {
  static void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& dq,
                  const std::vector<Geometry>& Gs, float scale, at::Tensor& dk, at::Tensor& dv, at::Tensor& scratch,
                  float* drp) {
    owned_impl<T>(Io<T>(q, k, v, out, dout, lse, dq), Gs, scale, dk, dv, scratch, drp);
  }
};

void backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& q_idx, const at::Tensor& k_idx,
              const at::Tensor& bits, const at::Tensor& rows, const at::Tensor& full,
              const c10::optional<at::Tensor>& kpm, const c10::optional<at::Tensor>& bias,
              const c10::optional<at::Tensor>& rpb_table, const c10::optional<at::Tensor>& rpb_index, double scale,
              bool row_causal, int64_t offset, at::Tensor dq, at::Tensor dk, at::Tensor dv,
              const c10::optional<at::Tensor>& dbias, const c10::optional<at::Tensor>& drpb) {
  check_inputs(q, k, v, q_idx, k_idx, bits, rows, full, kpm, row_causal);
  check_grads(q, out, dout, dq);
  TORCH_CHECK(dk.scalar_type() == at::kFloat && dv.scalar_type() == at::kFloat && dk.is_contiguous() &&
                  dv.is_contiguous() && dk.dim() == 5 && dv.dim() == 5 && dk.size(0) == dv.size(0) &&
                  dk.size(1) == q.size(0) && dk.size(2) == k.size(1) && dk.size(3) == k.size(2) &&
                  dk.size(4) == k.size(3) && dv.sizes().slice(1, 3) == dk.sizes().slice(1, 3) &&
                  dv.size(4) == v.size(3), "dk, dv: float32 (S, B, Hkv, Nk, e), contiguous");
  Geometry G(q, k, v, q_idx, k_idx, bits, rows, full, kpm);
  G.row_causal = row_causal, G.offset = offset;
  TORCH_CHECK(!row_causal || (!bias.has_value() && !rpb_table.has_value()), "row-causal mode: no bias");
  G.set_bias(bias);
  G.set_rpb(rpb_table, rpb_index);
  float* drp = table_grad(G, drpb, G.B * G.Hkv * dk.size(0));
  float* dbp = nullptr;
  if (dbias.has_value()) {
    TORCH_CHECK(dbias->scalar_type() == at::kFloat && dbias->is_contiguous() && dbias->dim() == 5 &&
                    dbias->size(0) == G.B && dbias->size(1) == G.Hq && dbias->size(2) == G.c &&
                    dbias->size(3) == G.W && dbias->size(4) == G.Tp,
                "dbias: float32 (B, Hq, c, W, T rounded up to the vector width)");
    dbp = dbias->data_ptr<float>();
  }
  dispatch<RunBackward>(q.scalar_type(), q, k, v, out, dout, lse, dq, G, static_cast<float>(scale), dk, dv, dbp, drp);
}

void backward_owned(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& dout, const at::Tensor& lse, at::TensorList q_idx, at::TensorList k_idx,
                    at::TensorList bits, at::TensorList rows, at::TensorList full,
                    const c10::optional<at::Tensor>& kpm, const c10::optional<at::Tensor>& rpb_table,
                    at::TensorList rpb_index, double scale, at::Tensor dq, at::Tensor dk, at::Tensor dv,
                    at::Tensor scratch, const c10::optional<at::Tensor>& drpb) {
  const size_t n = q_idx.size();
  TORCH_CHECK(n > 0 && k_idx.size() == n && bits.size() == n && rows.size() == n && full.size() == n,
              "q_idx, k_idx, bits, rows, full: one entry per tile group, at least one");
  TORCH_CHECK(rpb_table.has_value() ? rpb_index.size() == n : rpb_index.empty(),
              "rpb_index: one per tile group with rpb_table, none without");
  check_grads(q, out, dout, dq);
  const int64_t B = q.size(0), Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(dk.scalar_type() == q.scalar_type() && dv.scalar_type() == q.scalar_type() && dk.is_contiguous() &&
                  dv.is_contiguous() && dk.dim() == 4 && dv.dim() == 4 && dk.sizes() == k.sizes() &&
                  dv.sizes() == v.sizes(), "dk, dv: q's dtype, contiguous, k's and v's shapes");
  TORCH_CHECK(scratch.scalar_type() == at::kFloat && scratch.is_contiguous() && scratch.dim() == 3 &&
                  scratch.size(0) >= 1 && scratch.size(1) == Nk && scratch.size(2) == k.size(3) + v.size(3),
              "scratch: float32 (slots >= 1, Nk, d + dv), contiguous");
  std::vector<Geometry> Gs;
  Gs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    check_inputs(q, k, v, q_idx[i], k_idx[i], bits[i], rows[i], full[i], kpm, false);
    Gs.emplace_back(q, k, v, q_idx[i], k_idx[i], bits[i], rows[i], full[i], kpm);
    if (rpb_table.has_value()) Gs.back().set_rpb(rpb_table, rpb_index[i]);
    // the per-thread buffers are sized by the first group
    TORCH_CHECK(Gs.back().T == Gs[0].T && Gs.back().g == Gs[0].g, "tile groups: the same tile size and heads");
  }
  float* drp = table_grad(Gs[0], drpb, B * Hkv);
  dispatch<RunOwned>(q.scalar_type(), q, k, v, out, dout, lse, dq, Gs, static_cast<float>(scale), dk, dv, scratch,
                     drp);
}

}  // namespace

TORCH_LIBRARY_IMPL(nearfar_native, CPU, m) {
  m.impl("backward", &backward);
  m.impl("backward_owned", &backward_owned);
}
