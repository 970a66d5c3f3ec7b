// A draft tree's bookkeeping between two forwards (multitoken/tree.py; multitoken/kernels.py: `tree_ops`),
// each as one call: choosing the tree from the heads' logits or candidates (`greedy_tree`, `best_tree`),
// its positions and attention mask (`tree_positions`; `row_positions` for a chain's), the greedy
// acceptance (`accept_greedy`; `accept_chain` for a chain's) and moving the accepted path's cached keys
// and values into place (`move_cache_entries`). In ATen these are 10-60 operator calls each on tensors of a few dozen numbers:
// ~0.5 ms of a tree step on a 2-core CPU, where the chain's bookkeeping is a few calls. Each gives what
// tree.py's ATen version gives (tests/test_kernels.py compares them).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <numeric>
#include <tuple>
#include <vector>

extern "C" __m512 Sleef_expf16_u10(__m512);

namespace {

// The lanes of the 16 floats from x[i] that lie before x[n].
inline __mmask16 lanes_before(int64_t n, int64_t i) { return (__mmask16)(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1); }

// How many candidates each depth of a dynamic tree keeps (the best `budget` expansions of the depth
// before), in all, and the tree's nodes: the same for every row.
struct TreeShape {
  std::vector<int64_t> kept;
  int64_t total = 0, nodes = 0;
  TreeShape(int64_t heads, int64_t ranks, int64_t budget) : kept(heads) {
    for (int64_t d = 0, beam = 1; d < heads; ++d) {
      kept[d] = std::min(budget, beam * ranks);
      beam = kept[d];
      total += kept[d];
    }
    nodes = std::min(budget, total);
  }
};

// tree.best_tree for one row, lb (heads x ranks) each head's candidates' log probabilities best first, ib
// their tokens: per depth, the `budget` best expansions of the previous depth's best, then the chain and
// the best nodes overall. The same float64 arithmetic as there (clamp, rank penalty, sums in the same
// order), so the same scores; candidates of equal score are taken in the order they were made (ATen's topk
// leaves that open). Writes tokens, parent, depth and rank of the root and the nodes (1 + shape.nodes each).
void row_tree(const float* lb, const int64_t* ib, int64_t heads, int64_t ranks, const TreeShape& shape, int64_t root,
              int64_t* tb, int64_t* pb, int64_t* db, int64_t* rb) {
  const int64_t total = shape.total, n = shape.nodes;
  std::vector<double> lp(heads * ranks), beam(1, 0.0), expanded, score(total);
  std::vector<int64_t> order, cand_parent(total), cand_depth(total), cand_rank(total), node_of(total + 1, 0);
  for (int64_t d = 0; d < heads; ++d)
    for (int64_t r = 0; r < ranks; ++r) {  // ATen: logp.double().clamp_min(-1e4) - 1e-6 * arange(1, ranks + 1) (float32)
      const double v = lb[d * ranks + r];  // a NaN (a broken model's) as the least likely: sorts need an order
      lp[d * ranks + r] = (std::isnan(v) ? -1e4 : std::max(v, -1e4)) - (double)((float)(r + 1) * 1e-6f);
    }
  int64_t first_id = 0, made = 0;  // the beam's candidate ids are first_id .. (0: the root)
  for (int64_t d = 0; d < heads; ++d) {
    const int64_t m = (int64_t)beam.size(), keep = shape.kept[d];
    expanded.resize(m * ranks);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t r = 0; r < ranks; ++r) expanded[i * ranks + r] = beam[i] + lp[d * ranks + r];
    order.resize(m * ranks);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                      [&](int64_t x, int64_t y) { return expanded[x] > expanded[y] || (expanded[x] == expanded[y] && x < y); });
    beam.resize(keep);
    for (int64_t j = 0; j < keep; ++j) {
      const int64_t x = order[j], c = made + j;
      beam[j] = score[c] = expanded[x];
      cand_parent[c] = d == 0 ? 0 : first_id + x / ranks;
      cand_depth[c] = d + 1;
      cand_rank[c] = x % ranks;
    }
    first_id = 1 + made;
    made += keep;
  }
  // The chain's nodes (the first of each depth) first, then by score; candidate c has id 1 + c.
  order.resize(total);
  std::iota(order.begin(), order.end(), 0);
  for (int64_t d = 0, c = 0; d < heads; c += shape.kept[d++]) score[c] += 1e6;
  std::partial_sort(order.begin(), order.begin() + n, order.end(),
                    [&](int64_t x, int64_t y) { return score[x] > score[y] || (score[x] == score[y] && x < y); });
  for (int64_t i = 0; i < n; ++i) node_of[1 + order[i]] = i + 1;
  pb[0] = db[0] = rb[0] = 0;
  tb[0] = root;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = order[i];
    pb[i + 1] = node_of[cand_parent[c]];
    db[i + 1] = cand_depth[c];
    rb[i + 1] = cand_rank[c];
    tb[i + 1] = ib[(cand_depth[c] - 1) * ranks + cand_rank[c]];
  }
}

using TreeTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Every row's tree: fill(b, lb, ib) writes row b's candidates (heads x ranks log probabilities, tokens).
template <typename Fill>
TreeTensors trees(int64_t bsz, int64_t heads, int64_t ranks, int64_t budget, const at::Tensor& root_in, Fill fill) {
  TORCH_CHECK(root_in.dim() == 1 && root_in.size(0) == bsz && root_in.scalar_type() == at::kLong, "best_tree: root must be (batch,) int64");
  TORCH_CHECK(budget >= 1, "best_tree: a budget of at least 1 node, got ", budget);
  TORCH_CHECK(heads >= 1 && ranks >= 1, "best_tree: the candidates need a head and a rank");
  const at::Tensor root = root_in.contiguous();
  const TreeShape shape(heads, ranks, budget);
  const int64_t w = shape.nodes + 1;
  at::Tensor tokens = at::empty({bsz, w}, root.options()), parent = at::empty({bsz, w}, root.options()),
             depth = at::empty({bsz, w}, root.options()), rank = at::empty({bsz, w}, root.options());
  std::vector<float> lb(heads * ranks);
  std::vector<int64_t> ib(heads * ranks);
  for (int64_t b = 0; b < bsz; ++b) {
    fill(b, lb.data(), ib.data());
    row_tree(lb.data(), ib.data(), heads, ranks, shape, root.const_data_ptr<int64_t>()[b], tokens.mutable_data_ptr<int64_t>() + b * w,
             parent.mutable_data_ptr<int64_t>() + b * w, depth.mutable_data_ptr<int64_t>() + b * w, rank.mutable_data_ptr<int64_t>() + b * w);
  }
  return {tokens, parent, depth, rank};
}

// tree.best_tree and the drafter's gather of the nodes' tokens: logp (batch, heads, ranks) float32 each
// head's candidates' log probabilities best first, ids their tokens, root (batch,) the roots' tokens.
// Returns the trees' tokens, parent, depth and rank, each (batch, 1 + nodes) int64, the root first.
TreeTensors best_tree(const at::Tensor& logp_in, const at::Tensor& ids_in, const at::Tensor& root, int64_t budget) {
  TORCH_CHECK(logp_in.dim() == 3 && logp_in.scalar_type() == at::kFloat, "best_tree: logp must be (batch, heads, ranks) float32");
  TORCH_CHECK(ids_in.sizes() == logp_in.sizes() && ids_in.scalar_type() == at::kLong, "best_tree: ids must be int64 like logp");
  const at::Tensor logp = logp_in.contiguous(), ids = ids_in.contiguous();
  const int64_t heads = logp.size(1), ranks = logp.size(2), per_row = heads * ranks;
  return trees(logp.size(0), heads, ranks, budget, root, [&](int64_t b, float* lb, int64_t* ib) {
    std::memcpy(lb, logp.const_data_ptr<float>() + b * per_row, per_row * sizeof(float));
    std::memcpy(ib, ids.const_data_ptr<int64_t>() + b * per_row, per_row * sizeof(int64_t));
  });
}

