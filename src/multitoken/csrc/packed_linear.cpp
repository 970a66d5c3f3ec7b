// Products of a few rows with bf16 weights on x86-64 CPUs with AVX-512 BF16 (multitoken/kernels.py), and
// the rest of a bf16 decode step that eager ATen spreads over many operator calls: attention of a few
// queries, RMSNorm, rotary embeddings and the KV cache's indexed store.
//
// A decode step multiplies a handful of rows (1 token, or the last token and its drafts) by every weight
// matrix. The weights are packed once so that one 64-byte load holds 2 consecutive inputs of 16 outputs,
// the layout of the vdpbf16ps instruction: each load then serves every row, each row's input pair is one
// broadcast, and outputs need no horizontal sums. Every output is the same sequence of float32 multiply-
// adds over the inputs whatever the other rows are, so a row's result does not depend on how many rows
// the product has: a verify step computes each token exactly as a 1-token step does. The same layout is
// the rows of an AMX weight tile (16 pairs of a block, 512 bytes apart): on CPUs with AMX the products
// run on its tiles (`amx_available`).
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <torch/library.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <utility>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

// ATen's own exp of 16 floats (SLEEF, exported by libtorch_cpu): what its vectorised SiLU calls, so that
// silu_mul gives ATen's numbers bit for bit.
extern "C" __m512 Sleef_expf16_u10(__m512);

namespace {

constexpr int64_t kBlock = 16;  // outputs per 512-bit vector of float32 sums
constexpr int64_t kTile = 8;    // blocks per tile, the packing's unit: a tile's weights are one stream in memory
constexpr int kMaxRows = 8;     // rows per group: each group of rows takes a tile in turn
// With more than one row, pairs this far ahead are prefetched: a tile is read more than once, and a
// pass of 7-8 rows reads 2 of a tile's 8 vectors per pair, a stride the hardware prefetchers follow
// too late (rows 2-17 of the shipped model's products took 15-25% longer without it).
constexpr int64_t kPrefetchPairs = 32;

// Rows x[0 .. R) times NB blocks of 16 packed outputs of one tile (w: its first block's first vector),
// written to y[:, n0 ...) up to `width` outputs (past it: the packing's zero padding). R * NB sums in
// registers, independent of each other, so that the multiply-adds' latency is hidden even for a single
// row; each output's sum runs over the input pairs in order, whatever R and NB are. With more sums than
// registers hold beside NB weight vectors (3 rows of 8 blocks), each weight vector is loaded in turn.
template <int R, int NB>
void product_tile(const int32_t* x, int64_t pairs, const __m512i* w, at::BFloat16* y, int64_t y_stride, int64_t n0,
                  int64_t width) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    if constexpr (R > 1)  // past the end of the weights: harmless, prefetches never fault
      for (int b = 0; b < NB; ++b) _mm_prefetch((const char*)(w + (p + kPrefetchPairs) * kTile + b), _MM_HINT_T0);
    if constexpr (R * NB + NB + 1 <= 30) {
      __m512bh wb[NB];
      for (int b = 0; b < NB; ++b) wb[b] = (__m512bh)_mm512_loadu_si512(w + p * kTile + b);
      for (int r = 0; r < R; ++r) {
        const __m512bh xr = (__m512bh)_mm512_set1_epi32(x[r * pairs + p]);
        for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xr, wb[b]);
      }
    } else {
      __m512bh xr[R];
      for (int r = 0; r < R; ++r) xr[r] = (__m512bh)_mm512_set1_epi32(x[r * pairs + p]);
      for (int b = 0; b < NB; ++b) {
        const __m512bh wb = (__m512bh)_mm512_loadu_si512(w + p * kTile + b);
        for (int r = 0; r < R; ++r) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xr[r], wb);
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(kBlock, width - b * kBlock));
    const __mmask16 mask = (__mmask16)((1u << valid) - 1);
    for (int r = 0; r < R; ++r)
      _mm256_mask_storeu_epi16(y + r * y_stride + n0 + b * kBlock, mask, (__m256i)_mm512_cvtneps_pbh(acc[r][b]));
  }
}

// Rows x[0 .. R) times one tile. Up to 6 rows, passes of up to 3 rows over all 8 blocks (at most 24 sums
// in registers): each pass reads the tile's weights in order, the first from memory, the others from
// the second-level cache. Passes of half the rows over half the blocks read each pair's 512 bytes 256
// at a time, and 3-6 rows took 15-25% longer that way; 7-8 rows keep passes of 2 blocks (16 sums),
// whose fewer loads per multiply-add win there.
template <int R>
void tile_rows(const int32_t* x, int64_t pairs, const __m512i* w, at::BFloat16* y, int64_t n, int64_t n0) {
  if constexpr (R >= 7) {
    for (int64_t j = 0; j < kTile; j += 2) {
      const int64_t o = n0 + j * kBlock;
      if (o >= n) break;
      product_tile<R, 2>(x, pairs, w + j, y, n, o, n - o);
    }
  } else {
    constexpr int first = R == 4 ? 2 : (R < 3 ? R : 3);
    product_tile<first, kTile>(x, pairs, w, y, n, n0, n - n0);
    if constexpr (R > first) tile_rows<R - first>(x + first * pairs, pairs, w, y + first * n, n, n0);
  }
}

template <int R>
void product_rows(const int32_t* x, int64_t pairs, const __m512i* packed, at::BFloat16* y, int64_t n,
                  int64_t tile_begin, int64_t tile_end) {
  for (int64_t t = tile_begin; t < tile_end; ++t)
    tile_rows<R>(x, pairs, packed + t * pairs * kTile, y, n, t * kTile * kBlock);
}

using RowsFn = void (*)(const int32_t*, int64_t, const __m512i*, at::BFloat16*, int64_t, int64_t, int64_t);
constexpr RowsFn kRowsFns[kMaxRows] = {product_rows<1>, product_rows<2>, product_rows<3>, product_rows<4>,
                                       product_rows<5>, product_rows<6>, product_rows<7>, product_rows<8>};

void check_packed(const at::Tensor& packed, int64_t k, int64_t out_features) {
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 && packed.size(2) == kTile &&
              packed.size(3) == 2 * kBlock && packed.is_contiguous(),
              "packed_linear: packed weights must come from multitoken.kernels.pack_weight");
  const int64_t pairs = packed.size(1), tiles = packed.size(0);
  TORCH_CHECK(k == 2 * pairs, "packed_linear: x has ", k, " features, the packed weights ", 2 * pairs);
  TORCH_CHECK(out_features > (tiles - 1) * kTile * kBlock && out_features <= tiles * kTile * kBlock,
              "packed_linear: ", out_features, " outputs do not match ", tiles, " packed tiles");
}

// AMX (Intel's tile matrix unit), where the CPU has it and Linux grants the process its tile state:
// TDPBF16PS multiplies up to 16 rows by 16 outputs over 32 inputs in one instruction. Its float32
// sums are not vdpbf16ps's bit for bit, but each output's depends only on its own row, as theirs does:
// so on such a CPU every product whose inputs are a multiple of 32 runs on it, whatever its rows, and
// a verify step still computes each token exactly as a 1-token step does. MULTITOKEN_AMX=0 turns it off.
constexpr int64_t kAmxInputs = 32;  // inputs per tile multiply: 16 pairs
#ifdef MULTITOKEN_NO_AMX  // built by a compiler without AMX (kernels._build)
bool amx_available() { return false; }
void configure_tiles(int64_t) {}
void amx_tile_rows(const at::BFloat16*, int64_t, int64_t, const __m512i*, at::BFloat16*, int64_t, int64_t) {}
void release_tiles() {}
void amx_scores(const __m512i*, int64_t, int64_t, const at::BFloat16*, int64_t, int64_t, float*, int64_t, int64_t&) {}
#else
bool amx_available() {
  static const bool ok = [] {
    const char* env = std::getenv("MULTITOKEN_AMX");
    if (env && std::string(env) == "0") return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return false;  // AMX-BF16, AMX-TILE
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0 the rows' 32 inputs, 1-3 a block's 16 pairs x 16 outputs, 4-7 four blocks' sums.
void configure_tiles(int64_t rows) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = (t >= 1 && t <= 3) ? 16 : (uint8_t)rows;
  }
  _tile_loadconfig(&config);
}

