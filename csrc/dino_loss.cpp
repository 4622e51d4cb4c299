// The fused DINO loss on the CPU (Caron et al. 2021, Algorithm 1; official main_dino.py DINOLoss):
// teacher softmax, student log-softmax, the cross-entropy over every (teacher view, other
// student view) pair, its gradient with respect to the student logits, and the teacher row mean,
// in one call that reads each student row once from memory.
//
// Per sample b with teacher probabilities q0, q1 and student views v = 0..ncrops-1, the student
// row of view v meets the teacher views iq != v, i.e. the weights w_v = q1 (v = 0), q0 (v = 1),
// q0 + q1 (v >= 2). With ls_v = log_softmax(s_v / Ts) and p_v = softmax(s_v / Ts):
//   loss     = sum over (v, b) of -w_v . ls_v, divided by npairs * B   (npairs = 2 (ncrops - 1))
//   dloss/ds = (sum(w_v) p_v - w_v) / (Ts npairs B)
// Float32 math; sums in float32 over short blocks and in float64 across them. Rows are
// independent and their losses summed in a fixed order, so results do not depend on the thread
// count. Inputs are float32 or bfloat16 (passed as its 16-bit pattern).
// Optionally (health metrics, not used by the loss): each teacher row's entropy, computed in the
// teacher softmax pass, and the teacher probabilities' mean over the rows.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "multiversion.h"

