// The teacher EMA (DINO's momentum teacher, official main_dino.py) over one flat float32 buffer:
// teacher = momentum * teacher + (1 - momentum) * student, in place, in one pass over memory.
// The products and the sum are rounded in the reference's order (teacher.mul_(m).add_((1 - m) *
// student)), and contraction into an FMA is turned off, so the result is bitwise the reference's.
#include <algorithm>
#include <cstdint>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace dino_fast {

void ema_(float* teacher, const float* student, int64_t n, float momentum, int threads) {
  const float keep = momentum, take = 1.0f - momentum;
  const int64_t grain = int64_t{1} << 16;  // below ~64K elements per thread, threads cost more
  const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / grain)));
#pragma omp parallel for simd num_threads(used) schedule(static)
  for (int64_t i = 0; i < n; ++i) teacher[i] = teacher[i] * keep + student[i] * take;
}

}  // namespace dino_fast