// Rows x[0 .. R) (R <= 16, `inputs` each, a multiple of 32) times one packed tile of 8 blocks (w: its
// first pair), written to y[:, n0 ...) up to n outputs. Each output sums the 32-input chunks in order.
void amx_tile_rows(const at::BFloat16* x, int64_t inputs, int64_t rows, const __m512i* w, at::BFloat16* y, int64_t n,
                   int64_t n0) {
  alignas(64) float sums[16 * kBlock];
  constexpr int64_t stride = kTile * 64;  // bytes from one pair of a block to the next
  for (int64_t half = 0; half < kTile; half += 4) {
    const int64_t o0 = n0 + half * kBlock;
    if (o0 >= n) break;
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t c = 0; c < inputs / kAmxInputs; ++c) {
      _tile_loadd(0, x + c * kAmxInputs, inputs * 2);
      const __m512i* wc = w + c * (kAmxInputs / 2) * kTile + half;
      _tile_loadd(1, wc, stride);
      _tile_dpbf16ps(4, 0, 1);
      _tile_loadd(2, wc + 1, stride);
      _tile_dpbf16ps(5, 0, 2);
      _tile_loadd(3, wc + 2, stride);
      _tile_dpbf16ps(6, 0, 3);
      _tile_loadd(1, wc + 3, stride);
      _tile_dpbf16ps(7, 0, 1);
    }
    for (int64_t b = 0; b < 4; ++b) {
      switch (b) {
        case 0: _tile_stored(4, sums, kBlock * 4); break;
        case 1: _tile_stored(5, sums, kBlock * 4); break;
        case 2: _tile_stored(6, sums, kBlock * 4); break;
        default: _tile_stored(7, sums, kBlock * 4); break;
      }
      const int64_t o = o0 + b * kBlock;
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(kBlock, n - o));
      if (valid == 0) break;
      const __mmask16 mask = (__mmask16)((1u << valid) - 1);
      for (int64_t r = 0; r < rows; ++r)
        _mm256_mask_storeu_epi16(y + r * n + o, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums + r * kBlock)));
    }
  }
}

void release_tiles() { _tile_release(); }

// r[i] lane j becomes r[j] lane i: a 16 x 16 transpose of 32-bit values (two bf16 each), in 64 shuffles.
__attribute__((always_inline)) inline void transpose16x16(__m512i* r) {
  __m512i u[16];
  for (int g = 0; g < 4; ++g) {
    const __m512i t0 = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]), t1 = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
    const __m512i t2 = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]), t3 = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
    // u[4 g + c]: 128-bit block L holds column 4 L + c of rows 4 g .. 4 g + 3.
    u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
  }
  for (int c = 0; c < 4; ++c) {  // the 4 x 4 transpose of 128-bit blocks
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44), v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// Tiles for attention scores: 0 16 keys' 32 dimensions, 1 up to 16 queries' 32 dimensions as pairs (the
// transposed queries), 2 the 16 keys' scores for those queries.
void configure_score_tiles(int64_t queries) {
  TileConfig config;
  for (int t = 0; t < 3; ++t) {
    config.colsb[t] = t == 0 ? 64 : (uint16_t)(queries * 4);
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

// Every query's dot products with every key on AMX tiles: q (queries x chunks vectors of 32 bf16, zeros past
// head_dim), k (keys rows k_stride apart, head_dim = 32 chunks), scores[j * ld + s] for query j, key s (16
// keys a tile; scores past the last key are zeros). The keys are the tile product's rows as the cache holds
// them; the queries, transposed once, its columns. A score is one tile product's sum over the dimensions,
// whatever the other queries and keys: a token's scores are the same in any step. `configured`: the query
// count the thread's tiles are set for (0: none yet).
void amx_scores(const __m512i* q, int64_t chunks, int64_t queries, const at::BFloat16* k, int64_t k_stride, int64_t keys,
                float* scores, int64_t ld, int64_t& configured) {
  alignas(64) __m512i qt[8][16];  // per chunk: 16 pairs of dimensions x up to 16 queries
  alignas(64) __m512i last[8][16];  // a last block of fewer than 16 keys, zero-padded (never read past the keys)
  alignas(64) float block[16][16];  // a tile's scores: 16 keys x the queries
  for (int64_t j0 = 0; j0 < queries; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, queries - j0);
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i* r = qt[c];
      for (int64_t i = 0; i < 16; ++i) r[i] = i < nj ? q[(j0 + i) * chunks + c] : _mm512_setzero_si512();
      transpose16x16(r);
    }
    if (nj != configured) configure_score_tiles(configured = nj);
    for (int64_t s0 = 0; s0 < keys; s0 += 16) {
      const int64_t n = std::min<int64_t>(16, keys - s0);
      const at::BFloat16* rows = k + s0 * k_stride;
      const int64_t stride = k_stride * 2;
      if (n < 16) {
        for (int64_t c = 0; c < chunks; ++c)
          for (int64_t i = 0; i < 16; ++i)
            last[c][i] = i < n ? _mm512_loadu_si512(k + (s0 + i) * k_stride + 32 * c) : _mm512_setzero_si512();
      }
      _tile_zero(2);
      for (int64_t c = 0; c < chunks; ++c) {
        if (n < 16) _tile_loadd(0, last[c], 64);
        else _tile_loadd(0, rows + 32 * c, stride);
        _tile_loadd(1, qt[c], 64);
        _tile_dpbf16ps(2, 0, 1);
      }
      _tile_stored(2, block, 64);
      // Each query's 16 scores: a column of the tile's.
      __m512i* cols = reinterpret_cast<__m512i*>(block);
      if (nj > 4) {
        transpose16x16(cols);
        for (int64_t j = 0; j < nj; ++j) _mm512_storeu_si512(scores + (j0 + j) * ld + s0, cols[j]);
      } else {
        const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(16));
        for (int64_t j = 0; j < nj; ++j)
          _mm512_storeu_ps(scores + (j0 + j) * ld + s0, _mm512_i32gather_ps(_mm512_add_epi32(index, _mm512_set1_epi32((int)j)), &block[0][0], 4));
      }
    }
  }
}
#endif  // MULTITOKEN_NO_AMX

// y[g] (rows, n) = x[g] (rows, k) @ W[g].T for each of the G weights, packed by pack_weight (each
// (tiles, k / 2, kTile, 2 * kBlock)): one loop over every product's tiles, which the threads split.
// Each output is computed as by a product of its own.
void products(const at::BFloat16* x, const std::vector<const __m512i*>& weights, int64_t tiles, int64_t pairs,
              int64_t rows, at::BFloat16* y, int64_t n) {
  const int64_t threads = at::get_num_threads(), total = (int64_t)weights.size() * tiles;
  const bool amx = (2 * pairs) % kAmxInputs == 0 && amx_available();
  at::parallel_for(0, total, (total + threads - 1) / threads, [&](int64_t i0, int64_t i1) {
    int64_t configured = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t g = i / tiles, t = i % tiles;
      if (amx) {
        const at::BFloat16* xg = x + g * rows * 2 * pairs;
        for (int64_t r0 = 0; r0 < rows; r0 += 16) {
          const int64_t r = std::min<int64_t>(16, rows - r0);
          if (r != configured) configure_tiles(configured = r);
          amx_tile_rows(xg + r0 * 2 * pairs, 2 * pairs, r, weights[g] + t * pairs * kTile, y + (g * rows + r0) * n, n,
                        t * kTile * kBlock);
        }
        continue;
      }
      const auto* xg = reinterpret_cast<const int32_t*>(x + g * rows * 2 * pairs);
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
        const int64_t r = std::min<int64_t>(kMaxRows, rows - r0);
        kRowsFns[r - 1](xg + r0 * pairs, pairs, weights[g], y + (g * rows + r0) * n, n, t, t + 1);
      }
    }
    if (configured) release_tiles();
  });
}