// The greedy drafter's whole tree from the extra heads' logits (batch, heads, vocab) float32: each head's
// `ranks` best tokens (the larger logit first, the lower id of equal ones, as argmax picks) and their log
// probabilities (logit - max - log(sum(exp(logit - max)))), then best_tree. ATen's log_softmax and topk
// give the same log probabilities but for the last bits of the sum, and may order equal logits otherwise.
TreeTensors greedy_tree(const at::Tensor& logits_in, const at::Tensor& root, int64_t budget, int64_t ranks) {
  TORCH_CHECK(logits_in.dim() == 3 && logits_in.scalar_type() == at::kFloat, "greedy_tree: logits must be (batch, heads, vocab) float32");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t heads = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK(ranks >= 1 && ranks <= vocab, "greedy_tree: ranks must be in 1 .. ", vocab, ", got ", ranks);
  std::vector<std::pair<float, int64_t>> best;
  const auto before = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  return trees(logits.size(0), heads, ranks, budget, root, [&](int64_t b, float* lb, int64_t* ib) {
    for (int64_t d = 0; d < heads; ++d) {
      const float* x = logits.const_data_ptr<float>() + (b * heads + d) * vocab;
      // The best `ranks` as a heap whose top is the worst kept: 16 logits at a time against it, most losing at once.
      best.clear();
      for (int64_t i = 0; i < ranks; ++i) {
        best.emplace_back(std::isnan(x[i]) ? -INFINITY : x[i], i);  // (later NaNs never pass the test below)
        std::push_heap(best.begin(), best.end(), before);
      }
      const auto offer = [&](int64_t i) {
        if (x[i] > best.front().first) {  // an equal logit has a higher id: it loses
          std::pop_heap(best.begin(), best.end(), before);
          best.back() = {x[i], i};
          std::push_heap(best.begin(), best.end(), before);
        }
      };
      __m512 most = _mm512_set1_ps(-INFINITY);
      for (int64_t i = 0; i < vocab; i += 16) {
        const __mmask16 in = lanes_before(vocab, i);
        const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), in, x + i);
        most = _mm512_max_ps(most, v);
        for (uint32_t over = _mm512_mask_cmp_ps_mask(in, v, _mm512_set1_ps(best.front().first), _CMP_GT_OQ); over;
             over &= over - 1) {
          const int64_t j = i + __builtin_ctz(over);
          if (j >= ranks) offer(j);
        }
      }
      const float top = _mm512_reduce_max_ps(most);
      std::sort_heap(best.begin(), best.end(), before);
      // The sum in 16 float32 lanes with ATen's exp (SLEEF's, which libtorch_cpu exports), then across them.
      const __m512 mx = _mm512_set1_ps(top);
      __m512 lanes = _mm512_setzero_ps();
      for (int64_t i = 0; i < vocab; i += 16) {
        const __mmask16 in = lanes_before(vocab, i);
        const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, x + i), mx));
        lanes = _mm512_add_ps(lanes, _mm512_maskz_mov_ps(in, e));
      }
      const float log_sum = std::log(_mm512_reduce_add_ps(lanes));
      for (int64_t r = 0; r < ranks; ++r) {
        lb[d * ranks + r] = best[r].first - top - log_sum;
        ib[d * ranks + r] = best[r].second;
      }
    }
  });
}

