//! Linears of few rows (a prompt's tokens in a text encoder, a modulation or timestep vector)
//! on AVX-512: each weight row is read once, where it lies, and dotted with every input row
//! while it is in cache, with no packing of the weights (which took a fifth of a Wan prompt's
//! encoding in `sgemm`). The weights may be f32 or bf16: bf16 is widened in registers, and the
//! sums are the same either way, so a bf16-held weight (`--storage-dtype bf16`, UMT5 as
//! published) gives bit for bit what upcasting it first would — without the upcast copy
//! (single-threaded in candle, and fresh pages every call: half of the encoding's time).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::sgemm::Epilogue;
use super::simd::Isa;

/// Rows up to this take the kernel with f32 weights: against `sgemm` on
/// `tools/bench/shapes.txt`'s few-row linears it is 2.3x / 1.75x / 1.45x / 1.1x faster at 1 / 8
/// / 16 / 32 rows on Sapphire Rapids, 3.7x / 2.1x / 1.9x / 1.5x on Zen 4 (1.3x at 48 there).
pub const MAX_ROWS: usize = 32;
/// With bf16 weights: the other path first widens the whole weight to f32 (a copy as large as
/// the product's own time at these sizes), so the kernel stays ahead further.
pub const MAX_ROWS_BF16: usize = 64;

/// Input rows per pass over a group of weight rows: 6 × 4 accumulators, 4 weight vectors and
/// one input vector fill the 32 registers.
const R: usize = 6;
/// Weight rows (output features) per group.
const C: usize = 4;

/// Whether an `m`-row linear (weights `bf16` or f32) runs here: few rows, AVX-512, the `gemm`
/// crate not forced, and not a product the AMX kernels take.
pub fn takes(m: usize, bf16: bool) -> bool {
    static VL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let vl = *VL.get_or_init(|| {
        is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
    });
    // From AMX_MIN_ROWS the bf16x3 kernels, where in force, are faster still.
    let amx = m >= super::sgemm::AMX_MIN_ROWS && super::sgemm::amx_on();
    let max = if bf16 { MAX_ROWS_BF16 } else { MAX_ROWS };
    (1..=max).contains(&m) && !amx && vl && super::sgemm::enabled()
}

/// The weights, `n × k` row-major.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

/// `dst = (read ? dst : 0) + x · wᵀ` then `epi`; `x` is m × k row-major (row stride `lda`),
/// `dst` m × n (row stride `ld`); output features split between `threads` tasks.
///
/// # Safety
/// [`takes`] returned true for `m`; the buffers hold the shapes given; `dst` overlaps neither
/// input.
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
    w: Weights,
    epi: Epilogue,
    threads: usize,
) {
    debug_assert!(Isa::detect() == Isa::Avx512);
    let (dst, x) = (P(dst), P(x as *mut f32));
    // About 4 tasks per thread (rows of n differ in cost only at the edges), whole groups each.
    let step = n.div_ceil(threads.max(1) * 4).next_multiple_of(C).max(C);
    let task = |j0: usize| {
        let nj = step.min(n - j0);
        // SAFETY: columns j0..j0 + nj of dst are this task's alone.
        unsafe {
            match w {
                Weights::F32(w) => {
                    columns(m, nj, k, dst.at(j0), ld, read, x.at(0), lda, &w[j0 * k..])
                }
                Weights::Bf16(w) => {
                    columns(m, nj, k, dst.at(j0), ld, read, x.at(0), lda, &w[j0 * k..])
                }
            }
            for i in 0..m {
                let row = std::slice::from_raw_parts_mut(dst.at(i * ld + j0), nj);
                if let Some(b) = epi.bias {
                    row.iter_mut()
                        .zip(&b[j0..j0 + nj])
                        .for_each(|(o, b)| *o += b);
                }
                if let Some(f) = epi.rows {
                    f(row);
                }
            }
        }
    };
    if threads <= 1 || n <= step {
        (0..n).step_by(step).for_each(task);
    } else {
        (0..n.div_ceil(step))
            .into_par_iter()
            .for_each(|t| task(t * step));
    }
}

#[derive(Clone, Copy)]
struct P(*mut f32);
// SAFETY: the tasks of one call read the inputs and write disjoint columns of the output.
unsafe impl Send for P {}
unsafe impl Sync for P {}

