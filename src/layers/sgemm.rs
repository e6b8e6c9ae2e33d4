//! The f32 GEMM behind the linears and the larger 1×1 / im2col convs on CPUs with AVX-512: a
//! 14 × 32 register tile (28 accumulators; the right-hand side packed into 32-wide panels with
//! in-register 16 × 16 transposes, the left-hand side into 14-row micro-panels that stay in
//! L1), K in blocks of at most 384 and the right-hand side in L2-sized blocks — the BLIS loop
//! nest — with the output's epilogue (a linear's bias, an activation) applied tile by tile
//! while the tile is in cache. Against the `gemm` crate on the same work (`LOWTIDE_GEMM=crate`,
//! interleaved, Sapphire Rapids, 2 threads): level to 1.1x alone on the shapes bench, 1.0–1.25x
//! on the UNet's linears inside a generate. The `gemm` crate stays the fallback (no AVX-512,
//! tiny or oddly strided problems, the small GEMMs of the Winograd and direct conv kernels,
//! where it measured faster) and the reference in the tests.

use gemm::Parallelism;
use rayon::prelude::*;

/// Rows of the register tile (broadcast from the packed left-hand side).
const MR: usize = 14;
/// Columns of the register tile: two 16-lane vectors of the packed right-hand side.
const NR: usize = 32;
/// Most of K in one pass: an MR × KC micro-panel (21 KiB) stays in L1 (512 measured level
/// within noise on the shapes bench, 256 slower on the UNet's).
const KC: usize = 384;
/// Columns of the right-hand side packed at once: KC × NC floats (768 KiB) stay in L2 (1024
/// was up to 15% slower on the FLUX shapes).
const NC: usize = 512;

/// How f32 matrix products are computed, as PyTorch's `torch.set_float32_matmul_precision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// Plain f32 multiply-adds (the default): results within f32 rounding of the exact sum.
    #[default]
    Highest,
    /// On CPUs with AMX-BF16, the linears of at least [`AMX_MIN_ROWS`] rows in bf16x3 on the
    /// tile unit (`layers/amx.rs`): about 2⁻¹⁷ relative per product instead of 2⁻²⁴, much
    /// faster. Elsewhere the same as `Highest`.
    High,
}

/// 0: not chosen yet (the environment decides), 1: highest, 2: high.
static PRECISION: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Chooses the precision of f32 matrix products for the whole process (the CLI's
/// `--matmul-precision`); unset, `LOWTIDE_MATMUL_PRECISION=high` chooses `High`.
pub fn set_matmul_precision(p: MatmulPrecision) {
    let v = match p {
        MatmulPrecision::Highest => 1,
        MatmulPrecision::High => 2,
    };
    PRECISION.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// The precision in force.
pub fn matmul_precision() -> MatmulPrecision {
    match PRECISION.load(std::sync::atomic::Ordering::Relaxed) {
        1 => MatmulPrecision::Highest,
        2 => MatmulPrecision::High,
        _ => match std::env::var("LOWTIDE_MATMUL_PRECISION").as_deref() {
            Ok("high") => MatmulPrecision::High,
            _ => MatmulPrecision::Highest,
        },
    }
}

/// Fewer rows than this stay on the f32 kernels even under `High`: converting the weights costs
/// about as much as a few rows of product.
pub const AMX_MIN_ROWS: usize = 32;

/// Precision `High` is in force and the CPU has AMX: products may take the bf16x3 kernels.
pub(crate) fn amx_on() -> bool {
    #[cfg(target_arch = "x86_64")]
    return matmul_precision() == MatmulPrecision::High && super::amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AVX-512 is there and `LOWTIDE_GEMM=crate` (the `gemm` crate everywhere, for side-by-side
/// measurements) is not set.
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        super::simd::Isa::detect() == super::simd::Isa::Avx512
            && std::env::var("LOWTIDE_GEMM").map_or(true, |v| v != "crate")
    })
}

/// `dst (+)= a · b`: `dst` m × n row-major (row stride `ld`), `a` m × k and `b` k × n strided
/// matrices given as `(pointer, row stride, column stride)`; the AVX-512 kernel where the CPU
/// has it, else the `gemm` crate.
///
/// # Safety
/// The strides address elements inside their buffers for the shapes given; `dst` overlaps
/// neither input.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
    read_dst: bool,
    (a, a_rs, a_cs): (*const f32, isize, isize),
    (b, b_rs, b_cs): (*const f32, isize, isize),
    par: Parallelism,
) {
    let job = Job {
        m,
        n,
        k,
        c: Out { p: dst, ld },
        read: read_dst,
        a: Mat::new(a, a_rs, a_cs),
        b: Mat::new(b, b_rs, b_cs),
        epi: Epilogue::default(),
    };
    if try_avx512(job, par) {
        return;
    }
    #[rustfmt::skip]
    gemm::gemm(m, n, k, dst, 1, ld as isize, read_dst, a, a_cs, a_rs, b, b_cs, b_rs,
               if read_dst { 1.0f32 } else { 0.0 }, 1.0f32, false, false, false, par);
}

