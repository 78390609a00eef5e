// InfiniGen's block scores in one pass over the partial keys (CPU).
//
// Computes what vllm_infinigen.method.scoring.block_scores computes, without
// materialising the [requests, heads, tokens] logits: for every request it
// walks the request's blocks once (fetching the next block ahead, since a
// block table is scattered), forms the logits of every query head for the
// block's tokens in a small buffer, and keeps per block and head the block's
// maximum logit and its sum of exp(logit - maximum). A second, block-sized
// pass turns those into the log of the block's softmax mass averaged over the
// group's query heads (rule 1, LOG_MASS), or takes the block's largest
// logit (rule 0, MAX). An optional per-(head, block) bias (the residual
// channels' block term) is added to every logit of the block before either.
//
// Shapes (all contiguous):
//   query   [R, H, P] float32, already multiplied by the softmax scale
//   cache   [N, B, KV, P] float32 / bfloat16 / float16 (the partial keys), or
//           [N, B, KV, W] uint8, the keys packed at 4 bits (method/quant4.py):
//           W = ceil(P / 2) + 2 bytes per row, channel 2i in the low nibble
//           of byte i and 2i+1 in its high nibble, nibble n = code n - 8,
//           then the row's float16 scale, little-endian; key = code * scale
//   table   [R, M] int32 physical block ids
//   lens    [R] int32 tokens per request (1 <= len <= M * B)
//   bias    [R, H, M] float32 in logit units, or empty (none)
//   out     [R, KV, M] float32, -inf past a request's last block

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// exp(x) for x <= 0 in plain arithmetic, so that the compiler vectorises
// the loops that call it (a libm call per element would cost more than the
// rest of the scoring): x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// degree-6 Taylor polynomial (relative error below 2e-7), 2^n from the
// exponent bits. Inputs below -87 give 0-like 2^-126 scaled values.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr int64_t kTile = 32;  // tokens per tile; vLLM's CPU blocks are multiples
constexpr int64_t kAhead = 2;  // blocks fetched ahead of the one being scored

// Logits of the group's G query heads for one tile of tokens:
// l[h][t] = sum_c q[h][c] * k[c][t] (keys transposed, tokens innermost). The
// two 16-float accumulators stay in registers across the channel loop.
typedef float v16sf __attribute__((vector_size(64)));

inline void tile_logits(const float* __restrict q, const float* __restrict k,
                        float* __restrict l, int64_t G, int64_t P) {
  static_assert(kTile == 32, "two 16-float accumulators per tile");
  for (int64_t h = 0; h < G; ++h) {
    v16sf a0 = {}, a1 = {};
    for (int64_t c = 0; c < P; ++c) {
      const float qc = q[h * P + c];
      v16sf k0, k1;
      __builtin_memcpy(&k0, k + c * kTile, sizeof(k0));
      __builtin_memcpy(&k1, k + c * kTile + 16, sizeof(k1));
      a0 += qc * k0;
      a1 += qc * k1;
    }
    __builtin_memcpy(l + h * kTile, &a0, sizeof(a0));
    __builtin_memcpy(l + h * kTile + 16, &a1, sizeof(a1));
  }
}

// How a tile's keys are read: [t][g][row] -> [g][c][t] floats (tokens
// innermost), for count <= kTile tokens of a block starting at kt. A row is
// one (token, KV head)'s partial key: width(P) elements of elem_t.
template <typename scalar_t>
struct FloatKeys {
  using elem_t = scalar_t;
  static int64_t width(int64_t P) { return P; }
  static void load(const elem_t* kt, float* keys, int64_t count, int64_t KV,
                   int64_t P) {
    // A partly filled last tile copies only its valid tokens.
    if (count == kTile) {
      for (int64_t gc = 0; gc < KV * P; ++gc) {
        float* dst = keys + gc * kTile;
#pragma omp simd
        for (int64_t t = 0; t < kTile; ++t)
          dst[t] = static_cast<float>(kt[t * KV * P + gc]);
      }
    } else {
      for (int64_t t = 0; t < count; ++t)
        for (int64_t gc = 0; gc < KV * P; ++gc)
          keys[gc * kTile + t] = static_cast<float>(kt[t * KV * P + gc]);
    }
  }
};