namespace dino_fast {
namespace {

// DINO_FAST_CLONES (multiversion.h): an AVX2 copy of the hot row functions beside the baseline
// x86-64 one.
// The row bodies must be inlined into each clone to be compiled for its instruction set.
#if defined(__GNUC__) || defined(__clang__)
#define DINO_FAST_INLINE inline __attribute__((always_inline))
#else
#define DINO_FAST_INLINE inline
#endif

inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

inline float load_float(float x) { return x; }
inline float load_float(uint16_t bf16) { return bits_float(static_cast<uint32_t>(bf16) << 16); }
inline void store_float(float* out, float x) { *out = x; }

// float -> bfloat16 rounding to nearest even, NaN kept a (quiet) NaN, as torch rounds.
inline void store_float(uint16_t* out, float x) {
  const uint32_t bits = float_bits(x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  *out = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}

// exp(x) for x <= 0 (a softmax exponent), branch-free so that loops over it vectorise:
// 2^n * e^r with n = round(x / ln 2), |r| <= ln(2) / 2, and the Cephes polynomial for e^r (about
// 1 ulp). Exponents below -87 (results under the smallest normal float) give 0; NaN stays NaN.
DINO_FAST_INLINE float exp_nonpositive(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const uint32_t below = 0u - static_cast<uint32_t>(x < -87.0f);  // all ones where it underflows
  const float clamped = bits_float((float_bits(x) & ~below) | (float_bits(-87.0f) & below));
  const float shifted = clamped * 1.44269504088896341f + magic;
  const int32_t n = static_cast<int32_t>(float_bits(shifted) - float_bits(magic));
  const float nf = shifted - magic;
  const float r = (clamped - nf * 0.693359375f) - nf * -2.12194440e-4f;  // ln 2 in two parts
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float er = poly * (r * r) + r + 1.0f;
  const float result = er * bits_float(static_cast<uint32_t>(n + 127) << 23);
  return bits_float(float_bits(result) & ~below);
}

// Sums run in float32 over blocks of kBlock elements (vectorised) and in float64 across blocks.
constexpr int64_t kBlock = 512;

// x = (logits - center) / temperature into `out` (center may be null); returns max x.
template <typename In>
DINO_FAST_INLINE float scaled_row(const In* logits, const float* center, float temperature,
                                  int64_t k, float* out) {
  float row_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t i = 0; i < k; ++i) {
    const float x = (load_float(logits[i]) - (center ? center[i] : 0.0f)) / temperature;
    out[i] = x;
    row_max = x > row_max ? x : row_max;
  }
  return row_max;
}

// values[start:end] = exp(values - row_max); returns their float32 sum.
DINO_FAST_INLINE float exp_block(float* values, int64_t start, int64_t end, float row_max) {
  float block_total = 0.0f;
#pragma omp simd reduction(+ : block_total)
  for (int64_t i = start; i < end; ++i) {
    values[i] = exp_nonpositive(values[i] - row_max);
    block_total += values[i];
  }
  return block_total;
}

// One teacher row: probs = softmax((logits - center) / temperature). When `entropy` is not
// null it also gets the row's entropy -sum q log q = sum q (log(total) - (x - max)), with x
// recomputed exactly as scaled_row computes it (the probabilities are not changed by it).
template <typename In>
DINO_FAST_INLINE void teacher_probs_row_impl(const In* logits, const float* center,
                                             float temperature, int64_t k, float* probs,
                                             float* entropy) {
  const float row_max = scaled_row(logits, center, temperature, k, probs);
  double total = 0.0;
  for (int64_t start = 0; start < k; start += kBlock)
    total += exp_block(probs, start, std::min(k, start + kBlock), row_max);
  const float inv_total = static_cast<float>(1.0 / total);
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) probs[i] *= inv_total;
  if (!entropy) return;
  const float log_total = static_cast<float>(std::log(total));
  double weighted = 0.0;  // sum q (x - max), <= 0
  for (int64_t start = 0; start < k; start += kBlock) {
    const int64_t end = std::min(k, start + kBlock);
    float block_weighted = 0.0f;
#pragma omp simd reduction(+ : block_weighted)
    for (int64_t i = start; i < end; ++i) {
      const float x = (load_float(logits[i]) - center[i]) / temperature;
      block_weighted += probs[i] * (x - row_max);
    }
    weighted += block_weighted;
  }
  *entropy = static_cast<float>(log_total - weighted);
}

DINO_FAST_CLONES void teacher_probs_row(const float* logits, const float* center, float temp,
                                        int64_t k, float* probs, float* entropy) {
  teacher_probs_row_impl(logits, center, temp, k, probs, entropy);
}
DINO_FAST_CLONES void teacher_probs_row(const uint16_t* logits, const float* center, float temp,
                                        int64_t k, float* probs, float* entropy) {
  teacher_probs_row_impl(logits, center, temp, k, probs, entropy);
}

// One student row against its weights w = use_q0 * q0 + use_q1 * q1: returns -w . ls and, when
// `grad` is not null, writes grad = scale * (sum(w) p - w). `scratch` holds k floats.
template <typename In>
DINO_FAST_INLINE double student_row_impl(const In* logits, float temperature, const float* q0,
                                         const float* q1, float use_q0, float use_q1, float scale,
                                         int64_t k, float* scratch, In* grad) {
  const float row_max = scaled_row(logits, static_cast<const float*>(nullptr), temperature, k,
                                   scratch);
  // -w . ls = sum(w) log(sum exp(x - max)) - w . (x - max)
  double total = 0.0, weight_sum = 0.0, weighted_x = 0.0;
  for (int64_t start = 0; start < k; start += kBlock) {
    const int64_t end = std::min(k, start + kBlock);
    float block_weight = 0.0f, block_weighted_x = 0.0f;
#pragma omp simd reduction(+ : block_weight, block_weighted_x)
    for (int64_t i = start; i < end; ++i) {
      const float w = use_q0 * q0[i] + use_q1 * q1[i];
      block_weight += w;
      block_weighted_x += w * (scratch[i] - row_max);
    }
    weight_sum += block_weight;
    weighted_x += block_weighted_x;
    total += exp_block(scratch, start, end, row_max);  // the block is still in L1
  }
  if (grad) {
    const float prob_scale = static_cast<float>(weight_sum / total);
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) {
      const float w = use_q0 * q0[i] + use_q1 * q1[i];
      store_float(grad + i, scale * (prob_scale * scratch[i] - w));
    }
  }
  return weight_sum * std::log(total) - weighted_x;
}

DINO_FAST_CLONES double student_row(const float* logits, float temp, const float* q0,
                                    const float* q1, float use_q0, float use_q1, float scale,
                                    int64_t k, float* scratch, float* grad) {
  return student_row_impl(logits, temp, q0, q1, use_q0, use_q1, scale, k, scratch, grad);
}
DINO_FAST_CLONES double student_row(const uint16_t* logits, float temp, const float* q0,
                                    const float* q1, float use_q0, float use_q1, float scale,
                                    int64_t k, float* scratch, uint16_t* grad) {
  return student_row_impl(logits, temp, q0, q1, use_q0, use_q1, scale, k, scratch, grad);
}