/// An in-place activation over part of an output row.
pub(crate) type RowFn = dyn Fn(&mut [f32]) + Sync;

/// What the GEMM does to its output tile by tile, while the tile is in registers or L1: no
/// separate pass over an output that is often larger than the caches.
#[derive(Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    /// Added to every row (`n` values) — a linear's bias.
    pub bias: Option<&'a [f32]>,
    /// Applied to each finished piece of a row (an activation), in place.
    pub rows: Option<&'a RowFn>,
}

/// `dst = (read_dst ? dst : 0) + lhs · rhs` then `epi`, `dst` row-major m × n (row stride
/// `ld`), `lhs` m × k row-major (row stride `lda`), `rhs` as `w`, n × k row-major: a linear
/// layer's `x · wᵀ + b`.
///
/// # Safety
/// The buffers hold the shapes given; `dst` overlaps neither input; `epi.bias` has `n` values.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn linear(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
    read_dst: bool,
    x: *const f32,
    lda: usize,
    w: *const f32,
    epi: Epilogue,
    par: Parallelism,
) {
    let job = Job {
        m,
        n,
        k,
        c: Out { p: dst, ld },
        read: read_dst,
        // x row-major; w (n × k row-major) read as wᵀ.
        a: Mat::new(x, lda as isize, 1),
        b: Mat::new(w, 1, k as isize),
        epi,
    };
    #[cfg(target_arch = "x86_64")]
    if m >= AMX_MIN_ROWS && n >= 32 && k >= 32 && amx_on() {
        let t = if m * n * k < 1 << 18 { 1 } else { threads(par) };
        return super::amx::linear(m, n, k, dst, ld, read_dst, x, lda, w, epi, t);
    }
    if try_avx512(job, par) {
        return;
    }
    let threads = threads(par);
    if m >= SPLIT_BELOW_ROWS || threads < 2 || n < 32 {
        return linear_crate(m, n, k, Out { p: dst, ld }, read_dst, x, lda, w, epi, par);
    }
    // Few rows: one slice of output features per thread, each a single-threaded GEMM that packs
    // only its own rows of w.
    let part = n.div_ceil(threads).div_ceil(16) * 16;
    let c = Out { p: dst, ld };
    let (x, w) = (Mat::new(x, 0, 1), Mat::new(w, 0, 1));
    (0..n.div_ceil(part)).into_par_iter().for_each(|i| {
        let (j0, nj) = (i * part, part.min(n - i * part));
        let epi = Epilogue {
            bias: epi.bias.map(|b| &b[j0..]),
            ..epi
        };
        let (c, x, w) = (c.at(0, j0), x.at(0, 0), w.at(0, j0 * k));
        linear_crate(m, nj, k, c, read_dst, x.p, lda, w.p, epi, Parallelism::None);
    });
}

