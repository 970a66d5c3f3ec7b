// Top-p (nucleus) truncation of probability rows, as multitoken.sampling.probs_from_logits computes it
// with ATen (multitoken/kernels.py: `top_p`). ATen needs a top-k, a cumulative sum, a mask, a sum, a
// division and a scatter for it, and a full sort of any row whose best 256 tokens do not settle the cut:
// 0.3-0.5 ms for the 3-4 rows of each of a self-speculative sampling step's two distributions on a
// 2-core CPU. Here a row costs two passes over the vocabulary and a sort of its best few tokens: ~15 us.
// Only a row whose cut splits tokens of equal probability still needs ATen's full sort (which of them
// stay is the sort's order among equals, which nothing else reproduces): with bf16 logits, 15-40% of
// a small model's rows at temperatures 0.6-0.8.
// Also a sampled self-speculative step's draws (`draw`) and acceptance (`accept_sampled`), each one call.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

struct Candidate {
  float p;
  int64_t id;
};

// The larger probability first, equal ones by id. Equal probabilities in another order leave every
// partial sum as it is, so this order gives ATen's cut; where the cut splits equal ones, `kept` says so.
inline bool before(const Candidate& a, const Candidate& b) { return a.p > b.p || (a.p == b.p && a.id < b.id); }

// Probabilities by bucket of magnitude: 4 per halving below 1, from their bits (a positive float's
// bits grow with it), the last bucket everything below 2^-40 (zeros too). A bucket and those before it
// hold every probability above some value, equal ones together: a prefix of the sorted order.
constexpr int kBuckets = 160;
inline int bucket(float p) {
  int32_t bits, one;
  const float unit = 1.0f;
  std::memcpy(&bits, &p, 4);
  std::memcpy(&one, &unit, 4);
  return (int)std::clamp<int64_t>(((int64_t)one - bits) >> 21, 0, kBuckets - 1);
}

// The best tokens of row p (vocab), sorted: those of the buckets that reach a mass of `mass` (a little
// over top_p), and of the next non-empty bucket, which holds the first token past them. False (and
// nothing) for a row with a NaN, which has no order, and for one that keeps more than an eighth of its
// tokens, which ATen's sort orders faster.
bool best(const float* p, int64_t vocab, double mass, std::vector<Candidate>& out) {
  std::array<double, kBuckets> bucket_mass{};
  std::array<int64_t, kBuckets> bucket_count{};
  out.clear();
  for (int64_t i = 0; i < vocab; ++i) {
    if (std::isnan(p[i])) return false;
    const int b = bucket(p[i]);
    bucket_mass[b] += p[i];
    ++bucket_count[b];
  }
  int last = 0;
  for (double sum = 0; last < kBuckets - 1; ++last) {
    sum += bucket_mass[last];
    if (sum > mass) break;
  }
  int64_t count = bucket_count[last];
  for (int b = 0; b < last; ++b) count += bucket_count[b];
  if (last < kBuckets - 1) {
    do ++last; while (last < kBuckets - 1 && bucket_count[last] == 0);
    count += bucket_count[last];
  }
  if (count > std::max<int64_t>(vocab / 8, 64) && mass <= 1.0) return false;
  out.reserve(count);
  for (int64_t i = 0; i < vocab; ++i)
    if (bucket(p[i]) <= last) out.push_back({p[i], i});
  std::sort(out.begin(), out.end(), before);
  return true;
}

// The tokens a row keeps, as ATen's top-p computes them (multitoken.sampling._truncated): a token is
// kept unless the mass before it, a cumulative sum accumulated in double and stored as float minus the
// token's own probability, exceeds top_p. Of the sorted candidates, the first n are kept, where the
// (n+1)-th is the first that is not; -1 if every candidate is kept (more might be). `certain` is false
// where the cut alone does not settle ATen's result: the first token left out ties with the last kept
// (which of equal tokens stays is then the sort's order), or its mass before lies within a few roundings
// of top_p (where a later token's could, rounded, fall back under it and be kept).
int64_t kept(const std::vector<Candidate>& sorted, double top_p, bool& certain) {
  double sum = 0;
  for (size_t j = 0; j < sorted.size(); ++j) {
    sum += sorted[j].p;
    const float mass_before = (float)sum - sorted[j].p;
    if ((double)mass_before > top_p) {
      certain = (double)mass_before > top_p + 4 * FLT_EPSILON && !(j > 0 && sorted[j].p == sorted[j - 1].p);
      return (int64_t)j;
    }
  }
  certain = true;
  return -1;
}

