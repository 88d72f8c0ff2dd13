/* What every kernel file shares at run time: which instruction sets this CPU has (asked
 * once, cached) and each thread's share of a parallel region. The AVX2 code is compiled
 * per function (target attributes) and chosen here at run time, so the library still
 * loads on older CPUs. */

#ifdef _OPENMP
#include <omp.h>
#endif

#include "mistol_kernels.h"

#ifdef MISTOL_X86
int cpu_has_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return cached;
}

int cpu_has_vnni(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512vnni");
    }
    return cached;
}

int cpu_has_bf16dp(void) {
    static int cached = -1;
    if (cached < 0)
        cached = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512bf16");
    return cached;
}
#else
int cpu_has_avx2(void) { return 0; }
int cpu_has_vnni(void) { return 0; }
int cpu_has_bf16dp(void) { return 0; }
#endif

int best_impl(void) { return cpu_has_vnni() ? IMPL_VNNI : cpu_has_avx2() ? IMPL_AVX2 : IMPL_SCALAR; }

EXPORT int mistol_best_impl(void) { return best_impl(); }

int64_t thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

void thread_share(int64_t total, int64_t *start, int64_t *end) {
#ifdef _OPENMP
    const int64_t nt = omp_get_num_threads();
#else
    const int64_t nt = 1;
#endif
    const int64_t t = thread_index();
    *start = total * t / nt, *end = total * (t + 1) / nt;
}

