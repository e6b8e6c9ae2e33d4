//! Run-time dispatch of the CPU kernels' vectorised loops and the branch-free math they share.
//! A kernel is written once, generic over `const FMA: bool` and `#[inline(always)]`;
//! `isa_kernel!` compiles it for AVX-512, AVX2+FMA and the baseline and
//! picks one with [`Isa::detect`], so LLVM vectorises the same source for each.

/// The vector instructions a kernel is compiled for, chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Baseline,
}

impl Isa {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// Every variant this CPU can run (tests compare them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut all = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                all.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f") {
                    all.push(Isa::Avx512);
                }
            }
        }
        all
    }
}

/// `$vis fn $name(isa: Isa, args…)` running `$generic::<FMA>(args…)` compiled for `isa`'s
/// instructions (`$generic` is a `#[inline(always)]` function generic over `const FMA: bool`).
macro_rules! isa_kernel {
    ($vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) => $generic:ident) => {
        $vis fn $name(isa: $crate::layers::simd::Isa, $($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512($($a: $t),*) {
                $generic::<true>($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($a: $t),*) {
                $generic::<true>($($a),*)
            }
            match isa {
                // SAFETY: Isa::detect() / available() return a variant only where the CPU has
                // its features.
                #[cfg(target_arch = "x86_64")]
                $crate::layers::simd::Isa::Avx512 => unsafe { avx512($($a),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::layers::simd::Isa::Avx2 => unsafe { avx2($($a),*) },
                $crate::layers::simd::Isa::Baseline => $generic::<false>($($a),*),
            }
        }
    };
}
pub(crate) use isa_kernel;

/// `a·b + c`, fused where `FMA`.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` for x ≤ 88 to a few ulp (relative error < 3e-7, tested; Cephes' `expf`: x = n·ln2 + r,
/// a degree-5 polynomial for e^r, 2^n from the exponent bits), branch-free so loops over it
/// vectorise. Below -80 it
/// returns 0: such terms are < 2e-35 of the softmax's largest (which is 1), and clamping keeps
/// the arithmetic away from denormals, which are slow. NaN stays NaN.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23 + 127: adding it rounds x·log2(e) to an integer n held in the low mantissa
    // bits as n + 127, the biased exponent of 2^n.
    const SHIFT: f32 = 12_583_039.0;
    let xc = x.clamp(-80.0, 88.0);
    let f = madd::<FMA>;
    let t = f(xc, LOG2E, SHIFT);
    let n = t - SHIFT;
    let r = f(n, -LN2_LO, f(n, -LN2_HI, xc));
    let mut p = 1.987_569_2e-4;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = f(p, r, c);
    }
    let e = f(p, r * r, r + 1.0);
    let y = e * f32::from_bits(t.to_bits() << 23);
    if x < -80.0 {
        0.0
    } else {
        y
    }
}

isa_kernel!(pub(crate) fn affine_silu(row: &mut [f32], a: f32, b: f32, silu: bool) => affine_silu_generic);
isa_kernel!(pub(crate) fn affine_silu_from(dst: &mut [f32], src: &[f32], a: f32, b: f32, silu: bool) => affine_silu_from_generic);

/// `row = silu(row·a + b)` in place (SiLU only when `silu`): a GroupNorm's coefficients and
/// activation as the convs' prologue applies them, over the branch-free `e^x` (libm's scalar
/// `expf` took 2–3% of a UNet step).
#[inline(always)]
fn affine_silu_generic<const FMA: bool>(row: &mut [f32], a: f32, b: f32, silu: bool) {
    for v in row.iter_mut() {
        let y = *v * a + b;
        *v = if silu { y / (1.0 + exp::<FMA>(-y)) } else { y };
    }
}

/// [`affine_silu`] from `src` into `dst`.
#[inline(always)]
fn affine_silu_from_generic<const FMA: bool>(
    dst: &mut [f32],
    src: &[f32],
    a: f32,
    b: f32,
    silu: bool,
) {
    for (o, &v) in dst.iter_mut().zip(src) {
        let y = v * a + b;
        *o = if silu { y / (1.0 + exp::<FMA>(-y)) } else { y };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prologue's affine + SiLU on every ISA against the scalar formula over libm's `expf`,
    /// including saturated inputs.
    #[test]
    fn affine_silu_matches_scalar() {
        let src: Vec<f32> = (0..1001).map(|i| -120.0 + 0.24 * i as f32).collect();
        for isa in Isa::available() {
            for silu in [false, true] {
                let (mut a, mut b) = (src.clone(), vec![0f32; src.len()]);
                affine_silu(isa, &mut a, 0.7, 0.3, silu);
                affine_silu_from(isa, &mut b, &src, 0.7, 0.3, silu);
                for ((&x, &ga), &gb) in src.iter().zip(&a).zip(&b) {
                    let y = x * 0.7 + 0.3;
                    let want = if silu { y / (1.0 + (-y).exp()) } else { y };
                    let tol = 1e-6 * want.abs().max(1e-30);
                    assert!(
                        (ga - want).abs() <= tol && ga == gb,
                        "{isa:?} {x}: {ga} {gb} vs {want}"
                    );
                }
            }
        }
    }

    /// The polynomial exp (plain and fused multiply-add) against the standard library, and its
    /// edge values.
    #[test]
    fn exp_is_accurate() {
        fn check<const FMA: bool>() {
            let mut worst = 0f32;
            for i in 0..=200_000 {
                let x = -80.0 + 88.0 * i as f32 / 200_000.0;
                let (got, want) = (exp::<FMA>(x), x.exp());
                worst = worst.max((got - want).abs() / want);
            }
            assert!(worst < 3e-7, "relative error {worst} (fma {FMA})");
            assert_eq!(exp::<FMA>(f32::NEG_INFINITY), 0.0);
            assert_eq!(exp::<FMA>(-100.0), 0.0);
            assert_eq!(exp::<FMA>(0.0), 1.0);
            assert!(exp::<FMA>(f32::NAN).is_nan());
        }
        check::<false>();
        check::<true>();
    }
}