// y (rows, n) = x (rows, k) @ W.T, with W packed by pack_weight: (tiles, k / 2, kTile, 2 * kBlock).
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "packed_linear: x must be a bfloat16 CPU tensor");
  const int64_t k = x.size(-1);
  check_packed(packed, k, out_features);
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  at::Tensor y = at::empty(out_shape, x.options());
  if (x2.size(0) == 0) return y;
  products(x2.const_data_ptr<at::BFloat16>(), {reinterpret_cast<const __m512i*>(packed.const_data_ptr<at::BFloat16>())},
           packed.size(0), packed.size(1), x2.size(0), y.mutable_data_ptr<at::BFloat16>(), out_features);
  return y;
}

// y[g] = x[g] @ W[g].T for a group of G products of the same shape (x: (G, ..., k), packed: G packed
// weights), e.g. the extra heads' same projection: one call instead of G.
at::Tensor packed_linear_group(const at::Tensor& x, at::TensorList packed, int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16, "packed_linear_group: x must be a bfloat16 CPU tensor");
  TORCH_CHECK(x.dim() >= 2 && x.size(0) == (int64_t)packed.size() && !packed.empty(),
              "packed_linear_group: x must be (G, ..., k) for G = ", packed.size(), " packed weights");
  const int64_t k = x.size(-1);
  std::vector<const __m512i*> weights;
  for (const at::Tensor& w : packed) {
    check_packed(w, k, out_features);  // so every weight has the same shape
    weights.push_back(reinterpret_cast<const __m512i*>(w.const_data_ptr<at::BFloat16>()));
  }
  const at::Tensor x2 = x.contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  at::Tensor y = at::empty(out_shape, x.options());
  const int64_t rows = x2.numel() / (x.size(0) * k);
  if (rows == 0) return y;
  products(x2.const_data_ptr<at::BFloat16>(), weights, packed[0].size(0), packed[0].size(1), rows,
           y.mutable_data_ptr<at::BFloat16>(), out_features);
  return y;
}

// 16 bf16 values widened to float32 (a bf16 is the top half of a float32).
__attribute__((always_inline)) inline __m512 load_bf16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// exp of 16 floats: 2^n * exp(r), r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2], exp(r) by its Taylor series to
// r^7 (relative error below 1e-8 there); exp(-inf) = 0, as masked keys need.
__attribute__((always_inline)) inline __m512 exp_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: r exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 e = _mm512_scalef_ps(p, n);
  // Below -87 the result is denormal or zero anyway, and -inf's n would be -inf (r NaN).
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GT_OQ), e);
}

// The 16 lanes of each of v[0 .. 16) summed: lane i of the result is the sum of v[i]. A tree of lane
// shuffles and adds, three instructions per sum (a separate horizontal sum of each takes eight); each sum
// is over its own vector's lanes in a fixed order, whatever the other vectors hold.
__attribute__((always_inline)) inline __m512 sum_lanes16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: [v[2i] (8 lanes), v[2i+1] (8 lanes)]
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit chunks: v[4i], v[4i+1], v[4i+2], v[4i+3] (4 lanes each)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88), _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  const __m512 z = _mm512_add_ps(_mm512_unpacklo_ps(y[0], y[1]), _mm512_unpackhi_ps(y[0], y[1]));
  // Lane 4j + c of z holds the sum of v[j], v[8 + j], v[4 + j], v[12 + j] for c = 0, 1, 2, 3.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, z);
}

// A query's dot products with n <= 16 keys (k: the first; rows k_stride apart), CHUNKS vectors of 32 bf16
// each (lanes[c]: the valid ones of vector c): each key's products of pairs of dimensions summed by
// vdpbf16ps on the bf16 values as they are, then the 16 keys' 16 lanes summed at once. No key past the
// n-th is read. The number of vectors is known when compiled, so the loops unroll.
template <int CHUNKS>
__m512 key_block(const __m512bh* q, const at::BFloat16* k, int64_t k_stride, int64_t n, const __mmask32* lanes) {
  __m512 dots[16];
  for (int r = 0; r < 16; ++r) {
    __m512 d = _mm512_setzero_ps();
    if (r < n)
      for (int c = 0; c < CHUNKS; ++c)
        d = _mm512_dpbf16_ps(d, q[c], (__m512bh)_mm512_maskz_loadu_epi16(lanes[c], k + r * k_stride + 32 * c));
    dots[r] = d;
  }
  return sum_lanes16(dots);
}

using KeyBlockFn = __m512 (*)(const __m512bh*, const at::BFloat16*, int64_t, int64_t, const __mmask32*);

KeyBlockFn key_block_fn(int64_t chunks) {  // head_dim <= 256: at most 8 vectors
  static constexpr KeyBlockFn fns[8] = {key_block<1>, key_block<2>, key_block<3>, key_block<4>,
                                        key_block<5>, key_block<6>, key_block<7>, key_block<8>};
  return fns[chunks - 1];
}

// The weighted sums of the values of NJ queries (VECS vectors of 16 of head_dim each): a pass over the keys
// with every sum in a register (sizes known when compiled; with sizes known only at run time the sums
// lived on the stack, each multiply-add waiting for the store of the one before). Query x's weights are
// w[x * w_stride ...]; its sums go to out[x * VECS * 16 ...]. Unseen keys weigh 0 and add nothing (the
// cache never holds infinities or NaNs). The generic version, for other sizes, computes the same sums.
template <int VECS, int NJ>
void weighted_values(const at::BFloat16* v, int64_t v_stride, int64_t keys, const float* w, int64_t w_stride,
                     int64_t, int64_t, float* out) {
  __m512 sums[NJ * VECS];
  for (int x = 0; x < NJ * VECS; ++x) sums[x] = _mm512_setzero_ps();
  for (int64_t s = 0; s < keys; ++s) {
    __m512 vv[VECS];
    for (int c = 0; c < VECS; ++c) vv[c] = load_bf16(v + s * v_stride + 16 * c);
    for (int x = 0; x < NJ; ++x) {
      const __m512 pv = _mm512_set1_ps(w[x * w_stride + s]);
      for (int c = 0; c < VECS; ++c) sums[x * VECS + c] = _mm512_fmadd_ps(pv, vv[c], sums[x * VECS + c]);
    }
  }
  for (int x = 0; x < NJ * VECS; ++x) _mm512_storeu_ps(out + 16 * x, sums[x]);
}

void weighted_values_any(const at::BFloat16* v, int64_t v_stride, int64_t keys, const float* w, int64_t w_stride,
                         int64_t vecs, int64_t nj, float* out) {
  __m512 sums[16];
  for (int64_t x = 0; x < nj * vecs; ++x) sums[x] = _mm512_setzero_ps();
  for (int64_t s = 0; s < keys; ++s) {
    __m512 vv[16];
    for (int64_t c = 0; c < vecs; ++c) vv[c] = load_bf16(v + s * v_stride + 16 * c);
    for (int64_t x = 0; x < nj; ++x) {
      const __m512 pv = _mm512_set1_ps(w[x * w_stride + s]);
      for (int64_t c = 0; c < vecs; ++c) sums[x * vecs + c] = _mm512_fmadd_ps(pv, vv[c], sums[x * vecs + c]);
    }
  }
  for (int64_t x = 0; x < nj * vecs; ++x) _mm512_storeu_ps(out + 16 * x, sums[x]);
}

