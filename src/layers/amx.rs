//! An f32 linear on Intel AMX (Sapphire Rapids and later) in "bf16x3": each f32 operand is
//! split into a bfloat16 high part and a bfloat16 remainder, and `a·b ≈ aₕbₕ + aₕbₗ + aₗbₕ` is
//! summed in f32 by the tile unit (every bf16 product is exact in f32; only the `aₗbₗ` term,
//! ≤ 2⁻¹⁸ of the product, and the remainders' rounding are lost). This is what PyTorch calls
//! float32 matmul precision "high" and JAX "bf16_3x": about 2⁻¹⁷ relative per product instead
//! of f32's 2⁻²⁴, so it is opt-in ([`super::sgemm::MatmulPrecision::High`]), never the default.
//!
//! Tiles: four 16 × 16 f32 accumulators (a 32 × 32 block of the output), two 16 × 32 bf16 tiles
//! of the input rows and two 16 × (16 pairs) tiles of the weights in the VNNI layout the
//! instruction reads. The BLIS-style nest of `sgemm` around it: K in blocks (the packed input
//! rows of a block stay in L1/L2), the weights' columns in L2-sized blocks.

#![cfg(target_arch = "x86_64")]

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::sgemm::Epilogue;

/// K per block: 1024 values, 32 tile steps per load and store of the accumulators. The output
/// is read and written once per K block, and at the tile unit's speed that traffic, not the
/// packed operands, is what limits: 256 (the f32 kernel's order) was 10-25% slower on the
/// FLUX and Wan shapes, 2048 and 4096 level or slower.
const KC: usize = 1024;
/// Output columns per packed weight block: KC × NC × 4 bytes = 768 KiB, in L2 (128 and 256
/// within noise of it, 64 and 512 slower).
const NC: usize = 192;
/// One tile: 16 rows × 64 bytes, as u16.
pub(super) const TILE: usize = 512;

/// Whether this CPU has AMX-BF16 and the kernel granted this process the tile state
/// (Linux `arch_prctl(ARCH_REQ_XCOMP_PERM)`); asked once.
pub(crate) fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        // cpuid leaf 7 exists on every x86_64 CPU that has AVX-512 (checked first).
        let cpu = super::simd::Isa::detect() == super::simd::Isa::Avx512
            && is_x86_feature_detected!("avx512bw")
            && __cpuid_count(7, 0).edx & (1 << 22 | 1 << 24) == (1 << 22 | 1 << 24);
        cpu && request_tile_state()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it fails cleanly on kernels without AMX.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The tile configuration (palette 1): every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

thread_local! {
    /// Packed input rows and weights, reused across calls.
    static PACK: RefCell<(Vec<u16>, Vec<u16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `dst = (read ? dst : 0) + x · wᵀ` then `epi` (bias, row function), as
/// [`super::sgemm::linear`], in bf16x3 on the tile unit, split between `threads` tasks.
///
/// # Safety
/// [`available`] returned true; the buffers hold the shapes given (`x` m × k with row stride
/// `lda`, `w` n × k row-major, `dst` m × n with row stride `ld`); `dst` overlaps neither input.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn linear(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
    read: bool,
    x: *const f32,
    lda: usize,
    w: *const f32,
    epi: Epilogue,
    threads: usize,
) {
    let job = Job {
        m,
        n,
        k,
        dst: Ptr(dst),
        ld,
        read,
        x: Ptr(x as *mut f32),
        lda,
        w: Ptr(w as *mut f32),
        epi,
    };
    let parts = threads.max(1);
    if parts == 1 {
        return single(job);
    }
    // Split the larger side: each task packs its share of it and all of the other.
    if m <= n {
        let step = n.div_ceil(parts).div_ceil(32) * 32;
        (0..n.div_ceil(step))
            .into_par_iter()
            .for_each(|i| single(job.columns(i * step, step)));
    } else {
        let step = m.div_ceil(parts).div_ceil(32) * 32;
        (0..m.div_ceil(step))
            .into_par_iter()
            .for_each(|i| single(job.rows(i * step, step)));
    }
}

#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: the tasks of one call read the inputs and write disjoint parts of the output.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

#[derive(Clone, Copy)]
struct Job<'a> {
    m: usize,
    n: usize,
    k: usize,
    dst: Ptr,
    ld: usize,
    read: bool,
    x: Ptr,
    lda: usize,
    w: Ptr,
    epi: Epilogue<'a>,
}

