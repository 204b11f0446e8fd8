"""A native kernel for the upper triangle of G = D Dᵀ, the one costly step of FedGH.

MKL's GEMM runs a 16 x 16 x L product at about half of a core's peak and cannot skip the lower
triangle; this kernel computes the upper triangle only. It is optional: `fl/fedgh.py` falls back
to batched GEMMs when no C compiler is found or FEDPOSE_NATIVE_GRAM=0.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# The native kernel. MKL's GEMM runs a 16 x 16 x L product at about half of a core's peak and
# cannot skip the lower triangle; this kernel computes the upper triangle only, with 4 x 4
# register tiles over column chunks that stay in the L2 cache, and prefetches the next chunk while
# it works on the current one. Each lane sums at most chunk/16 float32 products; every chunk's
# result is added in float64. It is compiled once per machine (-march=native) with the system C
# compiler into the user cache, loaded with ctypes, and run on column ranges from
# torch.get_num_threads() Python threads (ctypes releases the GIL). Without a compiler, or with
# FEDPOSE_NATIVE_GRAM=0, the batched GEMM does the work.
_C_SOURCE = r"""
typedef float v16 __attribute__((vector_size(64), aligned(4)));
#define LD(p) (*(const v16 *)(p))

static double hsum(v16 v) {
    double s = 0;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

/* G[i*K + j] += <D_i, D_j> over columns [c0, c1), for i <= j; rows of D are ld floats apart. */
void fedpose_gram_upper(const float *D, long K, long ld, long c0, long c1, long chunk,
                        double *G) {
    long nb = K / 4;
    for (long s = c0; s < c1; s += chunk) {
        long e = s + chunk < c1 ? s + chunk : c1;
        long ev = s + (e - s) / 16 * 16;
        long nx = e < c1 ? chunk : 0; /* prefetch distance: the next chunk, if there is one */
        for (long bi = 0; bi < nb; bi++) {
            const float *a0 = D + 4 * bi * ld, *a1 = a0 + ld, *a2 = a1 + ld, *a3 = a2 + ld;
            /* diagonal 4 x 4 block: 10 distinct products; it also prefetches its 4 rows */
            v16 d00 = {0}, d01 = {0}, d02 = {0}, d03 = {0}, d11 = {0}, d12 = {0}, d13 = {0},
                d22 = {0}, d23 = {0}, d33 = {0};
            for (long l = s; l < ev; l += 16) {
                if (nx) {
                    __builtin_prefetch(a0 + l + nx, 0, 3);
                    __builtin_prefetch(a1 + l + nx, 0, 3);
                    __builtin_prefetch(a2 + l + nx, 0, 3);
                    __builtin_prefetch(a3 + l + nx, 0, 3);
                }
                v16 x0 = LD(a0 + l), x1 = LD(a1 + l), x2 = LD(a2 + l), x3 = LD(a3 + l);
                d00 += x0 * x0; d01 += x0 * x1; d02 += x0 * x2; d03 += x0 * x3;
                d11 += x1 * x1; d12 += x1 * x2; d13 += x1 * x3;
                d22 += x2 * x2; d23 += x2 * x3; d33 += x3 * x3;
            }
            v16 dv[4][4] = {{d00, d01, d02, d03}, {d01, d11, d12, d13},
                            {d02, d12, d22, d23}, {d03, d13, d23, d33}};
            for (int r = 0; r < 4; r++)
                for (int q = r; q < 4; q++) {
                    double t = hsum(dv[r][q]);
                    for (long l = ev; l < e; l++) t += (double)a0[r * ld + l] * a0[q * ld + l];
                    G[(4 * bi + r) * K + 4 * bi + q] += t;
                }
            /* off-diagonal 4 x 4 blocks to the right */
            for (long bj = bi + 1; bj < nb; bj++) {
                const float *b0 = D + 4 * bj * ld, *b1 = b0 + ld, *b2 = b1 + ld, *b3 = b2 + ld;
                v16 acc[4][4] = {{{0}}};
                for (long l = s; l < ev; l += 16) {
                    v16 x0 = LD(a0 + l), x1 = LD(a1 + l), x2 = LD(a2 + l), x3 = LD(a3 + l);
                    v16 y0 = LD(b0 + l), y1 = LD(b1 + l), y2 = LD(b2 + l), y3 = LD(b3 + l);
                    acc[0][0] += x0 * y0; acc[0][1] += x0 * y1; acc[0][2] += x0 * y2;
                    acc[0][3] += x0 * y3; acc[1][0] += x1 * y0; acc[1][1] += x1 * y1;
                    acc[1][2] += x1 * y2; acc[1][3] += x1 * y3; acc[2][0] += x2 * y0;
                    acc[2][1] += x2 * y1; acc[2][2] += x2 * y2; acc[2][3] += x2 * y3;
                    acc[3][0] += x3 * y0; acc[3][1] += x3 * y1; acc[3][2] += x3 * y2;
                    acc[3][3] += x3 * y3;
                }
                for (int r = 0; r < 4; r++)
                    for (int q = 0; q < 4; q++) {
                        double t = hsum(acc[r][q]);
                        for (long l = ev; l < e; l++) t += (double)a0[r * ld + l] * b0[q * ld + l];
                        G[(4 * bi + r) * K + 4 * bj + q] += t;
                    }
            }
        }
        /* the last K mod 4 rows, one product at a time */
        for (long i = 4 * nb; i < K; i++)
            for (long j = 0; j <= i; j++) {
                const float *a = D + i * ld, *b = D + j * ld;
                v16 acc = {0};
                for (long l = s; l < ev; l += 16) acc += LD(a + l) * LD(b + l);
                double t = hsum(acc);
                for (long l = ev; l < e; l++) t += (double)a[l] * b[l];
                G[j * K + i] += t;
            }
    }
}
"""
_native_kernel: object = None  # the loaded function; False once it is known to be unavailable
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)


def native_gram_kernel():
    """The compiled C kernel (a ctypes function), or None when it cannot be built or loaded."""
    global _native_kernel
    if _native_kernel is None:
        _native_kernel = _build_native() or False
    return _native_kernel or None


def _cpu_signature() -> str:
    # the cache is per instruction set: a -march=native build must not run on another CPU
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _build_native():
    if os.environ.get("FEDPOSE_NATIVE_GRAM", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    key = hashlib.sha256("\0".join([_C_SOURCE, cc, *flags, _cpu_signature()]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedpose"
    lib_path = cache / f"gram-{key.hexdigest()[:16]}.so"
    try:
        if not lib_path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src, out = Path(tmp) / "gram.c", Path(tmp) / "gram.so"
                src.write_text(_C_SOURCE)
                subprocess.run([cc, *flags, str(src), "-o", str(out)], check=True,
                               capture_output=True, timeout=120)
                os.replace(out, lib_path)  # atomic: concurrent builders cannot see half a file
        fn = ctypes.CDLL(str(lib_path)).fedpose_gram_upper
    except (OSError, subprocess.SubprocessError):
        return None
    c_long = ctypes.c_long
    fn.argtypes = [ctypes.c_void_p, c_long, c_long, c_long, c_long, c_long, ctypes.c_void_p]
    fn.restype = None
    return fn


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
        if _pool is not None and _pool[0] == os.getpid():
            _pool[2].shutdown(wait=False)
        # a forked child gets a fresh pool: the parent's worker threads do not exist there
        _pool = (os.getpid(), workers, ThreadPoolExecutor(workers, "fedpose-gram"))
    return _pool[2]


def native_gram(kernel, deltas: torch.Tensor) -> torch.Tensor:
    k, p = deltas.shape
    # column chunks of about 1 MiB (K x chunk floats) stay in the per-core L2 cache
    chunk = min(max((1 << 18) // max(k, 1) // 16 * 16, 2048), 1 << 16)
    workers = max(1, min(torch.get_num_threads(), p // (4 * chunk)))
    # a few column ranges per worker, taken in turn: a core slowed down by other work on the
    # machine takes fewer of them instead of holding everyone up at the end
    n_jobs = 1 if workers == 1 else min(8 * workers, max(p // (8 * chunk), workers))
    bounds = [p * t // n_jobs // 16 * 16 for t in range(n_jobs)] + [p]
    parts = torch.zeros(n_jobs, k, k, dtype=torch.float64)
    jobs = [(deltas.data_ptr(), k, deltas.stride(0), bounds[t], bounds[t + 1], chunk,
             parts[t].data_ptr()) for t in range(n_jobs)]
    if workers == 1:
        kernel(*jobs[0])
    else:
        list(_executor(workers).map(lambda job: kernel(*job), jobs))
    upper = parts.sum(0).triu()
    return upper + upper.triu(1).T