using ValuesFn = void (*)(const at::BFloat16*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*);

template <int VECS, size_t... I>
constexpr std::array<ValuesFn, sizeof...(I)> values_fns(std::index_sequence<I...>) {
  return {weighted_values<VECS, (int)I + 1>...};
}

// Head dims of 16, 32, 64 and 128 (1, 2, 4, 8 vectors), 1 .. 16 / vecs queries a pass.
ValuesFn weighted_values_fn(int64_t vecs, int64_t nj) {
  static constexpr auto v1 = values_fns<1>(std::make_index_sequence<16>{});
  static constexpr auto v2 = values_fns<2>(std::make_index_sequence<8>{});
  static constexpr auto v4 = values_fns<4>(std::make_index_sequence<4>{});
  static constexpr auto v8 = values_fns<8>(std::make_index_sequence<2>{});
  switch (vecs) {
    case 1: return v1[nj - 1];
    case 2: return v2[nj - 1];
    case 4: return v4[nj - 1];
    case 8: return v8[nj - 1];
    default: return weighted_values_any;
  }
}

// One layer's operands of attention (a group call has several): data pointers and strides of its
// queries q (batch, heads, n_q, head_dim), keys and values (batch, kv_heads, keys, head_dim) and output.
struct AttentionOperands {
  const at::BFloat16 *q, *k, *v;
  at::BFloat16* out;
  int64_t qs[3], ks[3], vs[3], os[3];
};

AttentionOperands attention_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "few_query_attention: 4-d q, k, v");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "few_query_attention: bf16 q, k, v");
  const int64_t dim = q.size(3);
  TORCH_CHECK(dim % 16 == 0 && dim <= 256 && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 &&
              q.size(1) % k.size(1) == 0 && k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == dim,
              "few_query_attention: unsupported shapes");
  AttentionOperands o{q.const_data_ptr<at::BFloat16>(), k.const_data_ptr<at::BFloat16>(), v.const_data_ptr<at::BFloat16>(),
                      out.mutable_data_ptr<at::BFloat16>(), {}, {}, {}, {}};
  for (int d = 0; d < 3; ++d) o.qs[d] = q.stride(d), o.ks[d] = k.stride(d), o.vs[d] = v.stride(d), o.os[d] = out.stride(d);
  return o;
}

// What attend's threads share: the sizes, the mask and how scores are computed.
struct AttendShape {
  int64_t batch, kv_heads, group, n_q, queries, keys, blocks, dim, vecs, chunks, ms0, ms2, ms3;
  const bool* mp;
  bool causal, amx_qk;
  float scale;
  KeyBlockFn dot_block;
  __mmask32 lanes[8];
};

// attend's work items i0 .. i1 - 1 (a layer, row and kv head each) in one thread. The sizes are locals
// here: the intrinsics' stores may alias anything, and sizes read through the lambda's references were
// read from memory again at every score.
void attend_items(const std::vector<AttentionOperands>& sets, const AttendShape& shape, int64_t i0, int64_t i1) {
  const int64_t batch = shape.batch, kv_heads = shape.kv_heads, group = shape.group, n_q = shape.n_q,
                queries = shape.queries, keys = shape.keys, blocks = shape.blocks, dim = shape.dim, vecs = shape.vecs,
                chunks = shape.chunks, ms0 = shape.ms0, ms2 = shape.ms2, ms3 = shape.ms3;
  const bool* const mp = shape.mp;
  const bool causal = shape.causal, amx_qk = shape.amx_qk;
  const float scale = shape.scale;
  const KeyBlockFn dot_block = shape.dot_block;
  __mmask32 lanes[8];
  std::copy(shape.lanes, shape.lanes + 8, lanes);
  int64_t configured = 0;  // the AMX tiles' query count in this thread (0: not set)
  // Per query (j = head in the group * n_q + token): its scores, then weights, over every key; its sums.
  // Each thread's buffers are kept between calls.
  thread_local std::vector<float> scores_buf, acc_buf, total_buf, visible_buf;
  thread_local std::vector<__m512i> qb_buf;
  thread_local std::vector<__mmask16> seen_buf;
  scores_buf.resize(queries * blocks * 16), acc_buf.resize(queries * dim), qb_buf.resize(queries * chunks);
  total_buf.resize(queries), seen_buf.resize(n_q * blocks), visible_buf.resize(blocks * 16);
  // Plain pointers: each use of a thread_local in a shared library can cost a call to find it.
  float *scores = scores_buf.data(), *acc = acc_buf.data(), *total = total_buf.data(), *visible = visible_buf.data();
  __m512i* qb = qb_buf.data();  // each query's bf16 values, 32 a vector (zeros past head_dim)
  __mmask16* seen = seen_buf.data();
  for (int64_t i = i0; i < i1; ++i) {
    const AttentionOperands& o = sets[i / (batch * kv_heads)];
    const int64_t b = i / kv_heads % batch, kh = i % kv_heads;
    const at::BFloat16 *qp = o.q, *kp = o.k, *vp = o.v;
    at::BFloat16* op = o.out;
    const int64_t qs0 = o.qs[0], qs1 = o.qs[1], qs2 = o.qs[2], ks0 = o.ks[0], ks1 = o.ks[1], ks2 = o.ks[2],
                  vs0 = o.vs[0], vs1 = o.vs[1], vs2 = o.vs[2], os0 = o.os[0], os1 = o.os[1], os2 = o.os[2];
    const at::BFloat16* kb = kp + b * ks0 + kh * ks1;
    const at::BFloat16* vb = vp + b * vs0 + kh * vs1;
    for (int64_t h = 0, j = 0; h < group; ++h)
      for (int64_t t = 0; t < n_q; ++t, ++j) {
        const at::BFloat16* qj = qp + b * qs0 + (kh * group + h) * qs1 + t * qs2;
        for (int64_t c = 0; c < chunks; ++c) qb[j * chunks + c] = _mm512_maskz_loadu_epi16(lanes[c], qj + 32 * c);
      }
    // Which keys each token's queries see, 16 keys a bit mask: the keys up to its position, and of
    // those the ones its mask row allows (16 bools a load where the row is contiguous).
    for (int64_t t = 0; t < n_q; ++t) {
      const int64_t last = causal ? keys - n_q + t : keys - 1;
      const bool* mt = mp + b * ms0 + t * ms2;
      for (int64_t kb0 = 0; kb0 < blocks; ++kb0) {
        const int64_t s0 = kb0 * 16, n = std::min<int64_t>(16, keys - s0);
        uint32_t bits = (1u << std::clamp<int64_t>(last - s0 + 1, 0, n)) - 1;
        if (!causal && ms3 == 1) {
          const __m128i row = _mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1), mt + s0);
          bits &= _mm_test_epi8_mask(row, row);
        } else if (!causal) {
          for (int64_t r = 0; r < n; ++r) bits &= ~((uint32_t)!mt[(s0 + r) * ms3] << r);
        }
        seen[t * blocks + kb0] = (__mmask16)bits;
      }
    }
    if (amx_qk) amx_scores(qb, chunks, queries, kb, ks2, keys, scores, blocks * 16, configured);
    for (int64_t kb0 = 0; kb0 < blocks; ++kb0) {
      const int64_t s0 = kb0 * 16, n = std::min<int64_t>(16, keys - s0);
      for (int64_t h = 0, j = 0; h < group; ++h)  // query j: head h of the group, token t
        for (int64_t t = 0; t < n_q; ++t, ++j) {
          const __m512 dots = amx_qk ? _mm512_loadu_ps(&scores[j * blocks * 16 + s0])
                                     : dot_block((const __m512bh*)&qb[j * chunks], kb + s0 * ks2, ks2, n, lanes);
          const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), seen[t * blocks + kb0],
                                               _mm512_mul_ps(dots, _mm512_set1_ps(scale)));
          _mm512_storeu_ps(&scores[j * blocks * 16 + s0], sc);
        }
    }
    for (int64_t j = 0, t = 0; j < queries; ++j, t = t + 1 == n_q ? 0 : t + 1) {  // weights exp(score - max), and their total
      float* sj = &scores[j * blocks * 16];
      __m512 most = _mm512_set1_ps(-INFINITY);  // lane by lane, then across lanes once
      for (int64_t s0 = 0; s0 < blocks * 16; s0 += 16) most = _mm512_max_ps(most, _mm512_loadu_ps(sj + s0));
      const float top = _mm512_reduce_max_ps(most);
      // The total runs over the weights of the keys the query sees, gathered in key order first: the same
      // sum whether those keys sit in consecutive slots (a chain) or among others' (a draft tree's node
      // and its ancestors), where summing by slot would put them in other lanes and round otherwise.
      const __m512 mx = _mm512_set1_ps(top > -INFINITY ? top : 0.0f);
      const __mmask16* seen_t = seen + t * blocks;
      int64_t count = 0;
      for (int64_t s0 = 0, kb0 = 0; s0 < blocks * 16; s0 += 16, ++kb0) {
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sj + s0), mx));
        _mm512_storeu_ps(sj + s0, e);
        _mm512_mask_compressstoreu_ps(visible + count, seen_t[kb0], e);
        count += __builtin_popcount(seen_t[kb0]);
      }
      __m512 sum = _mm512_setzero_ps();
      for (int64_t s0 = 0; s0 < count; s0 += 16)
        sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps((__mmask16)(count - s0 >= 16 ? 0xFFFF : (1u << (count - s0)) - 1),
                                                       visible + s0));
      total[j] = _mm512_reduce_add_ps(sum);
    }
    // Each query's weighted sum of the values in registers, a chunk of queries per pass over the values.
    const int64_t chunk = std::max<int64_t>(1, 16 / vecs);
    for (int64_t j0 = 0; j0 < queries; j0 += chunk) {
      const int64_t nj = std::min(chunk, queries - j0);
      weighted_values_fn(vecs, nj)(vb, vs2, keys, scores + j0 * blocks * 16, blocks * 16, vecs, nj, acc + j0 * dim);
    }
    for (int64_t h = 0, j = 0; h < group; ++h)
      for (int64_t t = 0; t < n_q; ++t, ++j) {
        // A query that sees no key (never in a decoding step) gets zeros rather than NaNs.
        const __m512 inv = _mm512_set1_ps(total[j] > 0.0f ? 1.0f / total[j] : 0.0f);
        at::BFloat16* oj = op + b * os0 + (kh * group + h) * os1 + t * os2;
        for (int64_t c = 0; c < vecs; ++c)
          _mm256_storeu_si256((__m256i*)(oj + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(&acc[j * dim + 16 * c]), inv)));
      }
  }
  if (configured) release_tiles();
}