impl Job<'_> {
    /// Output columns `j0..j0 + w` (clipped to `n`).
    unsafe fn columns(self, j0: usize, w: usize) -> Self {
        Job {
            n: w.min(self.n - j0),
            dst: Ptr(self.dst.0.add(j0)),
            w: Ptr(self.w.0.add(j0 * self.k)),
            epi: Epilogue {
                bias: self.epi.bias.map(|b| &b[j0..]),
                ..self.epi
            },
            ..self
        }
    }

    /// Output rows `i0..i0 + h` (clipped to `m`).
    unsafe fn rows(self, i0: usize, h: usize) -> Self {
        Job {
            m: h.min(self.m - i0),
            dst: Ptr(self.dst.0.add(i0 * self.ld)),
            x: Ptr(self.x.0.add(i0 * self.lda)),
            ..self
        }
    }
}

/// A 64-byte aligned slice of `len` u16 inside `buf`, grown as needed.
pub(super) fn aligned(buf: &mut Vec<u16>, len: usize) -> *mut u16 {
    if buf.len() < len + 32 {
        buf.resize(len + 32, 0);
    }
    let p = buf.as_mut_ptr();
    // SAFETY: at most 31 values in, and `len` more fit behind that.
    unsafe { p.add(p.align_offset(64)) }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn single(job: Job) {
    let Job {
        m,
        n,
        k,
        dst,
        ld,
        read,
        x,
        lda,
        w,
        epi,
    } = job;
    let kb = k.div_ceil(k.div_ceil(KC)).div_ceil(32) * 32;
    let groups_m = m.div_ceil(32) * 2;
    configure();
    PACK.with(|pack| {
        let (abuf, bbuf) = &mut *pack.borrow_mut();
        let ap = aligned(abuf, groups_m * (kb / 32) * 2 * TILE);
        let bp = aligned(
            bbuf,
            NC.min(n.div_ceil(32) * 32) / 16 * (kb / 32) * 2 * TILE,
        );
        let mut p0 = 0;
        while p0 < k {
            let kc = kb.min(k - p0);
            let steps = kc.div_ceil(32);
            let (first, last) = (p0 == 0, p0 + kc == k);
            for g in 0..groups_m {
                let a = x.0.wrapping_add(g * 16 * lda + p0);
                let rows = 16.min(m.saturating_sub(g * 16));
                pack_a(a, lda, rows, kc, ap.add(g * steps * 2 * TILE));
            }
            let mut j0 = 0;
            while j0 < n {
                let nc = NC.min(n - j0);
                let groups_n = nc.div_ceil(32) * 2;
                // Per column group: the weights are bf16 values (their remainders all zero).
                let mut exact = [false; NC / 16];
                for (g, e) in exact.iter_mut().enumerate().take(groups_n) {
                    let cols = 16.min(nc.saturating_sub(g * 16));
                    let b = w.0.wrapping_add((j0 + g * 16) * k + p0);
                    *e = pack_b(b, k, cols, kc, bp.add(g * steps * 2 * TILE));
                }
                let c = dst.0.add(j0);
                let mut done = |c: *mut f32, mr: usize, nr: usize, j: usize| {
                    if last {
                        finish(c, ld, mr, nr, epi, j0 + j);
                    }
                };
                let fresh = first && !read;
                blocks(ap, bp, steps, (m, nc), (c, ld), fresh, &exact, &mut done);
                j0 += nc;
            }
            p0 += kc;
        }
    });
    release();
}

/// Loads the tile configuration on this thread: before any other call here.
pub(super) fn configure() {
    // SAFETY: `CONFIG` is a valid palette-1 configuration; [`available`] was checked by the
    // caller (the only way into this module's kernels).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
}

/// Returns the tile state (cheaper context switches once the thread is done with the tiles).
pub(super) fn release() {
    // SAFETY: releasing the tiles is always allowed once configured.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// `c` (m × n, row stride `ld`) (+)= packed A (`m` rows in groups of 16, `steps` K steps of
/// 32, as [`pack_a`] writes) · packed B (`n` columns, as [`pack_b`]), on 32 × 32 blocks:
/// `fresh` starts from zero rather than from `c`; `exact[g]`: column group g's B remainders are
/// zero. `done(block, rows, cols, column)` runs on each finished block.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn blocks(
    ap: *const u16,
    bp: *const u16,
    steps: usize,
    (m, n): (usize, usize),
    (c, ld): (*mut f32, usize),
    fresh: bool,
    exact: &[bool],
    done: &mut dyn FnMut(*mut f32, usize, usize, usize),
) {
    let mut scratch = Scratch([0.0; 32 * 32]);
    for i in 0..m.div_ceil(32) {
        let mr = 32.min(m - i * 32);
        for j in 0..n.div_ceil(32) {
            let nr = 32.min(n - j * 32);
            let c = c.add(i * 32 * ld + j * 32);
            let a = ap.add(2 * i * steps * 2 * TILE);
            let b = bp.add(2 * j * steps * 2 * TILE);
            let full = mr == 32 && nr == 32;
            // Accumulators: from the output (or scratch at the edges) unless fresh.
            let (cp, cld) = if full {
                (c, ld)
            } else {
                (scratch.0.as_mut_ptr(), 32)
            };
            if fresh {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            } else {
                if !full {
                    copy_block(c, ld, cp, cld, mr, nr);
                }
                load_c(cp, cld);
            }
            kernel(steps, a, b, exact[2 * j] && exact[2 * j + 1]);
            store_c(cp, cld);
            if !full {
                copy_block(cp, cld, c, ld, mr, nr);
            }
            done(c, mr, nr, j * 32);
        }
    }
}

#[repr(align(64))]
struct Scratch([f32; 32 * 32]);

/// `mr` × `nr` floats from `src` (row stride `sld`) to `dst` (row stride `dld`).
unsafe fn copy_block(src: *const f32, sld: usize, dst: *mut f32, dld: usize, mr: usize, nr: usize) {
    for r in 0..mr {
        std::ptr::copy_nonoverlapping(src.add(r * sld), dst.add(r * dld), nr);
    }
}

/// The epilogue of a finished `mr` × `nr` block at `c`: bias (from column `j`), row function.
unsafe fn finish(c: *mut f32, ld: usize, mr: usize, nr: usize, epi: Epilogue, j: usize) {
    for r in 0..mr {
        let row = std::slice::from_raw_parts_mut(c.add(r * ld), nr);
        if let Some(b) = epi.bias {
            row.iter_mut().zip(&b[j..j + nr]).for_each(|(o, b)| *o += b);
        }
        if let Some(f) = epi.rows {
            f(row);
        }
    }
}

unsafe fn load_c(c: *const f32, ld: usize) {
    let s = ld * 4;
    let lower = c.add(16 * ld);
    asm!(
        "tileloadd tmm0, [{c} + {s}]",
        "tileloadd tmm1, [{c} + {s} + 64]",
        "tileloadd tmm2, [{l} + {s}]",
        "tileloadd tmm3, [{l} + {s} + 64]",
        c = in(reg) c, l = in(reg) lower, s = in(reg) s,
        options(nostack, readonly),
    );
}

unsafe fn store_c(c: *mut f32, ld: usize) {
    let s = ld * 4;
    let lower = c.add(16 * ld);
    asm!(
        "tilestored [{c} + {s}], tmm0",
        "tilestored [{c} + {s} + 64], tmm1",
        "tilestored [{l} + {s}], tmm2",
        "tilestored [{l} + {s} + 64], tmm3",
        c = in(reg) c, l = in(reg) lower, s = in(reg) s,
        options(nostack),
    );
}

/// `steps` K steps of 32 on the 32 × 32 block in tmm0..3: `a` two row groups, `b` two column
/// groups, each `steps` × (hi tile, lo tile). `b_exact`: the weights' remainders are all zero
/// (bf16 checkpoints computed in f32, FLUX's and Wan's as published), so `aₕ·bₗ` is skipped —
/// two passes, the same sums.
unsafe fn kernel(steps: usize, a: *const u16, b: *const u16, b_exact: bool) {
    let g = steps * 2 * TILE;
    let (a0, a1, b0, b1) = (a, a.add(g), b, b.add(g));
    if b_exact {
        for s in 0..steps {
            let o = s * 2 * TILE;
            asm!(
                // aₕ · b
                "tileloadd tmm4, [{a0} + {st}]",
                "tileloadd tmm5, [{a1} + {st}]",
                "tileloadd tmm6, [{b0} + {st}]",
                "tileloadd tmm7, [{b1} + {st}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                // aₗ · b
                "tileloadd tmm4, [{a0} + {st} + 1024]",
                "tileloadd tmm5, [{a1} + {st} + 1024]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(o), a1 = in(reg) a1.add(o),
                b0 = in(reg) b0.add(o), b1 = in(reg) b1.add(o),
                st = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        return;
    }
    for s in 0..steps {
        let o = s * 2 * TILE;
        asm!(
            // aₕ · bₕ
            "tileloadd tmm4, [{a0} + {st}]",
            "tileloadd tmm5, [{a1} + {st}]",
            "tileloadd tmm6, [{b0} + {st}]",
            "tileloadd tmm7, [{b1} + {st}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // aₕ · bₗ
            "tileloadd tmm6, [{b0} + {st} + 1024]",
            "tileloadd tmm7, [{b1} + {st} + 1024]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // aₗ · bₕ
            "tileloadd tmm4, [{a0} + {st} + 1024]",
            "tileloadd tmm5, [{a1} + {st} + 1024]",
            "tileloadd tmm6, [{b0} + {st}]",
            "tileloadd tmm7, [{b1} + {st}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0.add(o), a1 = in(reg) a1.add(o),
            b0 = in(reg) b0.add(o), b1 = in(reg) b1.add(o),
            st = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
}

/// 16 f32 → (bf16 high parts, bf16 remainders) as the upper halves of 32-bit lanes, both
/// rounded to nearest even.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn split(v: __m512) -> (__m512i, __m512i) {
    #[inline(always)]
    unsafe fn round(v: __m512) -> __m512i {
        let bits = _mm512_castps_si512(v);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let r = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd);
        _mm512_and_si512(r, _mm512_set1_epi32(0xffff_0000u32 as i32))
    }
    let hi = round(v);
    let lo = round(_mm512_sub_ps(v, _mm512_castsi512_ps(hi)));
    (hi, lo)
}

/// Two vectors' upper halves as 32 u16 (`a` first).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn halves(a: __m512i, b: __m512i) -> __m512i {
    let (a, b) = (_mm512_srli_epi32::<16>(a), _mm512_srli_epi32::<16>(b));
    // packus interleaves 128-bit lanes: a0 b0 a1 b1 …; put them back in order.
    let p = _mm512_packus_epi32(a, b);
    _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), p)
}