// probs (rows, vocab) float32, each row a distribution; top_p (rows,) float64. Out: each row's tokens
// kept by top_p, renormalised, in vocabulary order, zeros elsewhere: bit for bit ATen's result.
at::Tensor top_p(const at::Tensor& probs, const at::Tensor& top_p) {
  TORCH_CHECK(probs.device().is_cpu() && probs.scalar_type() == at::kFloat && probs.dim() == 2,
              "top_p: probs must be a float32 CPU tensor (rows, vocab)");
  TORCH_CHECK(top_p.device().is_cpu() && top_p.scalar_type() == at::kDouble && top_p.dim() == 1 &&
              top_p.size(0) == probs.size(0), "top_p: top_p must be float64 (rows,)");
  const at::Tensor p = probs.contiguous(), tp = top_p.contiguous();
  const int64_t rows = p.size(0), vocab = p.size(1);
  // Each row's kept probabilities in sorted order, then zeros, as ATen lays them out before it sums
  // them: the same numbers in the same places, so at::sum gives ATen's normaliser bit for bit.
  at::Tensor sorted = at::zeros({rows, vocab}, p.options());
  std::vector<std::vector<int64_t>> ids(rows);
  std::vector<char> certain(rows);
  const float* p0 = p.const_data_ptr<float>();
  const double* tp0 = tp.const_data_ptr<double>();
  float* s0 = sorted.mutable_data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t lo, int64_t hi) {
    std::vector<Candidate> best_k;
    for (int64_t r = lo; r < hi; ++r) {
      const float* pr = p0 + r * vocab;
      if (!best(pr, vocab, tp0[r] + 1e-6, best_k)) {
        certain[r] = false;  // ATen's steps give ATen's result
        continue;
      }
      bool sure = true;
      int64_t n = kept(best_k, tp0[r], sure);
      if (n < 0 && (int64_t)best_k.size() < vocab) {  // rounding left the cut past them: every token
        best(pr, vocab, 2.0, best_k);
        n = kept(best_k, tp0[r], sure);
      }
      if (n < 0) n = vocab;
      certain[r] = sure;
      ids[r].resize(n);
      for (int64_t j = 0; j < n; ++j) {
        s0[r * vocab + j] = best_k[j].p;
        ids[r][j] = best_k[j].id;
      }
    }
  });
  std::vector<int64_t> unsure;
  for (int64_t r = 0; r < rows; ++r)
    if (!certain[r]) unsure.push_back(r);
  if (!unsure.empty()) {
    // ATen's own steps on these rows: a full sort (whose order among equal tokens decides which stay)
    // and the mass test on every token.
    const at::Tensor index = at::empty({(int64_t)unsure.size()}, p.options().dtype(at::kLong));
    std::copy(unsure.begin(), unsure.end(), index.mutable_data_ptr<int64_t>());
    const auto [values, order] = p.index_select(0, index).sort(-1, /*descending=*/true);
    const at::Tensor mass_before = values.cumsum(-1) - values;
    sorted.index_copy_(0, index, values.masked_fill(mass_before > tp.index_select(0, index).unsqueeze(1), 0.0));
    const int64_t* o0 = order.const_data_ptr<int64_t>();
    for (size_t i = 0; i < unsure.size(); ++i) ids[unsure[i]].assign(o0 + i * vocab, o0 + (i + 1) * vocab);
  }
  // One sum over all rows, as ATen sums them (how it splits a sum between threads depends on the rows).
  const at::Tensor total = sorted.sum(-1);
  const float* t0 = total.const_data_ptr<float>();
  at::Tensor out = at::zeros({rows, vocab}, p.options());
  float* y0 = out.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (size_t j = 0; j < ids[r].size(); ++j) y0[r * vocab + ids[r][j]] = s0[r * vocab + j] / t0[r];
  return out;
}

// The id sampling.draw draws from weights w[0 .. vocab) given u in [0, 1): the first whose cumulative weight
// exceeds u times the total, at most the last id of positive weight (the last id if none is positive).
// ATen's cumulative sum adds in float64 in vocabulary order, and so does this: the same ids.
int64_t draw_row(const float* w, int64_t vocab, double u) {
  double total = 0;
  for (int64_t i = 0; i < vocab; ++i) total += w[i];
  const double target = u * total;
  int64_t id = vocab, last = vocab - 1;
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    sum += w[i];
    if (sum > target) {
      id = i;
      break;
    }
  }
  for (int64_t i = vocab - 1; i >= 0; --i)
    if (w[i] > 0) {
      last = i;
      break;
    }
  return std::min(id, last);
}

// multitoken.sampling.draw: one id per row of weights (rows, vocab) float32 (probabilities, normalised or
// not), given u (rows,) float64 in [0, 1). Two passes over a row instead of ~9 operator calls (cumsum,
// searchsorted, the last positive id) on float64 copies of the rows.
at::Tensor draw(const at::Tensor& weights, const at::Tensor& u) {
  TORCH_CHECK(weights.device().is_cpu() && weights.scalar_type() == at::kFloat && weights.dim() == 2 &&
              weights.size(1) >= 1, "draw: weights must be a float32 CPU tensor (rows, vocab)");
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kDouble && u.dim() == 1 && u.size(0) == weights.size(0),
              "draw: u must be float64 (rows,)");
  const at::Tensor w = weights.contiguous(), uc = u.contiguous();
  const int64_t rows = w.size(0), vocab = w.size(1);
  at::Tensor out = at::empty({rows}, w.options().dtype(at::kLong));
  int64_t* y = out.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) y[r] = draw_row(w.const_data_ptr<float>() + r * vocab, vocab, uc.const_data_ptr<double>()[r]);
  return out;
}