// Positions of `n` tokens per row (slots start[b] .. start[b] + n - 1), token i rotated as position start[b] +
// depth[i] (its row of `rope`, (positions, ...)) and seeing the row's cache before start[b], itself and its
// ancestors (parent[i], ..., the root: token 0); parent and depth (batch, n) or, for a chain of tokens (each
// the parent of the next), null. Returns slots (batch, n), rotary rows (batch, n, ...) and the mask (batch,
// 1, n, end), end = max(start) + n.
std::tuple<at::Tensor, at::Tensor, at::Tensor> positions_of(const int64_t* p0, const int64_t* d0, const at::Tensor& start_in,
                                                             int64_t n, const at::Tensor& rope_in) {
  TORCH_CHECK(start_in.dim() == 1 && start_in.scalar_type() == at::kLong, "positions: start must be (batch,) int64");
  TORCH_CHECK(rope_in.dim() >= 1 && rope_in.scalar_type() == at::kFloat, "positions: rope must be a float32 table");
  const at::Tensor start = start_in.contiguous(), rope = rope_in.contiguous();
  const int64_t bsz = start.size(0), positions = rope.size(0), row = rope.numel() / positions;
  const int64_t* s0 = start.const_data_ptr<int64_t>();
  int64_t end = 0;
  for (int64_t b = 0; b < bsz; ++b) {
    TORCH_CHECK(s0[b] >= 0, "positions: a negative start (", s0[b], ")");
    end = std::max(end, s0[b] + n);
    for (int64_t i = 0; p0 && i < n; ++i)
      TORCH_CHECK((i == 0 ? p0[b * n] == 0 : p0[b * n + i] >= 0 && p0[b * n + i] < i) && d0[b * n + i] >= 0,
                  "tree_positions: node ", i, " must come after its parent (parent ", p0[b * n + i], ", depth ",
                  d0[b * n + i], ")");
  }
  TORCH_CHECK(end <= positions, "positions: position ", end - 1, " is past max_seq_len=", positions);
  std::vector<int64_t> rope_shape = {bsz, n};
  for (int64_t d = 1; d < rope.dim(); ++d) rope_shape.push_back(rope.size(d));
  at::Tensor slots = at::empty({bsz, n}, start.options()), rows = at::empty(rope_shape, rope.options()),
             mask = at::zeros({bsz, 1, n, end}, start.options().dtype(at::kBool));
  int64_t* sl = slots.mutable_data_ptr<int64_t>();
  float* ro = rows.mutable_data_ptr<float>();
  bool* m0 = mask.mutable_data_ptr<bool>();
  for (int64_t b = 0; b < bsz; ++b)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t at_pos = s0[b] + (d0 ? d0[b * n + i] : i);
      TORCH_CHECK(at_pos < positions, "positions: position ", at_pos, " is past max_seq_len=", positions);
      sl[b * n + i] = s0[b] + i;
      std::memcpy(ro + (b * n + i) * row, rope.const_data_ptr<float>() + at_pos * row, row * sizeof(float));
      bool* mi = m0 + (b * n + i) * end;
      if (!p0) {
        std::fill(mi, mi + s0[b] + i + 1, true);
        continue;
      }
      std::fill(mi, mi + s0[b], true);
      for (int64_t j = i;; j = p0[b * n + j]) {  // itself and its ancestors, up to the root
        mi[s0[b] + j] = true;
        if (j == 0) break;
      }
    }
  return {slots, rows, mask};
}

// tree.tree_positions, eagerly: a tree's nodes (parent, depth: (batch, nodes) int64, parents first).
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_positions(const at::Tensor& parent_in, const at::Tensor& depth_in,
                                                               const at::Tensor& start, const at::Tensor& rope) {
  TORCH_CHECK(parent_in.dim() == 2 && depth_in.sizes() == parent_in.sizes() && parent_in.scalar_type() == at::kLong &&
              depth_in.scalar_type() == at::kLong && parent_in.size(0) == start.size(0),
              "tree_positions: parent and depth must be (batch, nodes) int64, a row per start");
  const at::Tensor parent = parent_in.contiguous(), depth = depth_in.contiguous();
  return positions_of(parent.const_data_ptr<int64_t>(), depth.const_data_ptr<int64_t>(), start, parent.size(1), rope);
}

