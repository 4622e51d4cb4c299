// Multiversioning for the C++ kernels' hot loops: DINO_FAST_CLONES compiles a function twice, for
// AVX2 and for baseline x86-64, and picks one at load time (a glibc ifunc), so the distributed
// build stays portable (no -march=native). Elsewhere it compiles the one baseline version.
#pragma once

#if defined(__x86_64__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
#define DINO_FAST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DINO_FAST_CLONES
#endif