// mean[i] = the mean of column i over `rows` rows, summed in float64 in row order.
template <typename In>
void column_mean(const In* rows_ptr, int64_t rows, int64_t k, float* mean, int threads) {
  const int64_t block = 1024;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t start = 0; start < k; start += block) {
    const int64_t width = start + block < k ? block : k - start;
    double acc[block] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const In* row = rows_ptr + r * k + start;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) acc[i] += load_float(row[i]);
    }
    for (int64_t i = 0; i < width; ++i) mean[start + i] = static_cast<float>(acc[i] / rows);
  }
}

// The sizes and settings of one call, shared by every dtype combination.
struct LossArgs {
  const float* center;  // (K,)
  int64_t batch, k, ncrops;
  float student_temp, teacher_temp;
  float* teacher_mean;  // (K,) output
  float* teacher_entropy;  // (2B,) output, or null: the entropy of each teacher row
  float* probs_mean;  // (K,) output, or null: the mean teacher probabilities over the rows
  int threads;
};

template <typename S, typename T>
double dino_loss_typed(const S* student, const T* teacher, S* grad, const LossArgs& a) {
  const int64_t batch = a.batch, k = a.k, ncrops = a.ncrops;
  const int threads = a.threads;
  std::vector<float> probs(static_cast<size_t>(2 * batch * k));  // (2B, K) teacher softmax
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < 2 * batch; ++r)
    teacher_probs_row(teacher + r * k, a.center, a.teacher_temp, k, probs.data() + r * k,
                      a.teacher_entropy ? a.teacher_entropy + r : nullptr);
  column_mean(teacher, 2 * batch, k, a.teacher_mean, threads);
  if (a.probs_mean) column_mean(probs.data(), 2 * batch, k, a.probs_mean, threads);

  const int64_t npairs = 2 * (ncrops - 1);
  const float scale = static_cast<float>(1.0 / (double{a.student_temp} * npairs * batch));
  std::vector<double> row_loss(static_cast<size_t>(ncrops * batch));
  // One scratch row per thread, allocated here so that a failed allocation raises, not aborts.
  std::vector<float> scratch(static_cast<size_t>(threads * k));
#pragma omp parallel num_threads(threads)
  {
    float* row_scratch = scratch.data() + omp_get_thread_num() * k;
    // Sample-major order (unit = b * ncrops + v): a thread's consecutive rows share q0, q1.
#pragma omp for schedule(static)
    for (int64_t unit = 0; unit < ncrops * batch; ++unit) {
      const int64_t b = unit / ncrops, view = unit % ncrops, row = view * batch + b;
      row_loss[unit] = student_row(student + row * k, a.student_temp, probs.data() + b * k,
                                   probs.data() + (batch + b) * k, view != 0 ? 1.0f : 0.0f,
                                   view != 1 ? 1.0f : 0.0f, scale, k, row_scratch,
                                   grad ? grad + row * k : nullptr);
    }
  }
  double total = 0.0;
  for (double value : row_loss) total += value;
  return total / (static_cast<double>(npairs) * batch);
}

}  // namespace

double dino_loss_fwd(const void* student, bool student_bf16, const void* teacher,
                     bool teacher_bf16, const float* center, int64_t batch, int64_t k,
                     int64_t ncrops, float student_temp, float teacher_temp, void* grad,
                     float* teacher_mean, float* teacher_entropy, float* probs_mean,
                     int threads) {
  const LossArgs args{center,       batch,           k,          ncrops, student_temp,
                      teacher_temp, teacher_mean, teacher_entropy, probs_mean, threads};
  auto with_student = [&](auto* s, auto* g) {
    return teacher_bf16 ? dino_loss_typed(s, static_cast<const uint16_t*>(teacher), g, args)
                        : dino_loss_typed(s, static_cast<const float*>(teacher), g, args);
  };
  return student_bf16 ? with_student(static_cast<const uint16_t*>(student),
                                     static_cast<uint16_t*>(grad))
                      : with_student(static_cast<const float*>(student), static_cast<float*>(grad));
}

}  // namespace dino_fast