impl P {
    /// Through a method, so closures capture the whole `P` (Send) and not its field.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// How a weight row's 16 values at `p` become an f32 vector (`mask`: the ones inside k).
trait Load: Copy {
    unsafe fn load(p: *const Self, mask: __mmask16) -> __m512;
}

impl Load for f32 {
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(p: *const f32, mask: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }
}

impl Load for half::bf16 {
    /// bf16 is the upper half of an f32: widening is exact.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load(p: *const half::bf16, mask: __mmask16) -> __m512 {
        let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// All rows × `nj` columns: groups of C weight rows, each against the input rows R at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn columns<T: Load>(
    m: usize,
    nj: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
    read: bool,
    x: *const f32,
    lda: usize,
    w: &[T],
) {
    for j in (0..nj).step_by(C) {
        let cols = C.min(nj - j);
        // Past the last column, repeat it (computed, not stored): no reads outside `w`.
        let rows: [*const T; C] =
            std::array::from_fn(|c| w.as_ptr().add((j + c.min(cols - 1)) * k));
        let mut i = 0;
        while i < m {
            let r = R.min(m - i);
            let x = x.add(i * lda);
            let mut sums = [[0f32; C]; R];
            match r {
                1 => dots::<T, 1>(k, x, lda, rows, &mut sums),
                2 => dots::<T, 2>(k, x, lda, rows, &mut sums),
                3 => dots::<T, 3>(k, x, lda, rows, &mut sums),
                4 => dots::<T, 4>(k, x, lda, rows, &mut sums),
                5 => dots::<T, 5>(k, x, lda, rows, &mut sums),
                _ => dots::<T, 6>(k, x, lda, rows, &mut sums),
            }
            for (ii, s) in sums.iter().enumerate().take(r) {
                let o = dst.add((i + ii) * ld + j);
                for (c, &v) in s.iter().enumerate().take(cols) {
                    *o.add(c) = if read { *o.add(c) + v } else { v };
                }
            }
            i += r;
        }
    }
}

/// `sums[r][c] = Σ_p x[r·lda + p] · rows[c][p]` for `RR` input rows, 16 lanes of partial sums
/// each, added up in a fixed order (the same whatever the row count or the weights' dtype).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn dots<T: Load, const RR: usize>(
    k: usize,
    x: *const f32,
    lda: usize,
    rows: [*const T; C],
    sums: &mut [[f32; C]; R],
) {
    let mut acc = [[_mm512_setzero_ps(); C]; RR];
    let mut p = 0;
    while p < k {
        let mask = if k - p >= 16 {
            0xffff
        } else {
            ((1u32 << (k - p)) - 1) as u16
        };
        let wv: [__m512; C] = std::array::from_fn(|c| T::load(rows[c].add(p), mask));
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = _mm512_maskz_loadu_ps(mask, x.add(r * lda + p));
            for c in 0..C {
                a[c] = _mm512_fmadd_ps(xv, wv[c], a[c]);
            }
        }
        p += 16;
    }
    for (r, a) in acc.iter().enumerate() {
        for c in 0..C {
            sums[r][c] = _mm512_reduce_add_ps(a[c]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::sgemm::RowFn;

    /// Row counts 1 to MAX_ROWS_BF16, column counts off the group size, K off the vector width, with
    /// bias, read-back and activation, f32 weights against a float64 reference, and bf16
    /// weights bit for bit equal to the f32 run on their widened values.
    #[test]
    fn few_row_linear_matches_a_reference_and_bf16_is_its_widening() {
        if !takes(1, false) {
            eprintln!("few_row_linear_matches_a_reference: no AVX-512 here; not run");
            return;
        }
        let mut rnd = crate::layers::test_rng(3);
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 37, 100),
            (5, 9, 31),
            (7, 64, 300),
            (16, 130, 1000),
            (MAX_ROWS_BF16, 21, 70),
        ] {
            let lda = k + 2;
            let x: Vec<f32> = (0..m * lda).map(|_| rnd()).collect();
            let wb: Vec<half::bf16> = (0..n * k).map(|_| half::bf16::from_f32(rnd())).collect();
            let w: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let bias: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            let double = |r: &mut [f32]| r.iter_mut().for_each(|v| *v *= 2.0);
            for (read, act, threads) in [(false, false, 1), (true, true, 2)] {
                let epi = Epilogue {
                    bias: Some(&bias),
                    rows: act.then_some(&double as &RowFn),
                };
                let run = |ws: Weights| {
                    let mut got = if read {
                        c0.clone()
                    } else {
                        vec![f32::NAN; m * n]
                    };
                    // SAFETY: AVX-512 is there (takes); the buffers hold the shapes given.
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
                            ws,
                            epi,
                            threads,
                        )
                    };
                    got
                };
                let (f, b) = (run(Weights::F32(&w)), run(Weights::Bf16(&wb)));
                assert!(
                    f.iter().zip(&b).all(|(f, b)| f.to_bits() == b.to_bits()),
                    "{m}x{n}x{k}"
                );
                for (idx, g) in f.iter().enumerate() {
                    let (i, j) = (idx / n, idx % n);
                    let mut v: f64 = (0..k)
                        .map(|p| x[i * lda + p] as f64 * w[j * k + p] as f64)
                        .sum();
                    v += bias[j] as f64 + if read { c0[idx] as f64 } else { 0.0 };
                    let v = if act { 2.0 * v } else { v };
                    let err = (*g as f64 - v).abs();
                    assert!(
                        err <= 2e-6 * k as f64 + 1e-6,
                        "{m}x{n}x{k} at {idx}: {g} vs {v}"
                    );
                }
            }
        }
    }
}
