// The plan geometry of one call of the fused sparse attention kernel (sparse_attention.cpp) and the per-sub-block
// loads its forward and backward share; the vector building blocks are in vector_ops.h.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "vector_ops.h"

namespace nearfar_native {

constexpr int KB = 64;  // keys per sub-block: one 64-bit mask word per row

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The row stride of a buffer read down its columns (transposed scores, Qt, dOt: a micro-kernel or a softmax pass
// walks 32-64 rows at one column): a stride of a multiple of 512 bytes puts those rows in at most 8 of the L1's
// 64 sets, and they evict each other on every pass. Measured 2026-12-08 (2 threads, A/B in one process): windows
// of 1,024 tokens (one query tile each, 4 KiB rows) forward 146 -> 95 ms, forward+backward 384 -> 290 ms; 1D
// NA(513) on 16,384 tokens (128-query tiles, 512-byte rows) forward 3-7% faster. Strides of 64 floats stay: 64 rows
// then span 16 sets, which hold them.
inline int64_t padded_ld(int64_t n) { return n % 128 == 0 ? n + 16 : n; }

// Work items taken one at a time from a shared counter by each thread (dynamic scheduling): tiles and heads differ
// in cost (a causal sequence's last tiles, MoA's heads of 64 to 8,192 keys), and the static halves of
// ``at::parallel_for`` left one thread idle while the other finished the expensive half.
// ``max_workers`` bounds the threads (e.g. by the per-thread scratch slots a caller allocated): ``body`` runs at
// most that many times.
template <typename F>
void parallel_items(int64_t items, const F& body, int64_t max_workers = INT64_MAX) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>({items, static_cast<int64_t>(at::get_num_threads()), max_workers});
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { body(next); });
}

// ------------------------------------------------------------------------------------------------ geometry
// One sub-block of a tile's key list: keys [k0, k0 + n), live tile rows [r0, r1) as vector-aligned query columns
// [c0, c0 + mc), and whether every pair there is allowed with no column outside [r0, r1) (no mask to apply).
struct Span {
  int64_t k0;
  int n, r0, r1, c0, mc, ld;  // ld: the row stride of the sub-block's transposed scores (padded_ld(mc))
  bool exact;
};

struct Geometry {
  int64_t B, Hq, Hkv, Nq, Nk, d, dv, dp, dvp, c, T, Tp, nw, W, Hp, nsub, HX, g, grp;
  // key lists (Bk, Hp, c, W) and their mask arrays, query lists (Bq, Hpq, c, T): Bk, Bq in {1, B}; Hpq in {1, Hp};
  // Hp = 1 (shared), Hkv (a GQA group's queries on one list) or Hq (one list per query head)
  int64_t Bk, Bq, Hpq, ck;
  bool per_head;  // lists per query head under GQA: the work unit is one query head (g = 1)
  // row-causal mode: query row r of a tile sees key j iff j <= q_idx[r] + offset (no mask arrays; the live rows of
  // each sub-block are found from the ascending rows); the key lists may then be one list for every tile (ck = 1)
  bool row_causal = false;
  int64_t offset = 0;
  int64_t sqb, sqh, sqn, skb, skh, skn, svb, svh, svn;
  const int64_t* q_idx;
  const int64_t* k_idx;
  const int64_t* bits;
  const int32_t* rows;
  const bool* full;
  const float* kpm;
  const float* bias = nullptr;  // (Bb, Hb, c, W, Tp): per key of the list, its value for each query column
  int64_t Bb = 1, Hb = 1;
  const float* rpb = nullptr;  // a relative-position table (Hq, S) ...
  const int32_t* rpb_idx = nullptr;  // ... and its index (c, W, Tp) per key of the list and query column
  int64_t rpbS = 0;

  Geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& qi, const at::Tensor& ki,
           const at::Tensor& bt, const at::Tensor& r, const at::Tensor& f, const c10::optional<at::Tensor>& kp) {
    B = q.size(0), Hq = q.size(1), Nq = q.size(2), d = q.size(3);
    Hkv = k.size(1), Nk = k.size(2), dv = v.size(3);
    dp = round_up(d, VS), dvp = round_up(dv, VS);
    Bk = ki.size(0), Hp = ki.size(1), ck = ki.size(2), W = ki.size(3);
    Bq = qi.size(0), Hpq = qi.size(1), c = qi.size(2), T = qi.size(3);
    Tp = round_up(T, 16), nw = (T + 63) / 64;  // 16: the same padding for AVX2 and AVX-512 builds
    nsub = (W + KB - 1) / KB;
    grp = Hq / Hkv;
    per_head = std::max(Hp, Hpq) == Hq && Hq != Hkv;
    HX = per_head ? Hq : Hkv;
    g = per_head ? 1 : grp;
    sqb = q.stride(0), sqh = q.stride(1), sqn = q.stride(2);
    skb = k.stride(0), skh = k.stride(1), skn = k.stride(2);
    svb = v.stride(0), svh = v.stride(1), svn = v.stride(2);
    q_idx = qi.data_ptr<int64_t>();
    k_idx = ki.data_ptr<int64_t>();
    bits = bt.data_ptr<int64_t>();
    rows = r.data_ptr<int32_t>();
    full = f.data_ptr<bool>();
    kpm = kp.has_value() ? kp->data_ptr<float>() : nullptr;
  }

  // tile t's key list (and mask arrays) for batch item b, work unit hx (a query head when per_head, else a kv
  // head): an index in [0, Bk * Hp * ck)
  int64_t klist(int64_t b, int64_t hx, int64_t t) const {
    return ((Bk > 1 ? b : 0) * Hp + (Hp > 1 ? hx : 0)) * ck + (ck > 1 ? t : 0);
  }
  // tile t's query rows for batch item b, work unit hx
  const int64_t* qrows(int64_t b, int64_t hx, int64_t t) const {
    return q_idx + (((Bq > 1 ? b : 0) * Hpq + (Hpq > 1 ? hx : 0)) * c + t) * T;
  }
  // row-causal mode: per query column its last visible key (as float: exact below 2**24; -1 for an empty row), and
  // the number of rows (a prefix of the tile, ascending)
  int tile_limits(const int64_t* qi, float* lim) const {
    int nv = 0;
    for (int r = 0; r < Tp; ++r) {
      const bool ok = r < T && qi[r] >= 0;
      lim[r] = ok ? static_cast<float>(qi[r] + offset) : -1.f;
      if (ok) nv = r + 1;
    }
    return nv;
  }
  // sub-block s in row-causal mode: rows [first row that reaches k0, nv)
  bool span_causal(const float* lim, int nv, int64_t s, Span& sp) const {
    sp.k0 = s * KB;
    sp.n = static_cast<int>(std::min<int64_t>(KB, W - sp.k0));
    int r0 = 0;
    while (r0 < nv && lim[r0] < static_cast<float>(sp.k0)) ++r0;
    if (r0 >= nv) return false;
    sp.r0 = r0, sp.r1 = nv;
    return columns(lim[r0] >= static_cast<float>(sp.k0 + sp.n - 1), sp);
  }
  // the vector-aligned query columns of rows [r0, r1), and whether no mask is needed there (``all`` pairs allowed
  // and no column outside the rows)
  bool columns(bool all, Span& sp) const {
    sp.c0 = sp.r0 / VS * VS;
    sp.mc = std::min<int>(static_cast<int>(round_up(sp.r1, VS)), static_cast<int>(Tp)) - sp.c0;
    sp.ld = static_cast<int>(padded_ld(sp.mc));
    sp.exact = all && sp.c0 == sp.r0 && sp.c0 + sp.mc == sp.r1;
    return true;
  }
  int64_t head(int64_t hx, int64_t j) const { return per_head ? hx : hx * g + j; }
  int64_t kv_head(int64_t hx) const { return per_head ? hx / grp : hx; }
  void set_bias(const c10::optional<at::Tensor>& bt) {
    if (!bt.has_value()) return;
    TORCH_CHECK(bt->scalar_type() == at::kFloat && bt->is_contiguous() && bt->dim() == 5 && bt->size(2) == c &&
                    bt->size(3) == W && bt->size(4) == Tp && (bt->size(0) == 1 || bt->size(0) == B) &&
                    (bt->size(1) == 1 || bt->size(1) == Hq),
                "bias: float32 (1 or B, 1 or Hq, c, W, T rounded up to the vector width)");
    bias = bt->data_ptr<float>();
    Bb = bt->size(0), Hb = bt->size(1);
  }
  void set_rpb(const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& index) {
    if (!table.has_value()) return;
    TORCH_CHECK(index.has_value(), "rpb_table needs rpb_index");
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->dim() == 2 &&
                    table->size(0) == Hq, "rpb_table: float32 (Hq, S)");
    TORCH_CHECK(index->scalar_type() == at::kInt && index->is_contiguous() && index->dim() == 3 &&
                    index->size(0) == c && index->size(1) == W && index->size(2) == Tp,
                "rpb_index: int32 (c, W, T rounded up to 16)");
    rpb = table->data_ptr<float>();
    rpb_idx = index->data_ptr<int32_t>();
    rpbS = table->size(1);
  }
  // x[0:mc) += the table values of key ``pos`` of tile ``t``'s list for query head h, columns c0 on
  void add_rpb(float* x, int64_t h, int64_t t, int64_t pos, int c0, int mc) const {
    const float* tab = rpb + h * rpbS;
    const int32_t* ix = rpb_idx + (t * W + pos) * Tp + c0;
    for (int i = 0; i < mc; ++i) x[i] += tab[ix[i]];
  }
  // the bias of key ``pos`` of tile ``t``'s list for batch item b and query head h, from query column 0
  const float* bias_row(int64_t b, int64_t h, int64_t t, int64_t pos) const {
    return bias + ((((Bb > 1 ? b : 0) * Hb + (Hb > 1 ? h : 0)) * c + t) * W + pos) * Tp;
  }
  // sub-block s of tile pt's list; false when no query of the tile sees any of its keys
  bool span(int64_t pt, int64_t s, Span& sp) const {
    sp.r0 = rows[(pt * nsub + s) * 2], sp.r1 = rows[(pt * nsub + s) * 2 + 1];
    if (sp.r0 >= sp.r1) return false;
    sp.k0 = s * KB;
    sp.n = static_cast<int>(std::min<int64_t>(KB, W - sp.k0));
    return columns(full[pt * nsub + s], sp);
  }
  // the query mask words of key ``pos`` of tile ``pt``'s list
  const uint64_t* words(int64_t pt, int64_t pos) const {
    return reinterpret_cast<const uint64_t*>(bits + (pt * W + pos) * nw);
  }
};

