// InfiniGen's block scores in one pass over the partial keys (CPU).
//
// Computes what vllm_infinigen.method.scoring.block_scores computes, without
// materialising the [requests, heads, tokens] logits: for every request it
// walks the request's blocks once (fetching the next block ahead, since a
// block table is scattered), forms the logits of every query head for the
// block's tokens in a small buffer (the heads of a KV group across a
// vector's lanes, a run of tokens at a time), and keeps per block and head
// the block's maximum logit and its sum of exp(logit - maximum). A second, block-sized
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
//   qcodes  [R, H, P] int8 and qscales [R, H] float32: with packed keys, the
//           query at 8 bits (method/quant4.py's quantize_query; query then
//           holds codes * scale), else empty
//   out     [R, KV, M] float32, -inf past a request's last block

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

// Packed 4-bit keys are scored with integer dot products (four byte
// products summed into each 32-bit lane per instruction) where the CPU has
// them; elsewhere they are decoded to floats like the other key types.
#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)
#include <immintrin.h>
#define INFINIGEN_INTEGER_DOTS 1
#else
#define INFINIGEN_INTEGER_DOTS 0
#endif

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
constexpr int64_t kLanes = 8;  // query heads scored together, one per vector lane
// Tokens whose logits are formed together, each in its own accumulator: as
// many as the vector registers hold beside the query's (32 with AVX-512, 16
// without).
#if defined(__AVX512VL__)
constexpr int64_t kRun = 16;
#else
constexpr int64_t kRun = 12;
#endif
// Floats from one decoded key row of a run to the next: a constant, so that
// every row of the run is reached from one pointer (a run-time stride left
// the compiler short of registers for the row addresses), a little past
// kMaxChannels so that the rows do not share cache sets.
constexpr int64_t kMaxChannels = 512;
constexpr int64_t kRowStride = kMaxChannels + 16;

// The group's query heads lie across the lanes of one vector, and every key
// channel multiplies all of them at once: a key row is read as it is stored
// (channels innermost), and no tile is transposed. The run's tokens form
// independent chains of multiply-adds, enough to keep the units busy.
typedef float v8sf __attribute__((vector_size(32)));
typedef float v16sf __attribute__((vector_size(64)));
typedef float v4sf __attribute__((vector_size(16)));

// The largest of a tile's kTile logits, in vector halves (the compiler
// leaves a max reduction over floats scalar).
inline float tile_max(const float* l) {
  static_assert(kTile == 32, "two 16-float halves per tile");
  v16sf a, b;
  __builtin_memcpy(&a, l, sizeof(a));
  __builtin_memcpy(&b, l + 16, sizeof(b));
  a = a > b ? a : b;
  v8sf c, d;
  __builtin_memcpy(&c, &a, sizeof(c));
  __builtin_memcpy(&d, reinterpret_cast<const char*>(&a) + sizeof(c), sizeof(d));
  c = c > d ? c : d;
  v4sf e, f;
  __builtin_memcpy(&e, &c, sizeof(e));
  __builtin_memcpy(&f, reinterpret_cast<const char*>(&c) + sizeof(e), sizeof(f));
  e = e > f ? e : f;
  return std::max(std::max(e[0], e[1]), std::max(e[2], e[3]));
}

// out[n][lane] = sum_c rows[n][c] * qt[c][lane] for the run's kRun tokens
// (rows: kRun rows of P floats, kRowStride apart; qt: [P][kLanes]).
inline void run_logits(const float* __restrict qt, const float* __restrict rows,
                       float* __restrict out, int64_t P) {
  v8sf acc[kRun] = {};
  for (int64_t c = 0; c < P; ++c) {
    v8sf qc;
    __builtin_memcpy(&qc, qt + c * kLanes, sizeof(qc));
    for (int64_t n = 0; n < kRun; ++n) acc[n] += rows[n * kRowStride + c] * qc;
  }
  __builtin_memcpy(out, acc, sizeof(acc));
}

// How a token's key row is read: width(P) elements of elem_t per (token, KV
// head); decode() writes its P channels as floats in the order channel(i)
// names and returns the factor of the row's logits.
template <typename scalar_t>
struct FloatKeys {
  using elem_t = scalar_t;
  static constexpr bool kIntegerDots = false;
  static int64_t width(int64_t P) { return P; }
  static int64_t channel(int64_t i, int64_t) { return i; }
  static float decode(const elem_t* __restrict row, float* __restrict dst, int64_t P) {
#pragma omp simd
    for (int64_t c = 0; c < P; ++c) dst[c] = static_cast<float>(row[c]);
    return 1.0f;
  }
};