/// 32 values of a row from `p` (`len` ≤ 32 of them real, the rest zero) as (hi, lo) 32 × u16.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn row32(p: *const f32, len: usize) -> (__m512i, __m512i) {
    let (m0, m1) = (mask(len), mask(len.saturating_sub(16)));
    let (h0, l0) = split(_mm512_maskz_loadu_ps(m0, p));
    let (h1, l1) = split(_mm512_maskz_loadu_ps(m1, p.wrapping_add(16)));
    (halves(h0, h1), halves(l0, l1))
}

fn mask(len: usize) -> __mmask16 {
    if len >= 16 {
        0xffff
    } else {
        ((1u32 << len) - 1) as u16
    }
}

/// `rows` (≤ 16, zero past them) input rows × `kc` values → per K step of 32: a hi tile and a
/// lo tile, 16 rows × 32 bf16 each.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pack_a(a: *const f32, lda: usize, rows: usize, kc: usize, dst: *mut u16) {
    for s in 0..kc.div_ceil(32) {
        let t = dst.add(s * 2 * TILE);
        for r in 0..16 {
            let (hi, lo) = if r < rows {
                row32(a.wrapping_add(r * lda + s * 32), kc - s * 32)
            } else {
                (_mm512_setzero_si512(), _mm512_setzero_si512())
            };
            _mm512_store_si512(t.add(r * 32) as *mut _, hi);
            _mm512_store_si512(t.add(TILE + r * 32) as *mut _, lo);
        }
    }
}