// rows are read as contiguous runs: a unit last-dim stride, or a last dim of one element (any stride)
inline bool unit_last(const at::Tensor& x) { return x.stride(3) == 1 || x.size(3) == 1; }

inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& qi,
                         const at::Tensor& ki, const at::Tensor& bt, const at::Tensor& r, const at::Tensor& f,
                         const c10::optional<at::Tensor>& kp, bool row_causal) {
  TORCH_CHECK(q.device().is_cpu(), "nearfar native kernel: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, N, d)");
  TORCH_CHECK(unit_last(q) && unit_last(k) && unit_last(v), "q, k, v need a unit last-dim stride");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
              "q, k, v: the same B; k and v the same heads and length");
  TORCH_CHECK(qi.is_contiguous() && ki.is_contiguous() && bt.is_contiguous() && r.is_contiguous() &&
                  f.is_contiguous(), "list arrays must be contiguous");
  TORCH_CHECK(qi.scalar_type() == at::kLong && ki.scalar_type() == at::kLong && bt.scalar_type() == at::kLong &&
                  r.scalar_type() == at::kInt && f.scalar_type() == at::kBool, "list array dtypes");
  if (kp.has_value())
    TORCH_CHECK(kp->scalar_type() == at::kFloat && kp->is_contiguous() && kp->numel() == q.size(0) * k.size(2),
                "kpm: float32 (B, Nk)");
  TORCH_CHECK(ki.dim() == 4 && qi.dim() == 4, "k_idx: (Bk, Hp, c, W); q_idx: (Bq, Hpq, c, T)");
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1);
  const int64_t Bk = ki.size(0), Hp = ki.size(1), W = ki.size(3), Hpq = qi.size(1), c = qi.size(2), T = qi.size(3);
  TORCH_CHECK(Bk == 1 || Bk == B, "key lists: batch dim 1 or B");
  TORCH_CHECK(qi.size(0) == 1 || qi.size(0) == B, "query lists: batch dim 1 or B");
  for (int64_t h : {Hp, Hpq})
    TORCH_CHECK(h == 1 || h == Hkv || h == Hq, "lists: one per query head, per kv head, or shared");
  TORCH_CHECK(Hp == 1 || Hpq == 1 || Hp == Hpq, "key and query lists: the same heads, or one of them shared");
  TORCH_CHECK(ki.size(2) == c || (row_causal && ki.size(2) == 1), "key lists: one per tile (or one for all, "
              "row-causal)");
  if (row_causal) {
    TORCH_CHECK(k.size(2) < (1 << 24), "row-causal mode: fewer than 2**24 keys");
    return;
  }
  TORCH_CHECK(bt.dim() == 5 && bt.size(0) == Bk && bt.size(1) == Hp && bt.size(2) == c && bt.size(3) == W &&
                  bt.size(4) == (T + 63) / 64, "mask words: (Bk, Hp, c, W, ceil(T / 64)), one bit per query row");
  const int64_t nsub = (W + KB - 1) / KB;
  TORCH_CHECK(r.dim() == 5 && r.size(0) == Bk && r.size(1) == Hp && r.size(2) == c && r.size(3) == nsub &&
                  r.size(4) == 2, "rows: (Bk, Hp, c, ceil(W / 64), 2)");
  TORCH_CHECK(f.dim() == 4 && f.size(0) == Bk && f.size(1) == Hp && f.size(2) == c && f.size(3) == nsub,
              "full: (Bk, Hp, c, ceil(W / 64))");
}

