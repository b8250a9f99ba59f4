/* avq's native CPU kernels: the additive decode and the LUT gather-sum, in plain C.
 *
 * Built on first use by kernels/native.py with the host's C compiler (-O3 -march=native) into the user's
 * cache folder and loaded with ctypes. Plain C with no torch or Python headers: it compiles in well under a
 * second and, unlike numba, costs no LLVM in the process (numba: ~55 MiB on import and ~63 MiB more on the
 * first call of a compiled kernel, even one read from numba's disk cache).
 *
 * Decode (avq_decode_u8 / _u16): out[n, j*g + k] = (sum over m of books[m, codes[n, j, m], k]) * scales[n],
 * the codewords summed in codebook order and then scaled, as avq.core.qweight.decode does; built without
 * -ffast-math and with -ffp-contract=off, so the result is bit-identical to it.
 *
 * Gather-sum (avq_gather_sum_u8 / _u16): out[r, n] += sum over b, k of lut[r, (b*JM + k)*C + codes[b, n, k]],
 * codes in the blocked layout [G/J, N, J*M] of kernels/compiled.py's blocked_codes.
 *
 * Fused GEMM (avq_fused_u8 / _u16): a convolution's output from its input and the codes, the weight decoded
 * inside the multiply (see its section).
 *
 * All split their rows (decode), outputs (gather-sum) or output tiles (fused) over `threads` threads
 * (parallel_range), each writing only its own slice. `threads` <= 1 runs on the calling thread.
 */
#include <pthread.h>
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------------------------------ threads */
typedef void (*range_fn)(const void *args, int64_t lo, int64_t hi);

/* fn(args, lo, hi) over [0, n) in `threads` contiguous slices.
 *
 * Built with -fopenmp (native.py does so where torch's OpenMP runtime is a libgomp.so.1, which the loader
 * then shares with this library): on torch's own OpenMP threads. Between parallel regions those threads
 * spin, waiting for torch's next op; threads of our own would compete with them for the cores (2 EPYC
 * cores, a 1.5 ms conv: 1.7 ms on two POSIX threads against 1.4 ms on one, 0.81 ms on torch's two).
 * Otherwise on POSIX threads started per call (~50 us), the calling thread taking the last slice; a thread
 * that cannot be started runs its slice on the calling thread instead. */
#ifdef _OPENMP
static void parallel_range(range_fn fn, const void *args, int64_t n, int threads) {
    if (threads > n) threads = (int)n;
    if (threads <= 1) {
        fn(args, 0, n);
        return;
    }
    const int64_t chunk = (n + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) {
        const int64_t lo = t * chunk, hi = lo + chunk < n ? lo + chunk : n;
        if (lo < hi) fn(args, lo, hi);
    }
}
#else
typedef struct {
    range_fn fn;
    const void *args;
    int64_t lo, hi;
} range_job;

static void *run_range(void *p) {
    const range_job *job = (const range_job *)p;
    job->fn(job->args, job->lo, job->hi);
    return 0;
}

#define MAX_THREADS 256

static void parallel_range(range_fn fn, const void *args, int64_t n, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)n;
    if (threads <= 1) {
        fn(args, 0, n);
        return;
    }
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    range_job jobs[MAX_THREADS];
    int64_t chunk = (n + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        int64_t lo = t * chunk, hi = lo + chunk < n ? lo + chunk : n;
        jobs[t] = (range_job){fn, args, lo, hi < lo ? lo : hi};
        started[t] = t < threads - 1 && pthread_create(&ids[t], 0, run_range, &jobs[t]) == 0;
        if (!started[t] && t < threads - 1) run_range(&jobs[t]);
    }
    run_range(&jobs[threads - 1]);
    for (int t = 0; t < threads - 1; t++)
        if (started[t]) pthread_join(ids[t], 0);
}
#endif

/* ------------------------------------------------------------------------------------------- decode */
#define MAX_BOOKS 16
#define ANY_MAX_G 16 /* the largest group decode_rows_* sums on an accumulator */

typedef struct {
    const void *codes; /* [N, G*M] uint8 or uint16 */
    const float *books; /* [M, C, g] */
    const float *scales; /* [N] */
    float *out; /* [N, G*g] */
    int64_t G;
    int M, C, g;
} decode_args;