/// `cols` (≤ 16, zero past them) weight rows (`w`, row stride `ldw`) × `kc` values → per K step
/// of 32: hi and lo tiles in the VNNI layout (tile row q: for each column, the pair of K values
/// 2q, 2q + 1) — a 16 × 16 transpose of 32-bit pairs. True when every remainder is zero.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_b(w: *const f32, ldw: usize, cols: usize, kc: usize, dst: *mut u16) -> bool {
    let mut any = _mm512_setzero_si512();
    for s in 0..kc.div_ceil(32) {
        let t = dst.add(s * 2 * TILE);
        let mut hi = [_mm512_setzero_ps(); 16];
        let mut lo = [_mm512_setzero_ps(); 16];
        for c in 0..cols {
            let (h, l) = row32(w.add(c * ldw + s * 32), kc - s * 32);
            hi[c] = _mm512_castsi512_ps(h);
            lo[c] = _mm512_castsi512_ps(l);
            any = _mm512_or_si512(any, l);
        }
        let (hi, lo) = (super::sgemm::transpose16(hi), super::sgemm::transpose16(lo));
        for q in 0..16 {
            _mm512_store_ps(t.add(q * 32) as *mut f32, hi[q]);
            _mm512_store_ps(t.add(TILE + q * 32) as *mut f32, lo[q]);
        }
    }
    _mm512_test_epi32_mask(any, any) == 0
}