// K and V of a sub-block, row-major (n x dp, n x dvp; padding columns zero), and the key padding values.
template <typename T>
struct SubBlock {
  std::vector<float> K, V, kp;
  explicit SubBlock(const Geometry& G) : K(KB * G.dp, 0.f), V(KB * G.dvp, 0.f), kp(KB, 0.f) {}

  void load(const Geometry& G, const int64_t* keys, int n, const T* kbase, const T* vbase, int64_t b) {
    for (int i = 0; i < n; ++i) {
      const int64_t key = keys[i];
      if (key < 0) {  // a padding slot: its scores are masked; zero keeps 0 * value finite
        std::fill(K.data() + i * G.dp, K.data() + i * G.dp + G.d, 0.f);
        std::fill(V.data() + i * G.dvp, V.data() + i * G.dvp + G.dv, 0.f);
        kp[i] = 0.f;
        continue;
      }
      load_row(kbase + key * G.skn, K.data() + i * G.dp, G.d, 1.f);
      load_row(vbase + key * G.svn, V.data() + i * G.dvp, G.dv, 1.f);
      kp[i] = G.kpm ? G.kpm[b * G.Nk + key] : 0.f;
    }
  }
};

// The logits of one sub-block for query head h of tile t (list pt, keys ``keys``), transposed: St (n x mc, row
// stride sp.ld) = K · Qt[:, jc:] plus
// the bias, with disallowed pairs at -inf and key padding added. Forward and backward both start from these.
template <typename T>
inline void masked_scores(const Geometry& G, const SubBlock<T>& sb, const Span& sp, const float* Qt, int64_t ldq,
                          int jc, int64_t b, int64_t h, int64_t t, int64_t pt, const int64_t* keys,
                          const float* lim, float* St) {
  const int n = sp.n, mc = sp.mc;
  gemm(n, mc, static_cast<int>(G.d), sb.K.data(), G.dp, 1, Qt + jc, ldq, St, sp.ld, false);
  for (int i = 0; i < n; ++i) {
    float* row = St + i * sp.ld;
    if (G.bias) add_row(row, G.bias_row(b, h, t, sp.k0 + i) + sp.c0, mc);
    if (G.rpb) G.add_rpb(row, h, t, sp.k0 + i, sp.c0, mc);
    if (sp.exact && sb.kp[i] == 0.f) continue;  // every pair allowed, no padding value: nothing to mask
    if (G.row_causal && !sp.exact)
      causal_key_row(row, mc, lim + sp.c0, static_cast<float>(keys[sp.k0 + i]), sb.kp[i]);
    else
      mask_key_row(row, mc, sp.c0, G.row_causal ? nullptr : G.words(pt, sp.k0 + i), sp.exact, sb.kp[i]);
  }
}

}  // namespace nearfar_native