// bfloat16 by its bits (the upper half of a float), which the compiler
// vectorises; c10::BFloat16's conversion it does not.
template <>
struct FloatKeys<c10::BFloat16> {
  using elem_t = c10::BFloat16;
  static constexpr bool kIntegerDots = false;
  static int64_t width(int64_t P) { return P; }
  static int64_t channel(int64_t i, int64_t) { return i; }
  static float decode(const elem_t* __restrict row, float* __restrict dst, int64_t P) {
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
    uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
    for (int64_t c = 0; c < P; ++c) out[c] = static_cast<uint32_t>(bits[c]) << 16;
    return 1.0f;
  }
};

// Packed rows: the codes are decoded low nibbles first (channels 0, 2, 4,
// ...), then high nibbles (1, 3, 5, ...), each a run over contiguous bytes;
// the row's scale multiplies its logits instead of its P channels.
struct Int4Keys {
  using elem_t = uint8_t;
  static constexpr bool kIntegerDots = INFINIGEN_INTEGER_DOTS;
  static int64_t width(int64_t P) { return (P + 1) / 2 + 2; }
  static float scale(const elem_t* row, int64_t P) {
    const uint8_t* s = row + (P + 1) / 2;
    const uint16_t bits = static_cast<uint16_t>(s[0] | (s[1] << 8));
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  }
  // The nibbles themselves (code + 8, in [1, 15]) as bytes, in decode()'s
  // order; returns the row's scale.
  static float nibbles(const elem_t* __restrict row, uint8_t* __restrict dst, int64_t P) {
    const int64_t lows = (P + 1) / 2, highs = P / 2;
#pragma omp simd
    for (int64_t i = 0; i < lows; ++i) dst[i] = row[i] & 15;
#pragma omp simd
    for (int64_t i = 0; i < highs; ++i) dst[lows + i] = row[i] >> 4;
    return scale(row, P);
  }
  static int64_t channel(int64_t i, int64_t P) {
    const int64_t lows = (P + 1) / 2;
    return i < lows ? 2 * i : 2 * (i - lows) + 1;
  }
  static float decode(const elem_t* __restrict row, float* __restrict dst, int64_t P) {
    const int64_t lows = (P + 1) / 2, highs = P / 2;
#pragma omp simd
    for (int64_t i = 0; i < lows; ++i) dst[i] = static_cast<float>((row[i] & 15) - 8);
#pragma omp simd
    for (int64_t i = 0; i < highs; ++i)
      dst[lows + i] = static_cast<float>((row[i] >> 4) - 8);
    return scale(row, P);
  }
};

// The run loop both key paths share, for one tile of count <= kTile tokens
// of one KV head: decode(t, i) turns the tile's token t into run row i and
// returns its scale; dots(chunk) forms the run's sums for a chunk of kLanes
// heads; logit(head, t, i, scale) writes head's logit of token t from run
// row i.
template <typename Decode, typename Dots, typename Logit>
inline void tile_runs(int64_t count, int64_t G, Decode decode, Dots dots, Logit logit) {
  const int64_t chunks = (G + kLanes - 1) / kLanes;
  float scales[kRun];
  for (int64_t t0 = 0; t0 < count; t0 += kRun) {
    const int64_t n = std::min<int64_t>(kRun, count - t0);
    for (int64_t i = 0; i < n; ++i) scales[i] = decode(t0 + i, i);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      dots(ch);
      const int64_t heads = std::min<int64_t>(kLanes, G - ch * kLanes);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t lane = 0; lane < heads; ++lane)
          logit(ch * kLanes + lane, t0 + i, i, scales[i]);
    }
  }
}