/// [`pack_a`] from a column-major source (`rows` ≤ 16 rows, element (r, p) at `a[p·ld + r]`:
/// attention's key-major probabilities): 16 × 16 blocks transposed in registers.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pack_a_cols(a: *const f32, ld: usize, rows: usize, kc: usize, dst: *mut u16) {
    let rm = mask(rows);
    for s in 0..kc.div_ceil(32) {
        let t = dst.add(s * 2 * TILE);
        let mut parts = [[_mm512_setzero_ps(); 16]; 2];
        for (half, part) in parts.iter_mut().enumerate() {
            for (jj, v) in part.iter_mut().enumerate() {
                let p = s * 32 + half * 16 + jj;
                if p < kc {
                    *v = _mm512_maskz_loadu_ps(rm, a.wrapping_add(p * ld));
                }
            }
            *part = super::sgemm::transpose16(*part);
        }
        for (r, (&v0, &v1)) in parts[0].iter().zip(&parts[1]).enumerate() {
            let ((h0, l0), (h1, l1)) = (split(v0), split(v1));
            _mm512_store_si512(t.add(r * 32) as *mut _, halves(h0, h1));
            _mm512_store_si512(t.add(TILE + r * 32) as *mut _, halves(l0, l1));
        }
    }
}

/// [`pack_b`] for a row-major right-hand side (`kc` rows of stride `ldb`, `cols` ≤ 16 columns
/// used): tile row q interleaves rows 2q and 2q + 1 as the VNNI pairs, no transpose needed.
/// True when every remainder is zero.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pack_b_rows(
    b: *const f32,
    ldb: usize,
    cols: usize,
    kc: usize,
    dst: *mut u16,
) -> bool {
    let mut any = _mm512_setzero_si512();
    let cm = mask(cols);
    let row = |p: usize| {
        if p < kc {
            split(_mm512_maskz_loadu_ps(cm, b.wrapping_add(p * ldb)))
        } else {
            (_mm512_setzero_si512(), _mm512_setzero_si512())
        }
    };
    for s in 0..kc.div_ceil(32) {
        let t = dst.add(s * 2 * TILE);
        for q in 0..16 {
            let p = s * 32 + 2 * q;
            let ((h0, l0), (h1, l1)) = (row(p), row(p + 1));
            // Each part sits in the upper half of its lane: row 2q's goes to the lower half.
            let hi = _mm512_or_si512(_mm512_srli_epi32::<16>(h0), h1);
            let lo = _mm512_or_si512(_mm512_srli_epi32::<16>(l0), l1);
            any = _mm512_or_si512(any, lo);
            _mm512_store_si512(t.add(q * 32) as *mut _, hi);
            _mm512_store_si512(t.add(TILE + q * 32) as *mut _, lo);
        }
    }
    _mm512_test_epi32_mask(any, any) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::sgemm::RowFn;

    /// Edge sizes around the tile, block and split sizes, with and without bias, read-back,
    /// activation and threads, against a float64 reference, within bf16x3's error bound:
    /// 2⁻¹⁶ of Σ|x·w| (each product loses at most ~2⁻¹⁷ of itself) plus f32 accumulation.
    #[test]
    fn bf16x3_linear_matches_a_reference() {
        if !available() {
            eprintln!("bf16x3_linear_matches_a_reference: this CPU has no AMX-BF16; not run");
            return;
        }
        let mut rnd = crate::layers::test_rng(7);
        for &(m, n, k) in &[
            (32, 32, 32),
            (33, 47, 31),
            (70, 300, 600),
            (64, 1030, 300),
            (200, 64, 1000),
            (96, 100, 1100), // weights rounded to bf16: the two-pass kernel
        ] {
            let lda = k + 5;
            let x: Vec<f32> = (0..m * lda).map(|_| rnd()).collect();
            let mut w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            if n == 100 {
                w.iter_mut()
                    .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
            }
            let bias: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            let double = |r: &mut [f32]| r.iter_mut().for_each(|v| *v *= 2.0);
            for (read, with_bias, act, threads) in [
                (false, false, false, 1),
                (false, true, true, 2),
                (true, true, false, 1),
                (true, false, true, 2),
            ] {
                let (mut want, mut bound) = (vec![0f64; m * n], vec![0f64; m * n]);
                for i in 0..m {
                    for j in 0..n {
                        let (xs, ws) = (&x[i * lda..i * lda + k], &w[j * k..j * k + k]);
                        let mut v: f64 =
                            xs.iter().zip(ws).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let abs: f64 = xs.iter().zip(ws).map(|(a, b)| (*a * *b).abs() as f64).sum();
                        v += if with_bias { bias[j] as f64 } else { 0.0 };
                        v += if read { c0[i * n + j] as f64 } else { 0.0 };
                        let s = if act { 2.0 } else { 1.0 };
                        want[i * n + j] = s * v;
                        bound[i * n + j] = s * (abs / 65536.0 + 1e-6 * (k as f64).sqrt());
                    }
                }
                let epi = Epilogue {
                    bias: with_bias.then_some(&bias[..]),
                    rows: act.then_some(&double as &RowFn),
                };
                let mut got = if read {
                    c0.clone()
                } else {
                    vec![f32::NAN; m * n]
                };
                // SAFETY: AMX is available; the buffers hold the shapes given.
                unsafe {
                    linear(
                        m,
                        n,
                        k,
                        got.as_mut_ptr(),
                        n,
                        read,
                        x.as_ptr(),
                        lda,
                        w.as_ptr(),
                        epi,
                        threads,
                    )
                };
                for (idx, g) in got.iter().enumerate() {
                    let err = (*g as f64 - want[idx]).abs();
                    assert!(
                        err <= bound[idx],
                        "{m}x{n}x{k} read {read} bias {with_bias} act {act} at {idx}: {g} vs {} (bound {})",
                        want[idx],
                        bound[idx]
                    );
                }
            }
        }
    }
}