struct Int4Keys {
  using elem_t = uint8_t;
  static int64_t width(int64_t P) { return (P + 1) / 2 + 2; }
  static void load(const elem_t* kt, float* keys, int64_t count, int64_t KV,
                   int64_t P) {
    const int64_t W = width(P), pairs = P / 2, scale_at = (P + 1) / 2;
    const int64_t stride = KV * W;  // bytes from one token's row to the next
    float scales[kTile];
    for (int64_t g = 0; g < KV; ++g) {
      const uint8_t* rows = kt + g * W;
      for (int64_t t = 0; t < count; ++t) {
        const uint8_t* s = rows + t * stride + scale_at;
        const uint16_t bits = static_cast<uint16_t>(s[0] | (s[1] << 8));
        scales[t] = static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
      }
      float* dst = keys + g * P * kTile;
      for (int64_t i = 0; i < pairs; ++i) {
        float* lo = dst + 2 * i * kTile;
        float* hi = lo + kTile;
#pragma omp simd
        for (int64_t t = 0; t < count; ++t) {
          const int b = rows[t * stride + i];
          lo[t] = static_cast<float>((b & 15) - 8) * scales[t];
          hi[t] = static_cast<float>((b >> 4) - 8) * scales[t];
        }
      }
      if (P % 2) {  // the last channel: a low nibble alone
        float* lo = dst + (P - 1) * kTile;
#pragma omp simd
        for (int64_t t = 0; t < count; ++t)
          lo[t] = static_cast<float>((rows[t * stride + pairs] & 15) - 8) * scales[t];
      }
    }
  }
};

template <typename Keys>
void score_requests(const float* query, const typename Keys::elem_t* cache,
                    const int32_t* table, const int32_t* lens, const float* bias, float* out,
                    int64_t begin, int64_t end,
                    int64_t M, int64_t B, int64_t KV, int64_t P, int64_t G,
                    int64_t rule) {
  const bool log_mass = rule != 0;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t H = KV * G;
  using scalar_t = typename Keys::elem_t;
  const int64_t row = KV * Keys::width(P);  // elements per token
  const int64_t block_elems = B * row;
  const int64_t block_bytes = block_elems * static_cast<int64_t>(sizeof(scalar_t));
  std::vector<float> keys(KV * P * kTile);  // [KV][P][tile]: tokens innermost
  std::vector<float> logits(G * kTile);     // [G][tile]
  std::vector<float> bmax(H * M);           // [KV][G][M]
  std::vector<float> bsum(H * M);
  std::vector<float> shifted(M);            // one head's block maxima + bias
  std::vector<float> mass(M);
  std::vector<float> weight(M);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t len = lens[r];
    const int64_t blocks = (len + B - 1) / B;
    const float* q = query + r * H * P;  // [KV][G][P]
    for (int64_t j = 0; j < std::min<int64_t>(kAhead, blocks); ++j) {
      const char* first =
          reinterpret_cast<const char*>(cache + table[r * M + j] * block_elems);
      for (int64_t byte = 0; byte < block_bytes; byte += 64)
        __builtin_prefetch(first + byte, 0, 2);
    }
    for (int64_t j = 0; j < blocks; ++j) {
      const scalar_t* k = cache + table[r * M + j] * block_elems;
      if (j + kAhead < blocks) {  // blocks lie scattered: fetch ahead
        const char* next = reinterpret_cast<const char*>(
            cache + table[r * M + j + kAhead] * block_elems);
        for (int64_t byte = 0; byte < block_bytes; byte += 64)
          __builtin_prefetch(next + byte, 0, 2);
      }
      const int64_t valid = std::min<int64_t>(B, len - j * B);
      for (int64_t start = 0; start < valid; start += kTile) {
        const int64_t count = std::min<int64_t>(kTile, valid - start);
        // One pass over the tile's keys, every KV head: [t][g][c] -> [g][c][t].
        Keys::load(k + start * row, keys.data(), count, KV, P);
        for (int64_t g = 0; g < KV; ++g) {
          tile_logits(q + g * G * P, keys.data() + g * P * kTile, logits.data(), G, P);
          for (int64_t h = 0; h < G; ++h) {
            float* l = logits.data() + h * kTile;
            for (int64_t t = count; t < kTile; ++t) l[t] = neg_inf;  // past the end
            float m = neg_inf;
#pragma omp simd reduction(max : m)
            for (int64_t t = 0; t < kTile; ++t) m = std::max(m, l[t]);
            float& bm = bmax[(g * G + h) * M + j];
            if (!log_mass) {
              bm = start == 0 ? m : std::max(bm, m);
              continue;
            }
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t t = 0; t < kTile; ++t) s += exp_nonpositive(l[t] - m);
            float& bs = bsum[(g * G + h) * M + j];
            if (start == 0) {  // the block's first tile (the only one at B = 32)
              bm = m;
              bs = s;
            } else {  // merge this tile into the block's running (max, sum)
              const float top = std::max(bm, m);
              bs = bs * exp_nonpositive(bm - top) + s * exp_nonpositive(m - top);
              bm = top;
            }
          }
        }
      }
    }
    for (int64_t g = 0; g < KV; ++g) {
      float* o = out + (r * KV + g) * M;
      for (int64_t j = blocks; j < M; ++j) o[j] = neg_inf;
      if (!log_mass) {  // the largest (biased) block maximum of the group
        for (int64_t j = 0; j < blocks; ++j) o[j] = neg_inf;
        for (int64_t h = 0; h < G; ++h) {
          const float* bm = bmax.data() + (g * G + h) * M;
          const float* b = bias == nullptr ? nullptr : bias + (r * H + g * G + h) * M;
          for (int64_t j = 0; j < blocks; ++j)
            o[j] = std::max(o[j], b == nullptr ? bm[j] : bm[j] + b[j]);
        }
        continue;
      }
      // Per head, a block's log mass is (max - head's top) + log(sum) -
      // log(head's total), kept in the log domain: far blocks (more than 87
      // nats below the head's best, common with attention sinks at long
      // contexts) keep their order instead of flushing to one floor value.
      // The heads then merge by log-sum-exp (their mean mass).
      std::fill(mass.begin(), mass.begin() + blocks, neg_inf);     // running max
      std::fill(weight.begin(), weight.begin() + blocks, 0.0f);    // sum exp(- max)
      for (int64_t h = 0; h < G; ++h) {
        const float* bm = bmax.data() + (g * G + h) * M;
        const float* bs = bsum.data() + (g * G + h) * M;
        if (bias != nullptr) {  // the block term shifts the block's every logit
          const float* b = bias + (r * H + g * G + h) * M;
          for (int64_t j = 0; j < blocks; ++j) shifted[j] = bm[j] + b[j];
          bm = shifted.data();
        }
        float top = neg_inf;
#pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < blocks; ++j) top = std::max(top, bm[j]);
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < blocks; ++j) total += bs[j] * exp_nonpositive(bm[j] - top);
        const float shift = top + std::log(total);
        for (int64_t j = 0; j < blocks; ++j) {
          const float lm = bm[j] - shift + std::log(bs[j]);
          const float m = mass[j];
          if (lm > m) {
            weight[j] = weight[j] * exp_nonpositive(m - lm) + 1.0f;
            mass[j] = lm;
          } else {
            weight[j] += exp_nonpositive(lm - m);
          }
        }
      }
      const float log_g = std::log(static_cast<float>(G));
      for (int64_t j = 0; j < blocks; ++j)
        o[j] = mass[j] + std::log(weight[j]) - log_g;
    }
  }
}

}  // namespace