// Logits of the group's G query heads for one tile of count <= kTile tokens
// of KV head g: l[h][t] (tokens innermost). kt: the tile's first token row;
// qt: the request's query for this KV head, [chunks][P][kLanes] with the
// channels in Keys' order and lanes past G zero.
template <typename Keys>
inline void tile_logits(const typename Keys::elem_t* kt, const float* qt, float* rows,
                        float* run, float* l, int64_t count, int64_t KV, int64_t g,
                        int64_t P, int64_t G) {
  const int64_t W = Keys::width(P), stride = KV * W;
  tile_runs(
      count, G,
      [&](int64_t t, int64_t i) {
        return Keys::decode(kt + t * stride + g * W, rows + i * kRowStride, P);
      },
      [&](int64_t ch) { run_logits(qt + ch * P * kLanes, rows, run, P); },
      [&](int64_t h, int64_t t, int64_t i, float scale) {
        l[h * kTile + t] = run[i * kLanes + h % kLanes] * scale;
      });
}

#if INFINIGEN_INTEGER_DOTS
// Bytes from one token's nibble row to the next in a run (see kRowStride).
constexpr int64_t kRowBytes = kMaxChannels + 64;

inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}

// out[n][lane] = sum_c rows[n][c] * q[lane][c] over groups * 4 channels, in
// 32-bit integers: rows are a run's nibbles (unsigned bytes, kRowBytes
// apart), qpack [groups][kLanes] holds four of a lane's signed 8-bit query
// codes per 32-bit word. A row's four bytes are broadcast to every lane.
inline void run_dots(const int32_t* __restrict qpack, const uint8_t* __restrict rows,
                     int32_t* __restrict out, int64_t groups) {
  __m256i acc[kRun];
  for (int64_t n = 0; n < kRun; ++n) acc[n] = _mm256_setzero_si256();
  for (int64_t j = 0; j < groups; ++j) {
    const __m256i qv =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qpack + j * kLanes));
    for (int64_t n = 0; n < kRun; ++n) {
      int32_t four;
      __builtin_memcpy(&four, rows + n * kRowBytes + 4 * j, sizeof(four));
      acc[n] = dot_u8s8(acc[n], _mm256_set1_epi32(four), qv);
    }
  }
  for (int64_t n = 0; n < kRun; ++n)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + n * kLanes), acc[n]);
}

// tile_logits for packed keys and the query at 8 bits: a logit is
// (sum nibble * q_code - 8 * sum q_code) * q_scale * row scale, the sums
// exact in integers. qpack, qoff (8 * sum q_code) and qscale: this KV
// head's, per chunk of kLanes heads.
inline void tile_logits_int4(const uint8_t* kt, const int32_t* qpack, const int32_t* qoff,
                             const float* qscale, uint8_t* rows, int32_t* run, float* l,
                             int64_t count, int64_t KV, int64_t g, int64_t P, int64_t G) {
  const int64_t W = Int4Keys::width(P), stride = KV * W, groups = (P + 3) / 4;
  tile_runs(
      count, G,
      [&](int64_t t, int64_t i) {
        return Int4Keys::nibbles(kt + t * stride + g * W, rows + i * kRowBytes, P);
      },
      [&](int64_t ch) { run_dots(qpack + ch * groups * kLanes, rows, run, groups); },
      [&](int64_t h, int64_t t, int64_t i, float scale) {
        l[h * kTile + t] =
            static_cast<float>(run[i * kLanes + h % kLanes] - qoff[h]) * (qscale[h] * scale);
      });
}
#endif

