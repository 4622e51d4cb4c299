// DINO's per-parameter gradient clipping (official utils.py clip_gradients) over a list of
// float32 gradients in one call: grads[i] *= min(clip / (norms[i] + 1e-6), 1), in place.
// The coefficient is rounded as the reference computes it (clip / x is x.reciprocal() * clip in
// PyTorch; clamp keeps a NaN; no product here is followed by a sum that could become an FMA), so
// the result is bitwise the reference's. The gradients are cut into chunks that the threads
// share, so one large gradient (the head's last layer) does not leave the other threads idle.
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "multiversion.h"

namespace dino_fast {

namespace {

// Memory-bound, yet one core does not saturate memory here with 128-bit SSE: AVX2 gains ~1.4x.
DINO_FAST_CLONES void scale(float* values, int64_t n, float coef) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) values[i] *= coef;
}

float clip_coefficient(float norm, float clip) {
  const float coef = (1.0f / (norm + 1e-6f)) * clip;
  return coef > 1.0f ? 1.0f : coef;  // a NaN stays NaN, as torch.clamp(max=1) keeps it
}

}  // namespace

void clip_gradients_(const std::vector<float*>& grads, const std::vector<int64_t>& numels,
                     const float* norms, float clip, int threads) {
  const int64_t chunk = int64_t{1} << 16;  // below ~64K elements per thread, threads cost more
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (gradient, first element)
  for (int64_t t = 0; t < static_cast<int64_t>(grads.size()); ++t)
    for (int64_t start = 0; start < numels[t]; start += chunk) chunks.emplace_back(t, start);
  const int64_t count = static_cast<int64_t>(chunks.size());
  const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
#pragma omp parallel for num_threads(used) schedule(static)
  for (int64_t c = 0; c < count; ++c) {
    const auto [t, start] = chunks[c];
    scale(grads[t] + start, std::min(numels[t] - start, chunk), clip_coefficient(norms[t], clip));
  }
}

}  // namespace dino_fast