torch::Tensor block_scores(torch::Tensor query, torch::Tensor cache,
                           torch::Tensor table, torch::Tensor lens, torch::Tensor bias,
                           int64_t rule) {
  TORCH_CHECK(query.is_contiguous() && query.scalar_type() == torch::kFloat32 &&
                  query.dim() == 3,
              "query must be contiguous float32 [R, H, P]");
  TORCH_CHECK(cache.is_contiguous() && cache.dim() == 4, "cache must be [N, B, KV, W]");
  TORCH_CHECK(table.is_contiguous() && table.scalar_type() == torch::kInt32,
              "table must be contiguous int32");
  TORCH_CHECK(lens.is_contiguous() && lens.scalar_type() == torch::kInt32,
              "lens must be contiguous int32");
  const int64_t R = table.size(0), M = table.size(1);
  const int64_t B = cache.size(1), KV = cache.size(2), P = query.size(2);
  const int64_t G = query.size(1) / KV;
  const bool packed = cache.scalar_type() == torch::kUInt8;
  const int64_t W = packed ? Int4Keys::width(P) : P;
  TORCH_CHECK(cache.size(3) == W, "cache rows must be ", W, " elements for ", P,
              " channels", packed ? " packed at 4 bits" : "", ", got ", cache.size(3));
  const bool biased = bias.numel() > 0;
  TORCH_CHECK(!biased || (bias.is_contiguous() && bias.scalar_type() == torch::kFloat32 &&
                          bias.numel() == R * query.size(1) * M),
              "bias must be contiguous float32 [R, H, M] or empty");
  auto out = torch::empty({R, KV, M}, query.options());
  const float* q = query.data_ptr<float>();
  const int32_t* t = table.data_ptr<int32_t>();
  const int32_t* n = lens.data_ptr<int32_t>();
  const float* b = biased ? bias.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  if (packed) {
    const uint8_t* c = cache.data_ptr<uint8_t>();
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      score_requests<Int4Keys>(q, c, t, n, b, o, begin, end, M, B, KV, P, G, rule);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::BFloat16, at::ScalarType::Half, cache.scalar_type(),
      "infinigen_block_scores", [&] {
        const scalar_t* c = cache.data_ptr<scalar_t>();
        at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
          score_requests<FloatKeys<scalar_t>>(q, c, t, n, b, o, begin, end, M, B, KV,
                                              P, G, rule);
        });
      });
  return out;
}