template <typename Keys>
void score_requests(const float* query, const int8_t* qcodes, const float* qscales,
                    const typename Keys::elem_t* cache,
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
  const int64_t chunks = (G + kLanes - 1) / kLanes;
  std::vector<float> qt(KV * chunks * P * kLanes);  // [KV][chunk][P][lane]
  std::vector<float> rows(kRun * kRowStride, 0.0f);  // a run's keys as floats
  std::vector<float> run(kRun * kLanes);
  std::vector<float> logits(G * kTile);             // [G][tile]
#if INFINIGEN_INTEGER_DOTS
  // The integer path's query (packed keys): [KV][chunk][group][lane] words
  // of four codes, and per (KV, chunk, lane) 8 * sum of codes and scale.
  const int64_t groups = (P + 3) / 4;
  std::vector<int32_t> qpack(Keys::kIntegerDots ? KV * chunks * groups * kLanes : 0);
  std::vector<int32_t> qoff(Keys::kIntegerDots ? KV * chunks * kLanes : 0);
  std::vector<float> qscale(Keys::kIntegerDots ? KV * chunks * kLanes : 0);
  std::vector<uint8_t> nibble_rows(Keys::kIntegerDots ? kRun * kRowBytes : 0, 8);
  std::vector<int32_t> dots(Keys::kIntegerDots ? kRun * kLanes : 0);
#endif
  std::vector<float> bmax(H * M);           // [KV][G][M]
  std::vector<float> bsum(H * M);
  std::vector<float> shifted(M);            // one head's block maxima + bias
  std::vector<float> mass(M);
  std::vector<float> weight(M);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t len = lens[r];
    const int64_t blocks = (len + B - 1) / B;
    const float* q = query + r * H * P;  // [KV][G][P]
    if constexpr (Keys::kIntegerDots) {
#if INFINIGEN_INTEGER_DOTS
      std::fill(qpack.begin(), qpack.end(), 0);
      int8_t* bytes = reinterpret_cast<int8_t*>(qpack.data());
      for (int64_t g = 0; g < KV; ++g)
        for (int64_t h = 0; h < G; ++h) {
          const int64_t chunk = g * chunks + h / kLanes, lane = h % kLanes;
          const int8_t* codes = qcodes + (r * H + g * G + h) * P;
          int32_t sum = 0;
          for (int64_t i = 0; i < P; ++i) {
            const int8_t code = codes[Keys::channel(i, P)];
            bytes[((chunk * groups + i / 4) * kLanes + lane) * 4 + i % 4] = code;
            sum += code;
          }
          qoff[chunk * kLanes + lane] = 8 * sum;
          qscale[chunk * kLanes + lane] = qscales[r * H + g * G + h];
        }
#endif
    } else {
      std::fill(qt.begin(), qt.end(), 0.0f);
      for (int64_t g = 0; g < KV; ++g)
        for (int64_t h = 0; h < G; ++h)
          for (int64_t i = 0; i < P; ++i)
            qt[((g * chunks + h / kLanes) * P + i) * kLanes + h % kLanes] =
                q[(g * G + h) * P + Keys::channel(i, P)];
    }
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
        for (int64_t g = 0; g < KV; ++g) {
          if constexpr (Keys::kIntegerDots) {
#if INFINIGEN_INTEGER_DOTS
            const int64_t at = g * chunks * kLanes;
            tile_logits_int4(k + start * row, qpack.data() + at * groups, qoff.data() + at,
                             qscale.data() + at, nibble_rows.data(), dots.data(),
                             logits.data(), count, KV, g, P, G);
#endif
          } else {
            tile_logits<Keys>(k + start * row, qt.data() + g * chunks * P * kLanes,
                              rows.data(), run.data(), logits.data(), count, KV, g, P, G);
          }
          for (int64_t h = 0; h < G; ++h) {
            float* l = logits.data() + h * kTile;
            for (int64_t t = count; t < kTile; ++t) l[t] = neg_inf;  // past the end
            const float m = tile_max(l);
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
                           int64_t rule, torch::Tensor qcodes, torch::Tensor qscales) {
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
  TORCH_CHECK(P <= kMaxChannels, "at most ", kMaxChannels, " partial channels, got ", P);
  const bool biased = bias.numel() > 0;
  TORCH_CHECK(!biased || (bias.is_contiguous() && bias.scalar_type() == torch::kFloat32 &&
                          bias.numel() == R * query.size(1) * M),
              "bias must be contiguous float32 [R, H, M] or empty");
  TORCH_CHECK(!packed || (qcodes.is_contiguous() && qcodes.scalar_type() == torch::kInt8 &&
                          qcodes.numel() == query.numel() && qscales.is_contiguous() &&
                          qscales.scalar_type() == torch::kFloat32 &&
                          qscales.numel() == query.size(0) * query.size(1)),
              "packed keys need the query's int8 codes [R, H, P] and float32 scales [R, H]");
  auto out = torch::empty({R, KV, M}, query.options());
  const float* q = query.data_ptr<float>();
  const int32_t* t = table.data_ptr<int32_t>();
  const int32_t* n = lens.data_ptr<int32_t>();
  const float* b = biased ? bias.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  if (packed) {
    const uint8_t* c = cache.data_ptr<uint8_t>();
    const int8_t* qc = qcodes.data_ptr<int8_t>();
    const float* qs = qscales.data_ptr<float>();
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      score_requests<Int4Keys>(q, qc, qs, c, t, n, b, o, begin, end, M, B, KV, P, G, rule);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::BFloat16, at::ScalarType::Half, cache.scalar_type(),
      "infinigen_block_scores", [&] {
        const scalar_t* c = cache.data_ptr<scalar_t>();
        at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
          score_requests<FloatKeys<scalar_t>>(q, nullptr, nullptr, c, t, n, b, o, begin,
                                              end, M, B, KV, P, G, rule);
        });
      });
  return out;
}