/// Below this many rows (tokens) the `gemm` crate fallback splits the output features across
/// threads itself: measured on the UNet's and CLIP's linears (2 threads), the crate's own split is
/// up to 1.3x slower there and up to 1.2x faster at 2048 rows.
const SPLIT_BELOW_ROWS: usize = 1024;

/// [`linear`] through the `gemm` crate, the epilogue as passes over the output.
#[allow(clippy::too_many_arguments)]
unsafe fn linear_crate(
    m: usize,
    n: usize,
    k: usize,
    c: Out,
    read_dst: bool,
    x: *const f32,
    lda: usize,
    w: *const f32,
    epi: Epilogue,
    par: Parallelism,
) {
    // The output may be uninitialised (`dense` hands over spare capacity) unless `read_dst`:
    // written through pointers before any slice of it is made. Row passes in parallel as the
    // GEMM is.
    let rows = |f: &(dyn Fn(*mut f32) + Sync)| match par {
        Parallelism::None => (0..m).for_each(|i| f(c.at(i, 0).p)),
        _ => (0..m).into_par_iter().for_each(|i| f(c.at(i, 0).p)),
    };
    match (epi.bias, read_dst) {
        (Some(b), true) => rows(&|r| {
            let row = std::slice::from_raw_parts_mut(r, n);
            row.iter_mut().zip(b).for_each(|(o, b)| *o += b)
        }),
        (Some(b), false) => rows(&|r| std::ptr::copy_nonoverlapping(b.as_ptr(), r, n)),
        (None, false) => rows(&|r| std::ptr::write_bytes(r, 0, n)),
        (None, true) => {}
    }
    #[rustfmt::skip]
    gemm::gemm(m, n, k, c.p, 1, c.ld as isize, true, x, 1, lda as isize, w, k as isize, 1,
               1.0f32, 1.0f32, false, false, false, par);
    if let Some(f) = epi.rows {
        rows(&|r| f(std::slice::from_raw_parts_mut(r, n)));
    }
}

/// Runs `job` on the AVX-512 kernel where the CPU has it and the shape suits it (at least half
/// a tile of columns); false leaves it to the caller's `gemm`-crate path.
unsafe fn try_avx512(job: Job, par: Parallelism) -> bool {
    #[cfg(target_arch = "x86_64")]
    if job.m > 0 && job.n >= NR / 2 && job.k > 0 && enabled() {
        avx512::run(job, threads(par));
        return true;
    }
    let _ = (job, par);
    false
}

fn threads(par: Parallelism) -> usize {
    match par {
        Parallelism::None => 1,
        Parallelism::Rayon(0) => rayon::current_num_threads(),
        Parallelism::Rayon(t) => t,
    }
}

/// A strided read-only matrix: element (i, j) at `p + i·rs + j·cs`.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Mat {
    p: *const f32,
    rs: isize,
    cs: isize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Mat {
    fn new(p: *const f32, rs: isize, cs: isize) -> Self {
        Mat { p, rs, cs }
    }

    /// The sub-matrix from (i, j).
    unsafe fn at(self, i: usize, j: usize) -> Self {
        Mat {
            p: self.p.offset(i as isize * self.rs + j as isize * self.cs),
            ..self
        }
    }
}

/// Row-major output with row stride `ld`.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Out {
    p: *mut f32,
    ld: usize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Out {
    /// The sub-matrix from (i, j).
    unsafe fn at(self, i: usize, j: usize) -> Self {
        Out {
            p: self.p.add(i * self.ld + j),
            ..self
        }
    }
}