// Transformer.positions(start, batch, seqlen) for per-row starts, eagerly: each row's tokens at their own
// offset, each seeing the row's cache up to itself.
std::tuple<at::Tensor, at::Tensor, at::Tensor> row_positions(const at::Tensor& start, int64_t seqlen, const at::Tensor& rope) {
  TORCH_CHECK(seqlen >= 1, "positions: at least one token a row, got ", seqlen);
  return positions_of(nullptr, nullptr, start, seqlen, rope);
}

// The 16 values from x[i] of x[0 .. n) as float32 (bf16 converts exactly); -inf in the lanes past n.
inline __m512 load_lanes(const float* x, int64_t n, int64_t i) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes_before(n, i), x + i);
}
inline __m512 load_lanes(const at::BFloat16* x, int64_t n, int64_t i) {
  const __mmask16 in = lanes_before(n, i);
  const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, x + i)), 16);
  return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), in, _mm512_castsi512_ps(bits));
}

// The first index of the largest of x[0 .. n) (of the first NaN, if any: torch.max's), float32 or bf16.
template <typename T>
int64_t argmax(const T* x, int64_t n) {
  __m512 most = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load_lanes(x, n, i);
    if (const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) return i + __builtin_ctz(nan);
    most = _mm512_max_ps(most, v);
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(most));
  for (int64_t i = 0; i < n; i += 16)
    if (const __mmask16 at = _mm512_mask_cmp_ps_mask(lanes_before(n, i), load_lanes(x, n, i), top, _CMP_EQ_OQ))
      return i + __builtin_ctz(at);
  return 0;
}

// A greedy self-speculative step's acceptance (steps.DecodeSteps._greedy), given the logits (batch, seq, heads,
// vocab), float32 or bf16, of every head at every token of tokens (batch, seq): each row's last token then its
// drafts. Returns the next-token head's argmax at every token (batch, seq); how many drafts each row accepts,
// those equal to that argmax at the token before them, up to the first that is not (batch,); and the extra
// heads' argmax at the last accepted token (batch, heads - 1): the next step's drafts.
std::tuple<at::Tensor, at::Tensor, at::Tensor> accept_chain(const at::Tensor& tokens_in, const at::Tensor& logits_in) {
  TORCH_CHECK(tokens_in.dim() == 2 && tokens_in.scalar_type() == at::kLong && tokens_in.size(1) >= 1,
              "accept_chain: tokens must be int64 (batch, seq)");
  TORCH_CHECK(logits_in.dim() == 4 && logits_in.size(0) == tokens_in.size(0) && logits_in.size(1) == tokens_in.size(1) &&
              logits_in.size(2) >= 1 && logits_in.size(3) >= 1 &&
              (logits_in.scalar_type() == at::kFloat || logits_in.scalar_type() == at::kBFloat16),
              "accept_chain: logits must be float32 or bfloat16 (batch, seq, heads, vocab) for tokens (batch, seq)");
  const at::Tensor tokens = tokens_in.contiguous(), logits = logits_in.contiguous();
  const int64_t bsz = tokens.size(0), seq = tokens.size(1), heads = logits.size(2), vocab = logits.size(3);
  auto best = [&](int64_t b, int64_t i, int64_t g) {
    const int64_t row = ((b * seq + i) * heads + g) * vocab;
    return logits.scalar_type() == at::kFloat ? argmax(logits.const_data_ptr<float>() + row, vocab)
                                              : argmax(logits.const_data_ptr<at::BFloat16>() + row, vocab);
  };
  at::Tensor target = at::empty({bsz, seq}, tokens.options()), n_acc = at::empty({bsz}, tokens.options()),
             drafts = at::empty({bsz, heads - 1}, tokens.options());
  const int64_t* t0 = tokens.const_data_ptr<int64_t>();
  int64_t *tg = target.mutable_data_ptr<int64_t>(), *na = n_acc.mutable_data_ptr<int64_t>(),
          *dr = drafts.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < bsz; ++b) {
    for (int64_t i = 0; i < seq; ++i) tg[b * seq + i] = best(b, i, 0);
    int64_t j = 0;
    while (j + 1 < seq && t0[b * seq + j + 1] == tg[b * seq + j]) ++j;
    na[b] = j;
    for (int64_t g = 1; g < heads; ++g) dr[b * (heads - 1) + g - 1] = best(b, j, g);
  }
  return {target, n_acc, drafts};
}