// Packs new tokens' partial keys at 4 bits and stores them at their slots,
// in place: what method/quant4.py's pack_int4 followed by an index_copy_
// does, for the few tokens of a decode step without a chain of small torch
// ops per layer. Exact IEEE arithmetic (no reciprocal or contracted math),
// so that the bytes equal pack_int4's.
//   keys   [T, KV, P] float32
//   slots  [T] int64, valid and distinct
//   cache  [S, KV, W] uint8 (a partial-key cache viewed by slot), W = ceil(P/2)+2
#pragma GCC push_options
#pragma GCC optimize("no-fast-math", "no-unsafe-math-optimizations", "fp-contract=off")
namespace {

// float -> float16 bits, round to nearest even (finite, non-negative input
// at most 65504, as the scales are).
uint16_t half_bits(float value) {
  return c10::Half(value).x;
}

float half_value(uint16_t bits) {
  c10::Half h;
  h.x = bits;
  return static_cast<float>(h);
}

void pack_rows(const float* keys, const int64_t* slots, uint8_t* cache, int64_t T,
               int64_t KV, int64_t P, int64_t W) {
  const int64_t width = (P + 1) / 2;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < KV; ++h) {
      const float* k = keys + (t * KV + h) * P;
      uint8_t* row = cache + (slots[t] * KV + h) * W;
      float peak = 0.0f;
      for (int64_t c = 0; c < P; ++c) peak = std::max(peak, std::fabs(k[c]));
      const float wanted = std::min(peak / 7.0f, 65504.0f);
      uint16_t bits = half_bits(wanted);
      if (half_value(bits) < wanted) ++bits;  // round up to the next float16
      const float divisor = half_value(bits);
      for (int64_t i = 0; i < width; ++i) {
        int codes[2] = {8, 8};
        for (int64_t j = 0; j < 2; ++j) {
          const int64_t c = 2 * i + j;
          if (c >= P || !(divisor > 0.0f)) continue;
          float code = std::nearbyint(k[c] / divisor);
          code = std::min(7.0f, std::max(-7.0f, code));
          codes[j] = static_cast<int>(code) + 8;
        }
        row[i] = static_cast<uint8_t>(codes[0] | (codes[1] << 4));
      }
      row[width] = static_cast<uint8_t>(bits & 0xFF);
      row[width + 1] = static_cast<uint8_t>(bits >> 8);
    }
  }
}

}  // namespace
#pragma GCC pop_options

void write_packed(torch::Tensor cache, torch::Tensor keys, torch::Tensor slots) {
  TORCH_CHECK(keys.is_contiguous() && keys.scalar_type() == torch::kFloat32 &&
                  keys.dim() == 3,
              "keys must be contiguous float32 [T, KV, P]");
  TORCH_CHECK(slots.is_contiguous() && slots.scalar_type() == torch::kInt64 &&
                  slots.numel() == keys.size(0),
              "slots must be contiguous int64 [T]");
  TORCH_CHECK(cache.is_contiguous() && cache.scalar_type() == torch::kUInt8 &&
                  cache.dim() == 3 && cache.size(1) == keys.size(1),
              "cache must be contiguous uint8 [S, KV, W]");
  const int64_t P = keys.size(2), W = cache.size(2);
  TORCH_CHECK(W == (P + 1) / 2 + 2, "cache rows must be ", (P + 1) / 2 + 2, " bytes for ",
              P, " channels, got ", W);
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.numel(); ++t)
    TORCH_CHECK(s[t] >= 0 && s[t] < cache.size(0), "slot ", s[t], " out of range");
  pack_rows(keys.data_ptr<float>(), s, cache.data_ptr<uint8_t>(), keys.size(0),
            keys.size(1), P, W);
}