/// One product: `c (+)= a · b` (`m × k` by `k × n`; `read`: add to what `c` holds), then `epi`.
#[derive(Clone, Copy)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Job<'a> {
    m: usize,
    n: usize,
    k: usize,
    c: Out,
    read: bool,
    a: Mat,
    b: Mat,
    epi: Epilogue<'a>,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Job<'_> {
    /// Columns `j0..j0 + w` (clipped to `n`) of the product.
    unsafe fn columns(self, j0: usize, w: usize) -> Self {
        let epi = Epilogue {
            bias: self.epi.bias.map(|b| &b[j0..]),
            ..self.epi
        };
        let (c, b) = (self.c.at(0, j0), self.b.at(0, j0));
        Job {
            n: w.min(self.n - j0),
            c,
            b,
            epi,
            ..self
        }
    }

    /// Rows `i0..i0 + h` (clipped to `m`) of the product.
    unsafe fn rows(self, i0: usize, h: usize) -> Self {
        let (c, a) = (self.c.at(i0, 0), self.a.at(i0, 0));
        Job {
            m: h.min(self.m - i0),
            c,
            a,
            ..self
        }
    }
}

// SAFETY: the tasks of one call read the inputs and write disjoint parts of the output.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::transpose16;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::*;

    thread_local! {
        /// Packing buffers, reused across calls (no page faults per GEMM).
        static PACK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// Splits the output between `threads` tasks: by columns when the left-hand side is the
    /// smaller operand (each task packs all of it and its share of the right), else by rows.
    pub(super) unsafe fn run(job: Job, threads: usize) {
        let Job { m, n, k, .. } = job;
        let parts = if m * n * k < 1 << 18 {
            1
        } else {
            threads.max(1)
        };
        if parts == 1 {
            return single(job);
        }
        if m <= n {
            let step = n.div_ceil(parts).div_ceil(NR) * NR;
            (0..n.div_ceil(step))
                .into_par_iter()
                .for_each(|i| single(job.columns(i * step, step)));
        } else {
            let step = m.div_ceil(parts).div_ceil(MR) * MR;
            (0..m.div_ceil(step))
                .into_par_iter()
                .for_each(|i| single(job.rows(i * step, step)));
        }
    }

    /// A 64-byte aligned slice of `len` floats inside `buf`, grown as needed.
    fn aligned(buf: &mut Vec<f32>, len: usize) -> *mut f32 {
        if buf.len() < len + 16 {
            buf.resize(len + 16, 0.0);
        }
        let p = buf.as_mut_ptr();
        // SAFETY: at most 15 floats in, and `len` more fit behind that.
        unsafe { p.add(p.align_offset(64)) }
    }

    unsafe fn single(job: Job) {
        let Job {
            m,
            n,
            k,
            c,
            read,
            a,
            b,
            epi,
        } = job;
        // Equal K blocks (K = 1280 → 4 × 320, not 384 + 384 + 384 + 128).
        let kb = k.div_ceil(k.div_ceil(KC));
        let panels_m = m.div_ceil(MR);
        PACK.with(|pack| {
            let (abuf, bbuf) = &mut *pack.borrow_mut();
            let ap = aligned(abuf, panels_m * MR * kb);
            let bp = aligned(bbuf, NC.min(n.div_ceil(NR) * NR) * kb);
            let mut p0 = 0;
            while p0 < k {
                let kc = kb.min(k - p0);
                let load = read || p0 > 0;
                let last = p0 + kc == k;
                for i in 0..panels_m {
                    let mr = MR.min(m - i * MR);
                    pack_a(kc, mr, a.at(i * MR, p0), ap.add(i * MR * kc));
                }
                let mut j0 = 0;
                while j0 < n {
                    let nc = NC.min(n - j0);
                    let panels_n = nc.div_ceil(NR);
                    for j in 0..panels_n {
                        let nr = NR.min(nc - j * NR);
                        pack_b(kc, nr, b.at(p0, j0 + j * NR), bp.add(j * NR * kc));
                    }
                    for i in 0..panels_m {
                        let mr = MR.min(m - i * MR);
                        for j in 0..panels_n {
                            let nr = NR.min(nc - j * NR);
                            let cp = c.p.add(i * MR * c.ld + j0 + j * NR);
                            let bias = match epi.bias {
                                Some(b) if p0 == 0 => b.as_ptr().add(j0 + j * NR),
                                _ => std::ptr::null(),
                            };
                            kernel(
                                kc,
                                ap.add(i * MR * kc),
                                bp.add(j * NR * kc),
                                cp,
                                c.ld,
                                mr,
                                nr,
                                load,
                                bias,
                            );
                            if let (Some(f), true) = (epi.rows, last) {
                                for r in 0..mr {
                                    f(std::slice::from_raw_parts_mut(cp.add(r * c.ld), nr));
                                }
                            }
                        }
                    }
                    j0 += nc;
                }
                p0 += kc;
            }
        });
    }

    /// `mr` rows × `kc` columns of `a` into `dst[p·MR + r]`, zero past `mr`.
    unsafe fn pack_a(kc: usize, mr: usize, a: Mat, dst: *mut f32) {
        if mr < MR {
            std::ptr::write_bytes(dst, 0, kc * MR);
        }
        if a.cs == 1 && mr == MR {
            transpose_a(kc, a, dst);
        } else if a.cs == 1 {
            for r in 0..mr {
                let row = a.p.offset(r as isize * a.rs);
                for p in 0..kc {
                    *dst.add(p * MR + r) = *row.add(p);
                }
            }
        } else {
            for p in 0..kc {
                let col = a.p.offset(p as isize * a.cs);
                let d = dst.add(p * MR);
                for r in 0..mr {
                    *d.add(r) = *col.offset(r as isize * a.rs);
                }
            }
        }
    }

    /// `pack_a` for MR row-major rows (a linear's input): 16-column blocks of the rows (two
    /// zero rows added) transposed in registers, 14 lanes of each stored — the scalar loop took
    /// a third of the small linears' time.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose_a(kc: usize, a: Mat, dst: *mut f32) {
        const LANES: __mmask16 = (1 << MR) - 1;
        let mut p = 0;
        while p + 16 <= kc {
            let mut r = [_mm512_setzero_ps(); 16];
            for (i, v) in r.iter_mut().take(MR).enumerate() {
                *v = _mm512_loadu_ps(a.p.offset(i as isize * a.rs).add(p));
            }
            for (q, v) in transpose16(r).iter().enumerate() {
                _mm512_mask_storeu_ps(dst.add((p + q) * MR), LANES, *v);
            }
            p += 16;
        }
        for p in p..kc {
            for i in 0..MR {
                *dst.add(p * MR + i) = *a.p.offset(i as isize * a.rs).add(p);
            }
        }
    }

    /// `kc` rows × `nr` columns of `b` into `dst[p·NR + j]`, zero past `nr`.
    unsafe fn pack_b(kc: usize, nr: usize, b: Mat, dst: *mut f32) {
        if nr < NR {
            std::ptr::write_bytes(dst, 0, kc * NR);
        }
        if b.cs == 1 {
            for p in 0..kc {
                std::ptr::copy_nonoverlapping(b.p.offset(p as isize * b.rs), dst.add(p * NR), nr);
            }
        } else if b.rs == 1 && nr == NR {
            transpose_b(kc, b, dst);
        } else {
            for j in 0..nr {
                let col = b.p.offset(j as isize * b.cs);
                for p in 0..kc {
                    *dst.add(p * NR + j) = *col.offset(p as isize * b.rs);
                }
            }
        }
    }

    /// `pack_b` for a right-hand side stored transposed (a linear's `w`, `n × k` row-major):
    /// 16 × 16 blocks transposed in registers, so the packing runs at memory speed.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose_b(kc: usize, b: Mat, dst: *mut f32) {
        let mut p = 0;
        while p + 16 <= kc {
            for half in 0..2 {
                let mut r = [_mm512_setzero_ps(); 16];
                for (j, v) in r.iter_mut().enumerate() {
                    let col = b.p.offset((half * 16 + j) as isize * b.cs + p as isize);
                    *v = _mm512_loadu_ps(col);
                }
                let t = transpose16(r);
                for (q, v) in t.iter().enumerate() {
                    _mm512_storeu_ps(dst.add((p + q) * NR + half * 16), *v);
                }
            }
            p += 16;
        }
        for p in p..kc {
            for j in 0..NR {
                *dst.add(p * NR + j) = *b.p.offset(j as isize * b.cs + p as isize);
            }
        }
    }

    /// A 16 × 16 transpose of the rows in `r`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        // Interleave pairs, then quads of 32-bit lanes within 128-bit lanes, then 128-bit lanes.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        let mut u = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            let (a0, a1, b0, b1) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
            let (a0, a1) = (_mm512_castps_pd(a0), _mm512_castps_pd(a1));
            let (b0, b1) = (_mm512_castps_pd(b0), _mm512_castps_pd(b1));
            u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, b0));
            u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, b0));
            u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, b1));
            u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, b1));
        }
        // u[4i + q] holds, in 128-bit lane l, row group i's column 4l + q. Gather lanes.
        let mut v = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            let (x0, x1, x2, x3) = (u[q], u[4 + q], u[8 + q], u[12 + q]);
            // lanes (0, 1) of x0 and x1 / of x2 and x3, then (2, 3).
            let lo01 = _mm512_shuffle_f32x4::<0b01_00_01_00>(x0, x1);
            let lo23 = _mm512_shuffle_f32x4::<0b01_00_01_00>(x2, x3);
            let hi01 = _mm512_shuffle_f32x4::<0b11_10_11_10>(x0, x1);
            let hi23 = _mm512_shuffle_f32x4::<0b11_10_11_10>(x2, x3);
            v[q] = _mm512_shuffle_f32x4::<0b10_00_10_00>(lo01, lo23);
            v[4 + q] = _mm512_shuffle_f32x4::<0b11_01_11_01>(lo01, lo23);
            v[8 + q] = _mm512_shuffle_f32x4::<0b10_00_10_00>(hi01, hi23);
            v[12 + q] = _mm512_shuffle_f32x4::<0b11_01_11_01>(hi01, hi23);
        }
        v
    }

    /// The MR × NR tile: `c[r·ld + j] (+)= Σ_p ap[p·MR + r] · bp[p·NR + j]` for the first `mr`
    /// rows and `nr` columns (`load`: add to what `c` holds; `bias`, unless null: add its `nr`
    /// values to every row).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        kc: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        ld: usize,
        mr: usize,
        nr: usize,
        load: bool,
        bias: *const f32,
    ) {
        let mut acc = [_mm512_setzero_ps(); 2 * MR];
        // The output tile is read (or written) only after the K loop; fetching it into L2 now
        // hides its misses behind the loop (3 % on the FLUX block on Zen 4, interleaved runs).
        for r in 0..mr {
            let cr = c.add(r * ld) as *const i8;
            _mm_prefetch::<_MM_HINT_T1>(cr);
            _mm_prefetch::<_MM_HINT_T1>(cr.add(64));
        }
        for p in 0..kc {
            let b0 = _mm512_load_ps(bp.add(p * NR));
            let b1 = _mm512_load_ps(bp.add(p * NR + 16));
            let a = ap.add(p * MR);
            for r in 0..MR {
                let av = _mm512_set1_ps(*a.add(r));
                acc[2 * r] = _mm512_fmadd_ps(av, b0, acc[2 * r]);
                acc[2 * r + 1] = _mm512_fmadd_ps(av, b1, acc[2 * r + 1]);
            }
        }
        let m0: __mmask16 = if nr >= 16 {
            0xffff
        } else {
            (1u32 << nr) as u16 - 1
        };
        let m1: __mmask16 = if nr >= 32 {
            0xffff
        } else if nr > 16 {
            (1u32 << (nr - 16)) as u16 - 1
        } else {
            0
        };
        let (mut b0, mut b1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        if !bias.is_null() {
            b0 = _mm512_maskz_loadu_ps(m0, bias);
            b1 = _mm512_maskz_loadu_ps(m1, bias.add(16));
        }
        for r in 0..mr {
            let cr = c.add(r * ld);
            let mut x0 = _mm512_add_ps(acc[2 * r], b0);
            let mut x1 = _mm512_add_ps(acc[2 * r + 1], b1);
            if load {
                x0 = _mm512_add_ps(x0, _mm512_maskz_loadu_ps(m0, cr));
                x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(m1, cr.add(16)));
            }
            _mm512_mask_storeu_ps(cr, m0, x0);
            _mm512_mask_storeu_ps(cr.add(16), m1, x1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Edge sizes around the tile and block sizes, with and without bias, read-back, activation
    /// and threads, the AVX-512 path and the `gemm` crate fallback, against a float64 reference.
    #[test]
    fn linear_matches_a_reference() {
        let mut rnd = crate::layers::test_rng(1);
        let sizes = [
            (1, 16, 1),
            (13, 17, 5),
            (14, 32, 16),
            (15, 33, 17),
            (29, 65, 513),
            (77, 320, 768),
            (130, 100, 1100),
            (1100, 40, 64),
            (64, 1030, 300),
        ];
        for &(m, n, k) in &sizes {
            let lda = k + 3; // rows of x need not be packed
            let x: Vec<f32> = (0..m * lda).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let bias: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            let double = |r: &mut [f32]| r.iter_mut().for_each(|v| *v *= 2.0);
            for (read, with_bias, act) in [
                (false, false, false),
                (false, true, true),
                (true, true, false),
                (true, false, true),
            ] {
                let want: Vec<f32> = (0..m * n)
                    .map(|idx| {
                        let (i, j) = (idx / n, idx % n);
                        let mut v: f64 = (0..k)
                            .map(|p| x[i * lda + p] as f64 * w[j * k + p] as f64)
                            .sum();
                        v += if with_bias { bias[j] as f64 } else { 0.0 };
                        v += if read { c0[idx] as f64 } else { 0.0 };
                        (if act { 2.0 * v } else { v }) as f32
                    })
                    .collect();
                let epi = Epilogue {
                    bias: with_bias.then_some(&bias[..]),
                    rows: act.then_some(&double as &RowFn),
                };
                for (path, par) in [
                    (0, Parallelism::None),
                    (0, Parallelism::Rayon(2)),
                    (1, Parallelism::None),
                    (1, Parallelism::Rayon(2)),
                ] {
                    let mut got = if read {
                        c0.clone()
                    } else {
                        vec![f32::NAN; m * n]
                    };
                    // SAFETY: the buffers hold m × lda, n × k, m × n floats and n biases.
                    unsafe {
                        let (dst, c) = (
                            got.as_mut_ptr(),
                            Out {
                                p: got.as_mut_ptr(),
                                ld: n,
                            },
                        );
                        match path {
                            0 => {
                                linear(m, n, k, dst, n, read, x.as_ptr(), lda, w.as_ptr(), epi, par)
                            }
                            _ => linear_crate(
                                m,
                                n,
                                k,
                                c,
                                read,
                                x.as_ptr(),
                                lda,
                                w.as_ptr(),
                                epi,
                                par,
                            ),
                        }
                    }
                    let err = got
                        .iter()
                        .zip(&want)
                        .map(|(g, w)| (g - w).abs())
                        .fold(0f32, f32::max);
                    let what =
                        format!("{m}x{n}x{k} read {read} bias {with_bias} act {act} path {path}");
                    assert!(err <= 2e-6 * k as f32 + 1e-6, "{what}: {err}");
                }
            }
        }
    }
}