// multitoken.speculative.accept_sampled: a self-speculative sampling step's acceptance, given the target's
// distributions p (batch, j + 1, vocab) at the row's last token and its j drafts, the drafts' q (batch, j,
// vocab), the drafts (batch, j), uniforms u (batch, j) float32 for the tests and u_next (batch,) float64
// for the next token. Draft i passes while u[i] q(x_i) < p(x_i); the token after the accepted ones is drawn
// from max(0, p - q) at the first rejection (p where that is all zeros), or from p after all j. Returns the
// accepted counts (batch,), the next tokens (batch,) and the step's tokens (batch, j + 1): the drafts with the
// next token in place of the first rejected one (or after them all, in place of a zero).
std::tuple<at::Tensor, at::Tensor, at::Tensor> accept_sampled(const at::Tensor& p_in, const at::Tensor& q_in,
                                                              const at::Tensor& drafts_in, const at::Tensor& u_in,
                                                              const at::Tensor& u_next_in) {
  TORCH_CHECK(p_in.device().is_cpu() && p_in.scalar_type() == at::kFloat && p_in.dim() == 3 && q_in.scalar_type() == at::kFloat &&
              q_in.dim() == 3 && q_in.size(0) == p_in.size(0) && q_in.size(1) + 1 == p_in.size(1) && q_in.size(2) == p_in.size(2),
              "accept_sampled: p must be float32 (batch, j + 1, vocab) and q float32 (batch, j, vocab)");
  const int64_t bsz = p_in.size(0), j = q_in.size(1), vocab = p_in.size(2);
  TORCH_CHECK(drafts_in.scalar_type() == at::kLong && drafts_in.dim() == 2 && drafts_in.size(0) == bsz && drafts_in.size(1) == j &&
              u_in.scalar_type() == at::kFloat && u_in.sizes() == drafts_in.sizes() && u_next_in.scalar_type() == at::kDouble &&
              u_next_in.dim() == 1 && u_next_in.size(0) == bsz,
              "accept_sampled: drafts must be int64 (batch, j), u float32 (batch, j), u_next float64 (batch,)");
  const at::Tensor p = p_in.contiguous(), q = q_in.contiguous(), drafts = drafts_in.contiguous(), u = u_in.contiguous(),
                   u_next = u_next_in.contiguous();
  const float *p0 = p.const_data_ptr<float>(), *q0 = q.const_data_ptr<float>(), *u0 = u.const_data_ptr<float>();
  const int64_t* d0 = drafts.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < bsz * j; ++i)
    TORCH_CHECK(d0[i] >= 0 && d0[i] < vocab, "accept_sampled: draft ", d0[i], " is not a token of the ", vocab);
  at::Tensor n_acc = at::empty({bsz}, drafts.options()), next = at::empty({bsz}, drafts.options()),
             tokens = at::zeros({bsz, j + 1}, drafts.options());
  int64_t *na = n_acc.mutable_data_ptr<int64_t>(), *nx = next.mutable_data_ptr<int64_t>(), *tk = tokens.mutable_data_ptr<int64_t>();
  std::vector<float> rest(vocab);
  for (int64_t b = 0; b < bsz; ++b) {
    int64_t n = 0;
    for (; n < j; ++n) {
      const int64_t x = d0[b * j + n];
      if (!(u0[b * j + n] * q0[(b * j + n) * vocab + x] < p0[(b * (j + 1) + n) * vocab + x])) break;
    }
    const float* pn = p0 + (b * (j + 1) + n) * vocab;
    const float* w = pn;
    if (n < j) {
      const float* qn = q0 + (b * j + n) * vocab;
      bool any = false;
      for (int64_t i = 0; i < vocab; ++i) {
        rest[i] = std::max(pn[i] - qn[i], 0.0f);
        any |= rest[i] > 0;
      }
      if (any) w = rest.data();
    }
    na[b] = n;
    nx[b] = draw_row(w, vocab, u_next.const_data_ptr<double>()[b]);
    std::copy_n(d0 + b * j, j, tk + b * (j + 1));
    tk[b * (j + 1) + n] = nx[b];
  }
  return {n_acc, next, tokens};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(multitoken, m) {
  m.def("top_p(Tensor probs, Tensor top_p) -> Tensor");
  m.def("draw(Tensor weights, Tensor u) -> Tensor");
  m.def("accept_sampled(Tensor p, Tensor q, Tensor drafts, Tensor u, Tensor u_next) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(multitoken, CPU, m) {
  m.impl("top_p", top_p);
  m.impl("draw", draw);
  m.impl("accept_sampled", accept_sampled);
}