// Attention of a few queries per row over a cache span for one or more layers' operands of the same
// shapes (scores from the bf16 queries and keys as they are, products summed in float32 by AMX tiles
// where the CPU has them and head_dim is a multiple of 32, else by vdpbf16ps;
// softmax and the weighted sum of the values in float32): q (batch, heads, n_q, head_dim), k and v (batch, kv_heads, keys, head_dim), mask
// (batch, 1, n_q, keys) broadcastable or (n_q, keys), True where a query sees a key; without a mask, query t sees keys
// 0 .. keys - n_q + t (the queries are the last tokens). The queries that share a kv head read each
// block of 16 keys, and each value, once. Each query's scores, softmax and weighted sum run in the same
// order whatever the other queries (and layers) are: a token attends exactly as it does in a 1-token step.
void attend(const std::vector<AttentionOperands>& sets, const at::Tensor& q, const at::Tensor& k,
            const std::optional<at::Tensor>& mask_arg) {
  const bool causal = !mask_arg.has_value();
  at::Tensor mask = causal ? at::ones({1, 1, 1, 1}, q.options().dtype(at::kBool)) : *mask_arg;
  if (mask.dim() == 2) mask = mask.view({1, 1, mask.size(0), mask.size(1)});  // (n_q, keys): every row alike
  TORCH_CHECK(mask.dim() == 4 && mask.scalar_type() == at::kBool, "few_query_attention: a 4-d bool mask");
  const int64_t batch = q.size(0), heads = q.size(1), n_q = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), keys = k.size(2);
  const at::Tensor m = mask.expand({batch, 1, n_q, keys});
  const int64_t group = heads / kv_heads, vecs = dim / 16, queries = group * n_q, blocks = (keys + 15) / 16;
  const int64_t chunks = (dim + 31) / 32;  // vectors of 32 bf16 per query or key
  const KeyBlockFn dot_block = key_block_fn(chunks);
  __mmask32 lanes[8];
  for (int64_t c = 0; c < chunks; ++c) lanes[c] = (__mmask32)(dim - 32 * c >= 32 ? ~0u : (1u << (dim - 32 * c)) - 1);
  const float scale = 1.0f / std::sqrt((float)dim);
  const bool* mp = m.const_data_ptr<bool>();
  const int64_t ms0 = m.stride(0), ms2 = m.stride(2), ms3 = m.stride(3);
  // A thread per (layer, row, kv head) where there is enough of them: a short span's few queries run faster alone.
  const int64_t work = queries * keys * dim, grain = std::max<int64_t>(1, (int64_t)(1 << 13) / std::max<int64_t>(1, work));
  // Scores on AMX tiles where the CPU has them and head_dim is whole tile rows: one tile product per 16
  // keys for all of a kv head's queries. The shipped model's block (bench_kernels, 144 keys): 1 query
  // 5.6 -> 6.6 us (the tiles' fixed cost), 4 queries 9.7 -> 9.3, 9 17.4 -> 14.0, 17 30.9 -> 21.1.
  const bool amx_qk = dim % 32 == 0 && amx_available();
  AttendShape shape{batch, kv_heads, group, n_q, queries, keys, blocks, dim, vecs, chunks, ms0, ms2, ms3, mp, causal,
                    amx_qk, scale, dot_block, {}};
  std::copy(lanes, lanes + 8, shape.lanes);
  at::parallel_for(0, (int64_t)sets.size() * batch * kv_heads, grain,
                   [&](int64_t i0, int64_t i1) { attend_items(sets, shape, i0, i1); });
}

// Laid out (..., batch, n_q, heads, dim): the output projection reads it as (..., batch, n_q, heads * dim)
// without a copy.
at::Tensor attention_output(const at::Tensor& q) {
  const int64_t d = q.dim();
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  std::swap(shape[d - 3], shape[d - 2]);
  return at::empty(shape, q.options()).transpose(d - 3, d - 2);
}

at::Tensor few_query_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& mask) {
  at::Tensor out = attention_output(q);
  attend({attention_operands(q, k, v, out)}, q, k, mask);
  return out;
}

// The attention of G layers at once (q: (G, batch, heads, n_q, head_dim), k[g] and v[g] layer g's keys
// and values, one mask for all), e.g. the extra heads at the same positions: one call instead of G.
at::Tensor few_query_attention_group(const at::Tensor& q, at::TensorList k, at::TensorList v,
                                     const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 5 && q.size(0) == (int64_t)k.size() && k.size() == v.size() && !k.empty(),
              "few_query_attention_group: q must be (G, batch, heads, n_q, head_dim) for G = ", k.size(), " keys and values");
  at::Tensor out = attention_output(q);
  std::vector<AttentionOperands> sets;
  for (size_t g = 0; g < k.size(); ++g) {
    TORCH_CHECK(k[g].sizes() == k[0].sizes(), "few_query_attention_group: the layers' keys differ in shape");
    sets.push_back(attention_operands(q[g], k[g], v[g], out[g]));
  }
  attend(sets, q[0], k[0], mask);
  return out;
}

