/* What every kernel file shares at run time: which instruction sets this CPU has (asked
 * once, cached) and each thread's share of a parallel region. The AVX2 and ARM dot-product
 * code is compiled per function (target attributes) and chosen here at run time, so the
 * library still loads on older CPUs. */

#ifdef _OPENMP
#include <omp.h>
#endif

#include <stdlib.h>

#include "mistol_kernels.h"

#ifdef MISTOL_X86
#include <cpuid.h>

/* CPUID itself: clang before 16 has no "f16c" for __builtin_cpu_supports */
static int cpu_has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
}

int cpu_has_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    }
    return cached;
}

int cpu_has_vnni(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512dq");
    }
    return cached;
}

/* Whether the one-row int8/int4 and dense kernels ask for their weights ahead (into L2):
 * on Intel CPUs, where the hardware prefetcher alone left them 10-30% short (a 2-core AMX
 * Xeon); not on AMD's, where asking ahead (then into L1) measured 10-18% slower on a 2-core
 * EPYC. MISTOL_PREFETCH=0 or 1 decides instead, to measure both on one machine. */
int stream_prefetch(void) {
    static int cached = -1;
    if (cached < 0) {
        const char *forced = getenv("MISTOL_PREFETCH");
        unsigned a, b, c, d; /* the vendor: "GenuineIntel" in ebx, edx, ecx */
        if (forced && (forced[0] == '0' || forced[0] == '1') && !forced[1]) cached = forced[0] == '1';
        else cached = __get_cpuid(0, &a, &b, &c, &d) && b == 0x756e6547 && d == 0x49656e69 && c == 0x6c65746e;
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

#ifdef MISTOL_AMX
#include <sys/syscall.h>
#include <unistd.h>

/* AMX-TILE and AMX-INT8 (CPUID 7: edx bits 24, 25), the tile state enabled by the OS (XCR0
 * bits 17, 18), and Linux's leave for this process to use it (arch_prctl
 * ARCH_REQ_XCOMP_PERM for XTILEDATA; a kernel before 5.16 or a VM that hides the state says
 * no). MISTOL_AMX=0 leaves the tiles unused, to measure or test the paths beside them. */
int cpu_has_amx(void) {
    static int cached = -1;
    if (cached < 0) {
        unsigned a, b, c, d, xcr0_lo, xcr0_hi;
        const char *forced = getenv("MISTOL_AMX");
        cached = 0;
        if (cpu_has_vnni() && !(forced && forced[0] == '0' && !forced[1]) && __get_cpuid_count(7, 0, &a, &b, &c, &d) &&
            (d >> 24 & 3) == 3 && __get_cpuid(1, &a, &b, &c, &d) && (c & bit_OSXSAVE)) {
            __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
            cached = (xcr0_lo >> 17 & 3) == 3 && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
        }
    }
    return cached;
}
#else
int cpu_has_amx(void) { return 0; }
#endif
#else
int cpu_has_avx2(void) { return 0; }
int cpu_has_vnni(void) { return 0; }
int cpu_has_bf16dp(void) { return 0; }
int cpu_has_amx(void) { return 0; }
int stream_prefetch(void) { return 0; }
#endif

#ifdef MISTOL_ARM
#ifdef MISTOL_DOTPROD
/* Linux reports the dot products in the auxiliary vector, macOS in sysctl (every Apple M
 * chip has them); elsewhere only a build that targets them assumes them. */
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
static int ask_dotprod(void) { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }
#elif defined(__APPLE__)
#include <sys/sysctl.h>
static int ask_dotprod(void) {
    int v = 0; /* the older name first, then the one macOS 12 added */
    size_t n = sizeof(v);
    if (sysctlbyname("hw.optional.armv8_2_dotprod", &v, &n, NULL, 0) == 0 && v) return 1;
    v = 0, n = sizeof(v);
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &n, NULL, 0) == 0 && v;
}
#else
static int ask_dotprod(void) {
#ifdef __ARM_FEATURE_DOTPROD
    return 1;
#else
    return 0;
#endif
}
#endif

int cpu_has_dotprod(void) {
    static int cached = -1;
    if (cached < 0) cached = ask_dotprod();
    return cached;
}
#else
int cpu_has_dotprod(void) { return 0; } /* this build has no dot-product kernels */
#endif

int best_impl(void) { return cpu_has_dotprod() ? IMPL_DOTPROD : IMPL_NEON; }
#else
int cpu_has_dotprod(void) { return 0; }

int best_impl(void) { return cpu_has_vnni() ? IMPL_VNNI : cpu_has_avx2() ? IMPL_AVX2 : IMPL_SCALAR; }
#endif

EXPORT int mistol_best_impl(void) { return best_impl(); }

/* Whether the int8 prefill route (mistol_gemm_requantized) multiplies in AMX tiles. */
EXPORT int mistol_int8_tiles(void) { return cpu_has_amx(); }

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