/* Rows lo:hi: each group's M codewords summed in codebook order on a small accumulator (for groups over
 * ANY_MAX_G, in the output itself), then scaled: the same additions as avq.core.qweight.decode, so the
 * same bits. Where the switches below name M and g (or g alone) they are compile-time constants and a
 * group becomes a few vector loads, adds, one multiply and one store; with both at run time the loops are
 * ~15x slower (1x4g2: ~8 ns a group against ~0.5, measured on an EPYC core). With the loop vectoriser off
 * (native.py's flags) this form is as fast as one over pointers to the codewords (side by side, 0.96-1.03x
 * at 1x4g2 to 1x16g8). */
#define DEFINE_DECODE_ROWS(CT)                                                                             \
    INLINE void decode_rows_##CT(const CT *restrict codes, const float *restrict books,                    \
                                 const float *restrict scales, float *restrict out, int64_t lo, int64_t hi, \
                                 int64_t G, int64_t C, const int M, const int g) {                         \
        for (int64_t n = lo; n < hi; n++) {                                                                \
            const CT *restrict crow = codes + n * G * M;                                                   \
            const float s = scales[n];                                                                     \
            for (int64_t j = 0; j < G; j++) {                                                              \
                const CT *restrict c = crow + j * M;                                                       \
                const float *restrict w0 = books + (int64_t)c[0] * g;                                      \
                float local[ANY_MAX_G], *o = out + (n * G + j) * g;                                        \
                float *acc = g <= ANY_MAX_G ? local : o;                                                   \
                for (int k = 0; k < g; k++) acc[k] = w0[k];                                                \
                for (int m = 1; m < M; m++) {                                                              \
                    const float *restrict wm = books + ((int64_t)m * C + c[m]) * g;                        \
                    for (int k = 0; k < g; k++) acc[k] += wm[k];                                           \
                }                                                                                          \
                for (int k = 0; k < g; k++) o[k] = acc[k] * s;                                             \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
    static void decode_range_##CT(const void *p, int64_t lo, int64_t hi) {                                 \
        const decode_args *a = (const decode_args *)p;                                                     \
        const CT *codes = (const CT *)a->codes;                                                            \
        switch (a->M * 100 + a->g) { /* the spec families' shapes */                                      \
            DECODE_CASE(CT, 1, 2) DECODE_CASE(CT, 1, 4) DECODE_CASE(CT, 1, 8) DECODE_CASE(CT, 1, 16)       \
            DECODE_CASE(CT, 2, 2) DECODE_CASE(CT, 2, 4) DECODE_CASE(CT, 2, 8) DECODE_CASE(CT, 2, 16)       \
            DECODE_CASE(CT, 4, 4) DECODE_CASE(CT, 4, 8)                                                    \
        }                                                                                                  \
        switch (a->g) { /* other codebook counts: the group size still a constant */                      \
            DECODE_ANY_CASE(CT, 1) DECODE_ANY_CASE(CT, 2) DECODE_ANY_CASE(CT, 4) DECODE_ANY_CASE(CT, 8)    \
            DECODE_ANY_CASE(CT, 16)                                                                        \
        default: decode_rows_##CT(codes, a->books, a->scales, a->out, lo, hi, a->G, a->C, a->M, a->g);     \
        }                                                                                                  \
    }

#define DECODE_CASE(CT, M, g)                                                                              \
    case M * 100 + g:                                                                                      \
        decode_rows_##CT(codes, a->books, a->scales, a->out, lo, hi, a->G, a->C, M, g);                    \
        return;

#define DECODE_ANY_CASE(CT, g)                                                                             \
    case g:                                                                                                \
        decode_rows_##CT(codes, a->books, a->scales, a->out, lo, hi, a->G, a->C, a->M, g);                 \
        return;

DEFINE_DECODE_ROWS(uint8_t)
DEFINE_DECODE_ROWS(uint16_t)

/* Returns 0, or -1 for a shape the kernel does not take (more than MAX_BOOKS codebooks). */
#define DEFINE_DECODE(NAME, CT)                                                                           \
    int NAME(const CT *codes, const float *books, const float *scales, float *out, int64_t N, int64_t G, \
             int M, int C, int g, int threads) {                                                           \
        if (M > MAX_BOOKS || M < 1 || g < 1) return -1;                                                    \
        decode_args a = {codes, books, scales, out, G, M, C, g};                                           \
        parallel_range(decode_range_##CT, &a, N, threads);                                                 \
        return 0;                                                                                          \
    }

DEFINE_DECODE(avq_decode_u8, uint8_t)
DEFINE_DECODE(avq_decode_u16, uint16_t)

/* --------------------------------------------------------------------------------------- gather-sum */
typedef struct {
    const float *lut; /* [R, GB*JM*C] */
    const void *codes; /* [GB, N, JM] */
    float *out; /* [R, N] */
    int64_t R, GB, N;
    int JM, C;
} gather_args;

/* Outputs lo:hi: for each row and block of J groups (its JM*C LUT entries stay in L1), each output's JM
 * lookups summed on four accumulators (the adds' latency, not the loads, bounds one accumulator). */
#define DEFINE_GATHER_ROWS(CT)                                                                              \
    INLINE void gather_outputs_##CT(const float *restrict lut, const CT *restrict codes, float *restrict out, \
                                    int64_t R, int64_t GB, int64_t N, int64_t C, int64_t lo, int64_t hi,    \
                                    const int JM) {                                                         \
        for (int64_t r = 0; r < R; r++) {                                                                   \
            const float *restrict lrow = lut + r * GB * JM * C;                                             \
            float *restrict orow = out + r * N;                                                             \
            for (int64_t b = 0; b < GB; b++) {                                                              \
                const float *restrict base = lrow + b * JM * C;                                             \
                const CT *restrict cb = codes + b * N * JM;                                                 \
                for (int64_t n = lo; n < hi; n++) {                                                         \
                    const CT *restrict c = cb + n * JM;                                                     \
                    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                           \
                    int k = 0;                                                                              \
                    for (; k + 4 <= JM; k += 4) {                                                           \
                        s0 += base[k * C + c[k]];                                                           \
                        s1 += base[(k + 1) * C + c[k + 1]];                                                 \
                        s2 += base[(k + 2) * C + c[k + 2]];                                                 \
                        s3 += base[(k + 3) * C + c[k + 3]];                                                 \
                    }                                                                                       \
                    for (; k < JM; k++) s0 += base[k * C + c[k]];                                           \
                    orow[n] += (s0 + s1) + (s2 + s3);                                                       \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    static void gather_range_##CT(const void *p, int64_t lo, int64_t hi) {                                  \
        const gather_args *a = (const gather_args *)p;                                                      \
        const CT *codes = (const CT *)a->codes;                                                             \
        switch (a->JM * 100000 + a->C) { /* 8-bit codebooks, J*M of 1 or 2 codebooks in blocks of 8 */    \
            GATHER_CASE(CT, 8, 256) GATHER_CASE(CT, 16, 256) GATHER_CASE(CT, 32, 256)                      \
        default: gather_outputs_##CT(a->lut, codes, a->out, a->R, a->GB, a->N, a->C, lo, hi, a->JM);       \
        }                                                                                                   \
    }

#define GATHER_CASE(CT, JM, C)                                                                              \
    case JM * 100000 + C:                                                                                   \
        gather_outputs_##CT(a->lut, codes, a->out, a->R, a->GB, a->N, C, lo, hi, JM);                       \
        return;

DEFINE_GATHER_ROWS(uint8_t)
DEFINE_GATHER_ROWS(uint16_t)

#define DEFINE_GATHER(NAME, CT)                                                                            \
    int NAME(const float *lut, const CT *codes, float *out, int64_t R, int64_t GB, int64_t N, int JM,     \
             int C, int threads) {                                                                          \
        if (JM < 1) return -1;                                                                              \
        gather_args a = {lut, codes, out, R, GB, N, JM, C};                                                 \
        parallel_range(gather_range_##CT, &a, N, threads);                                                  \
        return 0;                                                                                           \
    }

DEFINE_GATHER(avq_gather_sum_u8, uint8_t)
DEFINE_GATHER(avq_gather_sum_u16, uint16_t)

/* ------------------------------------------------------------------------------------- fused GEMM */
/* out[vo[v] + n*ostride + i] = scales[n] * sum over k of W[n, k] * x[vx[v] + koff[k] + i] + bias[n], for
 * i < 8: a convolution (or any GEMM whose rows come in runs of 8 contiguous values) with the weight
 * W[n, j*g + t] = sum over m of books[m, codes[n, j, m], t] decoded inside the multiply, never written.
 *
 * Why: a decoded weight larger than L2 is written at ~12 GB/s and read back by the convolution; next to a
 * small-resolution conv (digits-unet at 4x4 to 16x16) that cost more than the conv itself saved, so W2 ran
 * 1.05-1.15x FP. Here the codebook rows are read from L1 as broadcasts while the input runs stay in
 * registers: FUSED_NB output channels x 2 runs of 8 positions on 12 vector accumulators (16 AVX2 registers);
 * with AVX-512, where every group of 8 runs pairs up into adjacent 16-wide vectors (16x16 and larger maps),
 * FUSED_NB channels x 4 such vectors on 24 of its 32 registers.
 *
 * `koff [K]` and the run offsets `vx`, `vo` [V] are the caller's: a padded NCHW input (koff of k = (c, kh,
 * kw): c*Hp*Wp + kh*dh*Wp + kw*dw; a run: 8 output columns of one output row), F.unfold's [B, K, L], or a
 * 1x1 conv's [B, C, H*W] (koff = k*L). Sums in another order than decode + F.conv2d, with FMAs: equal to
 * it within float rounding, not bit for bit. */
typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));
#define FUSED_NB 6

#if defined(__clang__)
#define FUSED_ATTR
#define FUSED_CONTRACT _Pragma("clang fp contract(fast)")
#else
#define FUSED_ATTR __attribute__((optimize("fp-contract=fast")))
#define FUSED_CONTRACT
#endif

typedef struct {
    const float *x; /* the input, read at vx[v] + koff[k] + i */
    const int64_t *koff, *vx, *vo; /* [K], [V], [V] element offsets */
    const void *codes; /* [N, G, M] uint8 or uint16 */
    const float *books, *scales, *bias; /* [M, C, g], [N], [N] or NULL */
    float *out; /* written at vo[v] + n*ostride + i */
    int64_t N, G, C, V, ostride, nblocks;
    int M, g;
    int64_t groups; /* run groups of the range function in use (pairs, or FUSED_RUNS runs) */
    int bmajor; /* items block-major (see DEFINE_FUSED) */
} fused_args;

/* item -> (first run, first channel) */
#define FUSED_ITEM(a, item, runs, v, n0)                                                                   \
    const int64_t v = ((a)->bmajor ? (item) % (a)->groups : (item) / (a)->nblocks) * (runs);               \
    const int64_t n0 = ((a)->bmajor ? (item) / (a)->groups : (item) % (a)->nblocks) * FUSED_NB;

/* FUSED_NB channels from n0 (nb of them real: the rest repeat the last and are not stored) times VN vectors
 * of type VT from run v, vector u at run v + STEP*u (8-wide: one run each; 16-wide: two adjacent runs). */
#define DEFINE_FUSED_TILE_T(NAME, CT, VT, VN, STEP)                                                        \
    FUSED_ATTR INLINE void NAME(const fused_args *a, int64_t n0, int nb, int64_t v, const int M,           \
                                 const int g) {                                                            \
        FUSED_CONTRACT                                                                                     \
        const CT *restrict crow[FUSED_NB];                                                                 \
        const float *restrict xs[VN];                                                                      \
        VT acc[FUSED_NB][VN];                                                                              \
        for (int o = 0; o < FUSED_NB; o++) {                                                               \
            crow[o] = (const CT *)a->codes + (n0 + (o < nb ? o : nb - 1)) * a->G * M;                      \
            for (int u = 0; u < VN; u++) acc[o][u] = (VT){0};                                              \
        }                                                                                                  \
        for (int u = 0; u < VN; u++) xs[u] = a->x + a->vx[v + STEP * u];                                   \
        const int64_t *restrict koff = a->koff;                                                            \
        for (int64_t j = 0; j < a->G; j++, koff += g) {                                                    \
            const float *restrict w[FUSED_NB][MAX_BOOKS];                                                  \
            for (int o = 0; o < FUSED_NB; o++)                                                             \
                for (int m = 0; m < M; m++)                                                                \
                    w[o][m] = a->books + ((int64_t)m * a->C + crow[o][j * M + m]) * g;                     \
            for (int t = 0; t < g; t++) {                                                                  \
                VT xv[VN];                                                                                 \
                for (int u = 0; u < VN; u++) xv[u] = *(const VT *)(xs[u] + koff[t]);                       \
                for (int o = 0; o < FUSED_NB; o++) {                                                       \
                    float wt = w[o][0][t];                                                                 \
                    for (int m = 1; m < M; m++) wt += w[o][m][t];                                          \
                    for (int u = 0; u < VN; u++) acc[o][u] += xv[u] * wt;                                  \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (int o = 0; o < nb; o++) {                                                                     \
            const float s = a->scales[n0 + o], b = a->bias ? a->bias[n0 + o] : 0.f;                        \
            for (int u = 0; u < VN; u++)                                                                   \
                *(VT *)(a->out + a->vo[v + STEP * u] + (n0 + o) * a->ostride) = acc[o][u] * s + b;         \
        }                                                                                                  \
    }

#define DEFINE_FUSED_TILE(CT, VN) DEFINE_FUSED_TILE_T(fused_tile_##CT##_##VN, CT, v8f, VN, 1)

/* The 16-wide tile needs 32 vector registers (AVX-512): where the compiler targets fewer, its 24
 * accumulators would spill, and the 8-wide tile serves every call. */
#if defined(__AVX512F__)
#define FUSED_WIDE 1
#else
#define FUSED_WIDE 0
#endif
#define FUSED_VZ 4 /* 16-wide vectors per tile */
#define FUSED_RUNS (2 * FUSED_VZ) /* runs per item */
typedef float v16f __attribute__((vector_size(64), aligned(4), may_alias));

/* the 16-wide tile: FUSED_VZ vectors of two adjacent runs each (input and output of run v+2z+1 right after
 * those of v+2z) */
#define DEFINE_FUSED_TILE16(CT) DEFINE_FUSED_TILE_T(fused_tile16_##CT, CT, v16f, FUSED_VZ, 2)

/* whether the FUSED_RUNS runs from v pair up into adjacent 16-wide vectors, in input and output */
INLINE int fused_paired(const fused_args *a, int64_t v) {
    for (int u = 0; u < FUSED_VZ; u++)
        if (a->vx[v + 2 * u + 1] != a->vx[v + 2 * u] + 8 || a->vo[v + 2 * u + 1] != a->vo[v + 2 * u] + 8)
            return 0;
    return 1;
}

#define FUSED_CASE(CT, M, g)                                                                               \
    case M * 100 + g:                                                                                      \
        if (two)                                                                                           \
            fused_tile_##CT##_2(a, n0, nb, v, M, g);                                                       \
        else                                                                                               \
            fused_tile_##CT##_1(a, n0, nb, v, M, g);                                                       \
        continue;

/* Items lo:hi of (pair of runs) x (block of channels), pair-major: consecutive items reuse the runs'
 * input from L1/L2 and read other codes. The tiles take M and g as constants where the switch names them
 * (1x8g4 at 16x16: 1.46x slower with g at run time, 2x8g8 no slower; a single run, e.g. a Linear over 8
 * rows, ~3x slower), at run time elsewhere (each case costs compile time on first use). */
#define DEFINE_FUSED_RANGE(CT, CASES)                                                                      \
    DEFINE_FUSED_TILE(CT, 1)                                                                               \
    DEFINE_FUSED_TILE(CT, 2)                                                                               \
    FUSED_ATTR static void fused_range_##CT(const void *p, int64_t lo, int64_t hi) {                      \
        const fused_args *a = (const fused_args *)p;                                                       \
        for (int64_t item = lo; item < hi; item++) {                                                       \
            FUSED_ITEM(a, item, 2, v, n0)                                                                  \
            const int nb = a->N - n0 < FUSED_NB ? (int)(a->N - n0) : FUSED_NB;                             \
            const int two = v + 1 < a->V; /* the last run of an odd count: alone */                       \
            switch (a->M * 100 + a->g) { CASES(CT) }                                                       \
            if (!two) {                                                                                    \
                fused_tile_##CT##_1(a, n0, nb, v, a->M, a->g);                                             \
                continue;                                                                                  \
            }                                                                                              \
            switch (a->M) {                                                                                \
            case 1: fused_tile_##CT##_2(a, n0, nb, v, 1, a->g); continue;                                 \
            case 2: fused_tile_##CT##_2(a, n0, nb, v, 2, a->g); continue;                                 \
            default: fused_tile_##CT##_2(a, n0, nb, v, a->M, a->g);                                       \
            }                                                                                              \
        }                                                                                                  \
    }

#define FUSED_CASE16(CT, M, g)                                                                             \
    case M * 100 + g:                                                                                      \
        fused_tile16_##CT(a, n0, nb, v, M, g);                                                             \
        continue;

/* Items lo:hi of (group of FUSED_RUNS runs) x (block of channels) where every full group pairs up into
 * 16-wide vectors (fused_paired): 24 accumulators in 32 AVX-512 registers, half the instructions per
 * multiply-add of the 8-wide tile (1.1-1.2x faster on 16x16 and larger maps, one Zen 4 core); the last,
 * partial group through the 8-wide tiles. */
#define DEFINE_FUSED_RANGE16(CT, CASES16)                                                                  \
    DEFINE_FUSED_TILE16(CT)                                                                                \
    FUSED_ATTR static void fused_range16_##CT(const void *p, int64_t lo, int64_t hi) {                    \
        const fused_args *a = (const fused_args *)p;                                                       \
        for (int64_t item = lo; item < hi; item++) {                                                       \
            FUSED_ITEM(a, item, FUSED_RUNS, v, n0)                                                         \
            const int nb = a->N - n0 < FUSED_NB ? (int)(a->N - n0) : FUSED_NB;                             \
            if (v + FUSED_RUNS <= a->V) {                                                                  \
                switch (a->M * 100 + a->g) { CASES16(CT) }                                                 \
                fused_tile16_##CT(a, n0, nb, v, a->M, a->g);                                               \
                continue;                                                                                  \
            }                                                                                              \
            for (int64_t u = v; u < a->V; u += 2)                                                          \
                if (u + 1 < a->V)                                                                          \
                    fused_tile_##CT##_2(a, n0, nb, u, a->M, a->g);                                         \
                else                                                                                       \
                    fused_tile_##CT##_1(a, n0, nb, u, a->M, a->g);                                         \
        }                                                                                                  \
    }

/* 8-bit codebooks (1 KiB per codebook and group entry: in L1) with short groups; 16-bit codes (64x larger
 * codebooks, rare here) only by codebook count */
#define FUSED_U8_CASES(CT) FUSED_CASE(CT, 1, 2) FUSED_CASE(CT, 1, 4) FUSED_CASE(CT, 1, 8) FUSED_CASE(CT, 2, 4)
#define FUSED_U8_CASES16(CT)                                                                              \
    FUSED_CASE16(CT, 1, 2) FUSED_CASE16(CT, 1, 4) FUSED_CASE16(CT, 1, 8) FUSED_CASE16(CT, 2, 4)
#define FUSED_NO_CASES(CT)

DEFINE_FUSED_RANGE(uint8_t, FUSED_U8_CASES)
DEFINE_FUSED_RANGE(uint16_t, FUSED_NO_CASES)
DEFINE_FUSED_RANGE16(uint8_t, FUSED_U8_CASES16)
DEFINE_FUSED_RANGE16(uint16_t, FUSED_NO_CASES)

/* Returns 0, or -1 for a shape the kernel does not take (more than MAX_BOOKS codebooks). */
#define DEFINE_FUSED(NAME, CT)                                                                             \
    int NAME(const float *x, const int64_t *koff, const int64_t *vx, const int64_t *vo, const CT *codes,  \
             const float *books, const float *scales, const float *bias, float *out, int64_t N, int64_t G, \
             int M, int C, int g, int64_t V, int64_t ostride, int threads) {                               \
        if (M > MAX_BOOKS || M < 1 || g < 1 || N < 1) return -1;                                           \
        const int64_t nblocks = (N + FUSED_NB - 1) / FUSED_NB;                                             \
        fused_args a = {x, koff, vx, vo, codes, books, scales, bias, out, N, G, C, V, ostride, nblocks, M, g}; \
        int paired = FUSED_WIDE && V >= 4 * FUSED_RUNS; /* few runs: the 8-wide tile was faster */      \
        for (int64_t v = 0; paired && v + FUSED_RUNS <= V; v += FUSED_RUNS) paired = fused_paired(&a, v);  \
        /* Items run-group-major, so that consecutive ones reuse a group's input from L1/L2; with fewer     \
         * groups than two per thread, block-major instead: contiguous slices of group-major items would   \
         * give one thread the full groups and another a short last one. */                               \
        a.groups = paired ? (V + FUSED_RUNS - 1) / FUSED_RUNS : (V + 1) / 2;                               \
        a.bmajor = a.groups < 2 * threads;                                                                 \
        parallel_range(paired ? fused_range16_##CT : fused_range_##CT, &a, a.groups * nblocks, threads);   \
        return 0;                                                                                          \
    }

DEFINE_FUSED(avq_fused_u8, uint8_t)
DEFINE_FUSED(avq_fused_u16, uint16_t)

/* ------------------------------------------------------------------------------------- transpose */
/* dst[c*ld_dst + r] = src[r*ld_src + c] for r < rows, c < cols, and 0 for rows <= r < pad_rows: a fused
 * Linear's input [rows, K] into the kernel's [K, padded] (the rows past `rows` zero) and its output
 * [N, padded] back into [rows, N]. torch's strided copy took 10-50 us for the 16-128 KiB of a Linear over
 * 8-128 rows, as long as the fused kernel; full 8x8 blocks go through registers (8 vector loads, 24
 * shuffles, 8 vector stores) where the compiler has __builtin_shufflevector (clang, gcc >= 12). */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
INLINE void transpose8x8(const float *src, int64_t ld_src, float *dst, int64_t ld_dst) {
    v8f r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = *(const v8f *)(src + i * ld_src);
    for (int i = 0; i < 8; i += 2) { /* pairs of rows interleaved */
        t[i] = SHUF(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = SHUF(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) /* four rows' columns (c, c+4) side by side */
        for (int j = 0; j < 2; j++) {
            u[i + 2 * j] = SHUF(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[i + 2 * j + 1] = SHUF(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int j = 0; j < 4; j++) { /* columns j and j+4: halves of rows 0-3 and 4-7 */
        *(v8f *)(dst + j * ld_dst) = SHUF(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        *(v8f *)(dst + (j + 4) * ld_dst) = SHUF(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}
#define TRANSPOSE_BLOCKS 1
#else
#define TRANSPOSE_BLOCKS 0
#endif

int avq_transpose_f32(const float *src, int64_t rows, int64_t cols, int64_t ld_src, float *dst,
                      int64_t ld_dst, int64_t pad_rows) {
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
        const int64_t r1 = r0 + 8 < rows ? r0 + 8 : rows;
        for (int64_t c0 = 0; c0 < cols; c0 += 8) {
            const int64_t c1 = c0 + 8 < cols ? c0 + 8 : cols;
#if TRANSPOSE_BLOCKS
            if (r1 - r0 == 8 && c1 - c0 == 8) {
                transpose8x8(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst);
                continue;
            }
#endif
            for (int64_t c = c0; c < c1; c++)
                for (int64_t r = r0; r < r1; r++) dst[c * ld_dst + r] = src[r * ld_src + c];
        }
    }
    for (int64_t c = 0; c < cols; c++) /* the padding rows (none where pad_rows <= rows) */
        for (int64_t r = rows; r < pad_rows; r++) dst[c * ld_dst + r] = 0.f;
    return 0;
}

/* The ABI version kernels/native.py checks after loading (a stale build from another source is rebuilt,
 * but the check also guards against a library loaded from elsewhere). */
int avq_native_abi(void) { return 3; }