// float32 -> bf16 for 16 values, rounding to nearest even (load_bf16 is the way back).
inline void store_bf16(at::BFloat16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }
inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
// Products and sums with their rounding spelled out, so the compiler never fuses them into one
// multiply-add: these kernels give what eager ATen's separate operations give.
constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// float32 -> bf16, rounding to nearest even as ATen does, denormals included (vcvtneps2bf16 flushes them
// to zero): the rounding bias added to the bits, NaNs kept NaN.
inline __m256i to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(_mm512_set1_epi32(0x7FC0), _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), rounded);
  return _mm512_cvtepi32_epi16(rounded);
}
inline __m512 exact_round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(v)), 16));
}

// at::silu(gate) * up for x (..., 2 * hidden) holding gate then up (the fused gate/up product's output),
// bf16, in one pass instead of two operator calls and a temporary: ATen's float32 formula x / (1 + exp(-x))
// with its exp, rounded to bf16, then the product rounded again, as the two calls round: ATen's numbers
// bit for bit (NaNs aside). hidden must be a multiple of 16.
at::Tensor silu_mul(const at::Tensor& x) {
  const int64_t hidden = x.size(-1) / 2;
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.size(-1) == 2 * hidden && hidden % kBlock == 0,
              "silu_mul: x must be bfloat16 (..., 2 * hidden) with hidden a multiple of 16");
  const at::Tensor x2 = x.reshape({-1, 2 * hidden}).contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = hidden;
  at::Tensor out = at::empty(shape, x.options());
  const auto* x0 = x2.const_data_ptr<at::BFloat16>();
  auto* y = out.mutable_data_ptr<at::BFloat16>();
  const int64_t rows = x2.size(0), vectors = hidden / kBlock;
  const __m512 one = _mm512_set1_ps(1.0f);
  // Two threads pay from about 8 rows of the shipped model's 768: exp is the cost.
  at::parallel_for(0, rows * vectors, 512, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0, r = i0 / vectors, c = i0 % vectors * kBlock; i < i1; ++i, c += kBlock) {
      if (c == hidden) r += 1, c = 0;  // (a division per vector cost as much as half its exp)
      const __m512 g = load_bf16(x0 + r * 2 * hidden + c);
      const __m512 e = Sleef_expf16_u10(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(INT32_MIN))));
      const __m512 act = exact_round_bf16(_mm512_div_round_ps(g, _mm512_add_round_ps(one, e, kNearest), kNearest));
      _mm256_storeu_si256((__m256i*)(y + r * hidden + c),
                          to_bf16_bits(_mm512_mul_round_ps(act, load_bf16(x0 + r * 2 * hidden + hidden + c), kNearest)));
    }
  });
  return out;
}

// a + b for bf16 tensors of one shape (a residual add): float32 sums rounded to bf16, as ATen's add; one
// pass, no dispatch. The last dimension must be a multiple of 16.
at::Tensor add_bf16(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 &&
              a.size(-1) % kBlock == 0, "add_bf16: a and b must be bfloat16 of one shape, the last dimension a multiple of 16");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty(a.sizes(), a.options());
  const auto *pa = ac.const_data_ptr<at::BFloat16>(), *pb = bc.const_data_ptr<at::BFloat16>();
  auto* y = out.mutable_data_ptr<at::BFloat16>();
  for (int64_t i = 0, n = a.numel(); i < n; i += kBlock)
    _mm256_storeu_si256((__m256i*)(y + i), to_bf16_bits(_mm512_add_round_ps(load_bf16(pa + i), load_bf16(pb + i), kNearest)));
  return out;
}

// RMSNorm of bf16 rows as model.RMSNorm computes it, in one call instead of eight: float32 x times
// rsqrt(mean(x^2) + eps), rounded to bf16, times the weight, rounded again. Every weight of `weights`
// (G of (dim,)) on x (..., dim), out (G, ..., dim); or with per_group, weights[g] on x[g] of x (G, ..., dim),
// out x's shape. Each row's sum of squares runs in a fixed order of its own (not ATen's), whatever the
// other rows are.
at::Tensor rms_norm(const at::Tensor& x, at::TensorList weights, double eps, bool per_group) {
  const int64_t groups = weights.size(), dim = x.size(-1);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && dim % kBlock == 0 && groups > 0 &&
              (!per_group || x.size(0) == groups), "rms_norm: x must be bfloat16 (..., dim), dim a multiple of 16, "
              "and (G, ..., dim) per group");
  for (const at::Tensor& w : weights)
    TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.numel() == dim,
                "rms_norm: every weight must be a contiguous bfloat16 (dim,)");
  const at::Tensor x3 = x.reshape({per_group ? groups : 1, -1, dim}).contiguous();
  const int64_t rows = x3.size(1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  if (!per_group) shape.insert(shape.begin(), groups);
  at::Tensor out = at::empty(shape, x.options());
  auto* y = out.mutable_data_ptr<at::BFloat16>();
  const auto* x0 = x3.const_data_ptr<at::BFloat16>();
  for (int64_t g = 0; g < groups; ++g) {
    const auto* w = weights[g].const_data_ptr<at::BFloat16>();
    for (int64_t r = 0; r < rows; ++r) {
      const at::BFloat16* xr = x0 + ((per_group ? g * rows : 0) + r) * dim;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < dim; i += kBlock) {
        const __m512 v = load_bf16(xr + i);
        acc = _mm512_add_round_ps(acc, _mm512_mul_round_ps(v, v, kNearest), kNearest);
      }
      const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / (float)dim + (float)eps));
      at::BFloat16* yr = y + (g * rows + r) * dim;
      for (int64_t i = 0; i < dim; i += kBlock) {
        // The normalised value is rounded to bf16 before the weight multiplies it, as eager bf16 does.
        const __m512 n = round_bf16(_mm512_mul_round_ps(load_bf16(xr + i), scale, kNearest));
        store_bf16(yr + i, _mm512_mul_round_ps(n, load_bf16(w + i), kNearest));
      }
    }
  }
  return out;
}