// tree.accept_greedy and what tree.generate takes of it, given the next-token head's logits at every node
// (batch, nodes, vocab) float32: its argmax at each (the first of equal logits, as sampling.greedy's, a NaN
// above all); the accepted path (batch, width) of node indices, root first, padded with the last node past
// each row's draft count, width = 1 + the most drafts any row accepted; the draft counts (batch,); the token
// after each row's path (batch,); and the step's tokens (batch, width): the path's drafts, then that token
// (then the padding's tokens).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> accept_greedy(const at::Tensor& tokens_in, const at::Tensor& parent_in,
                                                                         const at::Tensor& depth_in, const at::Tensor& logits_in) {
  TORCH_CHECK(tokens_in.dim() == 2 && parent_in.sizes() == tokens_in.sizes() && depth_in.sizes() == tokens_in.sizes(),
              "accept_greedy: tokens, parent and depth must all be (batch, nodes)");
  for (const at::Tensor* t : {&tokens_in, &parent_in, &depth_in})
    TORCH_CHECK(t->scalar_type() == at::kLong, "accept_greedy: int64 tokens, parent and depth");
  TORCH_CHECK(logits_in.dim() == 3 && logits_in.size(0) == tokens_in.size(0) && logits_in.size(1) == tokens_in.size(1) &&
              logits_in.size(2) >= 1 && logits_in.scalar_type() == at::kFloat,
              "accept_greedy: logits must be (batch, nodes, vocab) float32");
  const at::Tensor tokens = tokens_in.contiguous(), parent = parent_in.contiguous(), depth = depth_in.contiguous(),
                   logits = logits_in.contiguous();
  const int64_t bsz = tokens.size(0), n = tokens.size(1), vocab = logits.size(2);
  TORCH_CHECK(n >= 1, "accept_greedy: a tree has a root");
  std::vector<int64_t> target(bsz * n);
  for (int64_t i = 0; i < bsz * n; ++i) target[i] = argmax(logits.const_data_ptr<float>() + i * vocab, vocab);
  const int64_t *t0 = tokens.const_data_ptr<int64_t>(), *p0 = parent.const_data_ptr<int64_t>(),
                *d0 = depth.const_data_ptr<int64_t>(), *g0 = target.data();
  std::vector<uint8_t> on_path(n);
  std::vector<int64_t> best(bsz);
  at::Tensor n_acc = at::empty({bsz}, tokens.options()), next = at::empty({bsz}, tokens.options());
  int64_t* na = n_acc.mutable_data_ptr<int64_t>();
  int64_t width = 1;
  for (int64_t b = 0; b < bsz; ++b) {
    const int64_t *tb = t0 + b * n, *pb = p0 + b * n, *db = d0 + b * n, *gb = g0 + b * n;
    on_path[0] = 1;
    best[b] = 0;
    TORCH_CHECK(db[0] == 0, "accept_greedy: the root's depth must be 0, got ", db[0]);
    for (int64_t i = 1; i < n; ++i) {
      TORCH_CHECK(pb[i] >= 0 && pb[i] < i && db[i] == db[pb[i]] + 1, "accept_greedy: node ", i,
                  " must come after its parent, one deeper (parent ", pb[i], ", depth ", db[i], ")");
      on_path[i] = on_path[pb[i]] && tb[i] == gb[pb[i]];
      if (on_path[i] && db[i] > db[best[b]]) best[b] = i;  // the deepest, the first of equals (an argmax)
    }
    na[b] = db[best[b]];
    width = std::max(width, na[b] + 1);
  }
  at::Tensor path = at::empty({bsz, width}, tokens.options()), step = at::empty({bsz, width}, tokens.options());
  int64_t *pa = path.mutable_data_ptr<int64_t>(), *st = step.mutable_data_ptr<int64_t>(), *nx = next.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < bsz; ++b) {
    int64_t* pr = pa + b * width;
    std::fill(pr, pr + width, n - 1);
    for (int64_t node = best[b], j = na[b]; j >= 0; node = p0[b * n + node], --j) pr[j] = node;
    nx[b] = g0[b * n + best[b]];
    for (int64_t j = 0; j + 1 < width; ++j) st[b * width + j] = t0[b * n + pr[j + 1]];
    st[b * width + width - 1] = 0;
    st[b * width + na[b]] = nx[b];
  }
  return {path, n_acc, next, step};
}