// Rotary embeddings as model.apply_rope computes them, in one call instead of nine: float32
// x * cos + (x with each pair swapped) * (-sin, sin), rounded to bf16. x: (..., seq, heads, head_dim)
// bf16, head_dim a multiple of 16; table: the rotary rows of x's tokens as apply_rope takes them, float32
// (seq, 2, 1, head_dim) or (batch, seq, 2, 1, head_dim) for x (..., batch, seq, heads, head_dim), each
// token's cos row then its (-sin, sin) row. The output has x's shape, contiguous.
at::Tensor rope(const at::Tensor& x, const at::Tensor& table) {
  const int64_t dim = x.size(-1), heads = x.size(-2);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() >= 3 && dim % kBlock == 0,
              "rope: x must be bfloat16 (..., seq, heads, head_dim) with head_dim a multiple of 16");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() >= 4 && table.size(-1) == dim && table.size(-2) == 1 &&
              table.size(-3) == 2 && table.dim() - 3 <= x.dim() - 2,
              "rope: table must be float32 (..., 2, 1, head_dim) rotary rows for x");
  const int64_t tokens = table.numel() / (2 * dim);
  for (int64_t i = 1; i <= table.dim() - 3; ++i)
    TORCH_CHECK(table.size(-3 - i) == x.size(-2 - i), "rope: the table's rows do not match x's tokens");
  // x as it lies (a view of the q/k/v product's output, most often: no copy), rows of head_dim contiguous.
  at::Tensor x4 = x.reshape({-1, tokens, heads, dim});
  if (x4.stride(3) != 1) x4 = x4.contiguous();
  const at::Tensor tab = table.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  auto* y = out.mutable_data_ptr<at::BFloat16>();
  const auto* x0 = x4.const_data_ptr<at::BFloat16>();
  const float* t0 = tab.const_data_ptr<float>();
  const int64_t outer = x4.size(0), xs0 = x4.stride(0), xs1 = x4.stride(1), xs2 = x4.stride(2);
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        const at::BFloat16* xr = x0 + o * xs0 + t * xs1 + h * xs2;
        at::BFloat16* yr = y + ((o * tokens + t) * heads + h) * dim;
        for (int64_t i = 0; i < dim; i += kBlock) {
          const float* cos = t0 + t * 2 * dim + i;
          const __m512 v = load_bf16(xr + i);
          const __m512 swapped = _mm512_permute_ps(v, 0xB1);  // (x1, x0) for every pair (x0, x1)
          store_bf16(yr + i, _mm512_add_round_ps(_mm512_mul_round_ps(v, _mm512_loadu_ps(cos), kNearest),
                                                 _mm512_mul_round_ps(swapped, _mm512_loadu_ps(cos + dim), kNearest),
                                                 kNearest));
        }
      }
  return out;
}

// Keys and values k, v (batch, kv_heads, seq, head_dim; head_dim contiguous) into a KV cache's k and v
// buffers (max_batch, kv_heads, max_seq, head_dim, contiguous) at slots[b, s] (without slots: start + s)
// of cache row rows[b] (or row b): model.KVCache's store in one call instead of four to a dozen.
void cache_write(at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& slots, int64_t start, const std::optional<at::Tensor>& rows) {
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous() && cache_k.sizes() == cache_v.sizes() &&
              cache_k.dim() == 4 && k.sizes() == v.sizes() && k.dim() == 4 && k.size(1) == cache_k.size(1) &&
              k.size(3) == cache_k.size(3) && k.stride(3) == 1 && v.stride(3) == 1 &&
              k.scalar_type() == cache_k.scalar_type() && v.scalar_type() == cache_k.scalar_type() &&
              cache_k.scalar_type() == cache_v.scalar_type() && cache_k.element_size() == 2,
              "cache_write: k and v must be (batch, kv_heads, seq, head_dim) of the caches' 16-bit dtype and shape");
  const int64_t bsz = k.size(0), heads = k.size(1), seq = k.size(2), dim = k.size(3);
  const int64_t max_b = cache_k.size(0), max_s = cache_k.size(2);
  TORCH_CHECK(!slots || (slots->scalar_type() == at::kLong && slots->dim() == 2 && slots->size(0) == bsz &&
                         slots->size(1) == seq), "cache_write: slots must be int64 (batch, seq)");
  TORCH_CHECK(!rows || (rows->scalar_type() == at::kLong && rows->dim() == 1 && rows->size(0) == bsz),
              "cache_write: rows must be int64 (batch,)");
  const at::Tensor sl = slots ? slots->contiguous() : at::Tensor();
  const int64_t* slot = slots ? sl.const_data_ptr<int64_t>() : nullptr;
  const at::Tensor rw = rows ? rows->contiguous() : at::Tensor();
  auto* ck = static_cast<uint16_t*>(cache_k.data_ptr());
  auto* cv = static_cast<uint16_t*>(cache_v.data_ptr());
  const auto* k0 = static_cast<const uint16_t*>(k.const_data_ptr());
  const auto* v0 = static_cast<const uint16_t*>(v.const_data_ptr());
  // Every row and slot checked before anything is written: a refused store leaves the cache as it was.
  for (int64_t b = 0; b < bsz; ++b) {
    const int64_t row = rows ? rw.const_data_ptr<int64_t>()[b] : b;
    TORCH_CHECK(row >= 0 && row < max_b, "cache_write: cache row ", row, " is out of range");
    for (int64_t s = 0; s < seq; ++s) {
      const int64_t at = slot ? slot[b * seq + s] : start + s;
      TORCH_CHECK(at >= 0 && at < max_s, "cache_write: slot ", at, " is past the cache's ", max_s);
    }
  }
  for (int64_t b = 0; b < bsz; ++b) {
    const int64_t row = rows ? rw.const_data_ptr<int64_t>()[b] : b;
    for (int64_t s = 0; s < seq; ++s) {
      const int64_t at = slot ? slot[b * seq + s] : start + s;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t dst = ((row * heads + h) * max_s + at) * dim;
        std::copy_n(k0 + b * k.stride(0) + h * k.stride(1) + s * k.stride(2), dim, ck + dst);
        std::copy_n(v0 + b * v.stride(0) + h * v.stride(1) + s * v.stride(2), dim, cv + dst);
      }
    }
  }
}

// What model.KVCache.update returns: slots 0 .. end of the batch's cache rows (rows[b], or b).
at::Tensor cached_span(const at::Tensor& cache, const std::optional<at::Tensor>& rows, int64_t bsz, int64_t end) {
  return (rows ? cache.index_select(0, *rows) : cache.narrow(0, 0, bsz)).narrow(2, 0, end);
}

// A transformer block's forward over every token of x (batch, seq, dim), bf16, as an eager decode step
// computes it with the kernels above (multitoken.kernels.KernelBlock): the same operations in the same
// order, the residual adds and the SiLU rounded as ATen's (add_bf16, silu_mul), called here instead of
// ~30 calls from Python, so the same numbers bit for bit. packed: the fused q/k/v, output, fused gate/up and down products'
// packed weights, out_features their outputs; norms: the attention and feed-forward norms' weights;
// rope_rows, mask, slots (or start) and rows: the tokens' rotary rows, attention mask, cache slots and
// cache rows, as model.Positions holds them; end: the cache slots the queries may see.
at::Tensor block(const at::Tensor& x, at::TensorList packed, at::IntArrayRef out_features, at::TensorList norms,
                 double eps, int64_t n_heads, int64_t n_kv_heads, const at::Tensor& rope_rows,
                 const std::optional<at::Tensor>& mask, at::Tensor& cache_k, at::Tensor& cache_v,
                 const std::optional<at::Tensor>& slots, int64_t start, const std::optional<at::Tensor>& rows,
                 int64_t end) {
  TORCH_CHECK(x.dim() == 3 && packed.size() == 4 && out_features.size() == 4 && norms.size() == 2 &&
              cache_k.dim() == 4, "block: x must be (batch, seq, dim), with 4 packed products and 2 norms");
  const int64_t bsz = x.size(0), seq = x.size(1), head_dim = cache_k.size(3);
  const int64_t q_features = n_heads * head_dim, kv_features = n_kv_heads * head_dim;
  TORCH_CHECK(out_features[0] == q_features + 2 * kv_features && end >= 1 && end <= cache_k.size(2),
              "block: the q/k/v product must have ", q_features + 2 * kv_features, " outputs (it has ",
              out_features[0], ") and end must be a cache slot count (", end, " of ", cache_k.size(2), ")");
  const at::Tensor qkv = packed_linear(rms_norm(x, norms.slice(0, 1), eps, false)[0], packed[0], out_features[0]);
  const std::vector<at::Tensor> parts = qkv.split_with_sizes({q_features, kv_features, kv_features}, -1);
  const at::Tensor k = rope(parts[1].view({bsz, seq, n_kv_heads, head_dim}), rope_rows).transpose(1, 2);
  const at::Tensor v = parts[2].view({bsz, seq, n_kv_heads, head_dim}).transpose(1, 2);
  cache_write(cache_k, cache_v, k, v, slots, start, rows);
  const at::Tensor keys = cached_span(cache_k, rows, bsz, end), values = cached_span(cache_v, rows, bsz, end);
  const at::Tensor q = rope(parts[0].view({bsz, seq, n_heads, head_dim}), rope_rows).transpose(1, 2);
  const at::Tensor out = few_query_attention(q, keys, values, mask);
  const at::Tensor h = add_bf16(x, packed_linear(out.transpose(1, 2).reshape({bsz, seq, -1}), packed[1], out_features[1]));
  const at::Tensor gate_up = packed_linear(rms_norm(h, norms.slice(1, 1), eps, false)[0], packed[2], out_features[2]);
  return add_bf16(h, packed_linear(silu_mul(gate_up), packed[3], out_features[3]));
}

// G heads' blocks on the same trunk output h (batch, seq, dim), bf16, as multitoken.grouped_heads
// computes them with the kernels above: every head's keys and values cached for every token, its whole
// forward at tokens index[b, i] of each row b alone (index (batch, n), or (batch,) for n = 1); out
// (G, batch, n, dim). The same operations in the same order as there, called here instead of ~40 calls
// from Python, so the same numbers bit for bit.
// Per head g: packed[4 g .. 4 g + 4) its fused q/k/v, output, fused gate/up and down products, norms[2 g],
// norms[2 g + 1] its two norms' weights, caches[2 g], caches[2 g + 1] its key and value caches. Positions
// as `block` takes them, per row (slots (batch, seq), mask (batch, 1, seq, end)).
at::Tensor head_group(const at::Tensor& h, const at::Tensor& index, at::TensorList packed, at::IntArrayRef out_features,
                      at::TensorList norms, double eps, int64_t n_heads, int64_t n_kv_heads, const at::Tensor& rope_rows,
                      const at::Tensor& mask, at::TensorList caches, const at::Tensor& slots,
                      const std::optional<at::Tensor>& rows) {
  const int64_t groups = (int64_t)packed.size() / 4;
  TORCH_CHECK(h.dim() == 3 && groups > 0 && (int64_t)packed.size() == 4 * groups && out_features.size() == 4 &&
              (int64_t)norms.size() == 2 * groups && (int64_t)caches.size() == 2 * groups && mask.dim() == 4 &&
              (index.dim() == 1 || index.dim() == 2) && index.size(0) == h.size(0) && index.scalar_type() == at::kLong,
              "head_group: h must be (batch, seq, dim), index int64 (batch,) or (batch, n), with 4 products, 2 norms "
              "and 2 caches a head");
  const int64_t bsz = h.size(0), seq = h.size(1), dim = h.size(2), head_dim = caches[0].size(3);
  const int64_t n = index.dim() == 2 ? index.size(1) : 1;
  const int64_t q_features = n_heads * head_dim, kv_features = n_kv_heads * head_dim, end = mask.size(-1);
  TORCH_CHECK(out_features[0] == q_features + 2 * kv_features, "head_group: the q/k/v products must have ",
              q_features + 2 * kv_features, " outputs, not ", out_features[0]);
  // Every head's tensor `which` of `list`, which holds `per_head` tensors a head.
  auto each_head = [&](at::TensorList list, int64_t per_head, int64_t which) {
    std::vector<at::Tensor> out;
    for (int64_t g = 0; g < groups; ++g) out.push_back(list[per_head * g + which]);
    return out;
  };
  // Tokens index[b, i] of row b: their flat rows among the batch's tokens.
  const at::Tensor chosen = (at::arange(bsz, index.options()).unsqueeze(1) * seq + index.view({bsz, n})).view(-1);
  const std::vector<at::Tensor> parts =
      packed_linear_group(rms_norm(h, each_head(norms, 2, 0), eps, false), each_head(packed, 4, 0), out_features[0])
          .split_with_sizes({q_features, kv_features, kv_features}, -1);
  const at::Tensor q_all = parts[0];  // (G, batch, seq, q_features)
  const at::Tensor k = rope(parts[1].view({groups, bsz, seq, n_kv_heads, head_dim}), rope_rows).transpose(2, 3);
  const at::Tensor v = parts[2].view({groups, bsz, seq, n_kv_heads, head_dim}).transpose(2, 3);
  std::vector<at::Tensor> keys, values;
  for (int64_t g = 0; g < groups; ++g) {
    at::Tensor cache_k = caches[2 * g], cache_v = caches[2 * g + 1];
    cache_write(cache_k, cache_v, k[g], v[g], slots, 0, rows);
    keys.push_back(cached_span(cache_k, rows, bsz, end));
    values.push_back(cached_span(cache_v, rows, bsz, end));
  }
  const at::Tensor q_one = q_all.reshape({groups, bsz * seq, q_features}).index_select(1, chosen);
  const at::Tensor rope_one = rope_rows.reshape({bsz * seq, 2, 1, head_dim}).index_select(0, chosen).view({bsz, n, 2, 1, head_dim});
  const at::Tensor mask_one = mask.select(1, 0).reshape({bsz * seq, end}).index_select(0, chosen).view({bsz, 1, n, end});
  const at::Tensor q = rope(q_one.view({groups, bsz, n, n_heads, head_dim}), rope_one).transpose(2, 3);
  const at::Tensor out = few_query_attention_group(q, keys, values, mask_one);
  const at::Tensor h_one = h.reshape({bsz * seq, dim}).index_select(0, chosen).view({bsz, n, dim});
  const at::Tensor hh = add_bf16(h_one.expand({groups, bsz, n, dim}),
                                 packed_linear_group(out.transpose(2, 3).reshape({groups, bsz, n, -1}), each_head(packed, 4, 1), out_features[1]));
  const at::Tensor gate_up =
      packed_linear_group(rms_norm(hh, each_head(norms, 2, 1), eps, true), each_head(packed, 4, 2), out_features[2]);
  return add_bf16(hh, packed_linear_group(silu_mul(gate_up), each_head(packed, 4, 3), out_features[3]));
}

}  // namespace

TORCH_LIBRARY(multitoken, m) {
  m.def("packed_linear(Tensor x, Tensor packed, int out_features) -> Tensor");
  m.def("packed_linear_group(Tensor x, Tensor[] packed, int out_features) -> Tensor");
  m.def("few_query_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor");
  m.def("few_query_attention_group(Tensor q, Tensor[] k, Tensor[] v, Tensor? mask) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor[] weights, float eps, bool per_group) -> Tensor");
  m.def("rope(Tensor x, Tensor table) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("add_bf16(Tensor a, Tensor b) -> Tensor");
  m.def("cache_write(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor k, Tensor v, Tensor? slots, int start, Tensor? rows) -> ()");
  m.def("block(Tensor x, Tensor[] packed, int[] out_features, Tensor[] norms, float eps, int n_heads, int n_kv_heads, "
        "Tensor rope_rows, Tensor? mask, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor? slots, int start, Tensor? rows, "
        "int end) -> Tensor");
  m.def("head_group(Tensor h, Tensor index, Tensor[] packed, int[] out_features, Tensor[] norms, float eps, int n_heads, "
        "int n_kv_heads, Tensor rope_rows, Tensor mask, Tensor(a!)[] caches, Tensor slots, Tensor? rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(multitoken, CPU, m) {
  m.impl("packed_linear", packed_linear);
  m.impl("packed_linear_group", packed_linear_group);
  m.impl("few_query_attention", few_query_attention);
  m.impl("few_query_attention_group", few_query_attention_group);
  m.impl("rms_norm", rms_norm);
  m.impl("rope", rope);
  m.impl("silu_mul", silu_mul);
  m.impl("add_bf16", add_bf16);
  m.impl("cache_write", cache_write);
  m.impl("block", block);
  m.impl("head_group", head_group);
}