// Transformer.move_cache_entries over the given caches (each (rows, kv_heads, slots, head_dim)): row b's
// entries at slots src[b] copied to slots dst[b] (both (batch, n)), every source read before any is written.
void move_cache_entries(at::TensorList caches, const at::Tensor& src_in, const at::Tensor& dst_in) {
  TORCH_CHECK(src_in.dim() == 2 && dst_in.sizes() == src_in.sizes() && src_in.scalar_type() == at::kLong &&
              dst_in.scalar_type() == at::kLong, "move_cache_entries: src and dst must be (batch, n) int64");
  const at::Tensor src = src_in.contiguous(), dst = dst_in.contiguous();
  const int64_t bsz = src.size(0), n = src.size(1);
  const int64_t *s0 = src.const_data_ptr<int64_t>(), *t0 = dst.const_data_ptr<int64_t>();
  std::vector<char> moved;
  for (const at::Tensor& cache : caches) {
    TORCH_CHECK(cache.dim() == 4 && cache.is_contiguous() && cache.size(0) >= bsz,
                "move_cache_entries: caches must be contiguous (rows, kv_heads, slots, head_dim) with a row per batch row");
    const int64_t heads = cache.size(1), slots = cache.size(2), entry = cache.size(3) * cache.element_size();
    char* base = static_cast<char*>(cache.data_ptr());
    moved.resize(n * heads * entry);
    for (int64_t b = 0; b < bsz; ++b) {
      for (int64_t j = 0; j < n; ++j)
        TORCH_CHECK(s0[b * n + j] >= 0 && s0[b * n + j] < slots && t0[b * n + j] >= 0 && t0[b * n + j] < slots,
                    "move_cache_entries: slot out of range");
      char* row = base + b * heads * slots * entry;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < heads; ++h)
          std::memcpy(moved.data() + (j * heads + h) * entry, row + (h * slots + s0[b * n + j]) * entry, entry);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < heads; ++h)
          std::memcpy(row + (h * slots + t0[b * n + j]) * entry, moved.data() + (j * heads + h) * entry, entry);
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(multitoken, m) {
  m.def("best_tree(Tensor logp, Tensor ids, Tensor root, int budget) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("greedy_tree(Tensor logits, Tensor root, int budget, int ranks) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("tree_positions(Tensor parent, Tensor depth, Tensor start, Tensor rope) -> (Tensor, Tensor, Tensor)");
  m.def("row_positions(Tensor start, int seqlen, Tensor rope) -> (Tensor, Tensor, Tensor)");
  m.def("accept_greedy(Tensor tokens, Tensor parent, Tensor depth, Tensor logits) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("accept_chain(Tensor tokens, Tensor logits) -> (Tensor, Tensor, Tensor)");
  m.def("move_cache_entries(Tensor(a!)[] caches, Tensor src, Tensor dst) -> ()");
}

TORCH_LIBRARY_IMPL(multitoken, CPU, m) {
  m.impl("best_tree", best_tree);
  m.impl("greedy_tree", greedy_tree);
  m.impl("tree_positions", tree_positions);
  m.impl("row_positions", row_positions);
  m.impl("accept_greedy", accept_greedy);
  m.impl("accept_chain", accept_chain);
  m.impl("move_cache_entries", move_cache_entries);
}
