//! Products of a few rows of activations with a large f32 weight, on the CPU: what a decode step
//! does for every layer. Such a product reads each weight once and does two flops per weight, so
//! memory bandwidth bounds it; these loops stream the weight in its stored order, every core taking
//! a contiguous share of the outputs, with AVX-512 (or AVX2) FMAs chosen at run time. burn-flex's
//! general matrix product runs these shapes at about half the machine's bandwidth.
//!
//! Two layouts: [`rows_times_matrix`] for a `[d_input, d_output]` weight (a [`Linear`]
//! layer's), [`rows_times_transposed`] for a `[d_output, d_input]` one (a tied output projection:
//! the embedding table). Accumulation is in f32 in input order, one FMA per weight.
//!
//! [`Linear`]: super::Linear

use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

/// Rows of activations up to which [`linear`] and [`times_transposed`] take these loops (decode
/// steps of small batches); more rows go to the backend's matrix product, which keeps them in
/// registers.
pub const MAX_ROWS: usize = 4;

/// `x w + bias` with `w` stored `[d_input, d_output]`, through [`rows_times_matrix`], where the
/// tensors are f32 on the CPU (burn-flex) and `x` has at most [`MAX_ROWS`] rows; `None` otherwise.
///
/// # Shapes
/// - x: `[..., d_input]`, w: `[d_input, d_output]`, bias: `[d_output]`
/// - output: `[..., d_output]`
pub(crate) fn linear<const D: usize>(x: &Tensor<D>, w: &Tensor<2>, bias: Option<&Tensor<1>>) -> Option<Tensor<D>> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let [d_input, d_output] = w.dims();
    if rows == 0 || rows > MAX_ROWS || dims[D - 1] != d_input {
        return None;
    }
    let (x_flex, w_flex) = (f32_on_cpu(x)?, f32_on_cpu(w)?);
    let bias_flex = match bias {
        Some(bias) => Some(f32_on_cpu(bias)?),
        None => None,
    };
    let y = rows_times_matrix(
        contiguous(&x_flex)?,
        rows,
        contiguous(&w_flex)?,
        d_input,
        d_output,
        match &bias_flex {
            Some(bias) => Some(contiguous(bias)?),
            None => None,
        },
    );
    let mut out_dims = dims;
    out_dims[D - 1] = d_output;
    Some(Tensor::from_data(TensorData::new(y, out_dims), &x.device()))
}

/// `x w^T` with `w` stored `[d_output, d_input]` (a tied output projection), through
/// [`rows_times_transposed`], under the conditions of [`linear`]; `None` otherwise.
///
/// # Shapes
/// - x: `[rows, d_input]`, w: `[d_output, d_input]`
/// - output: `[rows, d_output]`
pub(crate) fn times_transposed(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let [rows, d_input] = x.dims();
    let [d_output, w_input] = w.dims();
    if rows == 0 || rows > MAX_ROWS || w_input != d_input {
        return None;
    }
    let (x_flex, w_flex) = (f32_on_cpu(x)?, f32_on_cpu(w)?);
    let y = rows_times_transposed(contiguous(&x_flex)?, rows, contiguous(&w_flex)?, d_input, d_output);
    Some(Tensor::from_data(TensorData::new(y, [rows, d_output]), &x.device()))
}

/// The tensor's burn-flex primitive as it lies (a view stays a view), when it is an f32 tensor on
/// the CPU.
pub(super) fn f32_primitive<const D: usize>(tensor: &Tensor<D>) -> Option<FlexTensor> {
    if tensor.dtype() != DType::F32 {
        return None;
    }
    tensor.clone().try_into_primitive::<Flex>().ok()
}

/// [`f32_primitive`], made contiguous.
pub(super) fn f32_on_cpu<const D: usize>(tensor: &Tensor<D>) -> Option<FlexTensor> {
    let flex = f32_primitive(tensor)?;
    Some(if flex.is_contiguous() { flex } else { flex.to_contiguous() })
}

/// The values of a contiguous f32 primitive, without a copy.
pub(super) fn contiguous(tensor: &FlexTensor) -> Option<&[f32]> {
    let (start, end) = tensor.layout().contiguous_offsets()?;
    tensor.storage::<f32>().get(start..end)
}

/// Outputs of the row-major product a task takes at least (a whole number of 16-float vectors).
const MIN_COLUMNS: usize = 64;

/// `y = x w + bias` for `rows` rows of `x` (row-major `[rows, d_input]`) and a row-major `w`
/// (`[d_input, d_output]`); returns `[rows, d_output]`.
pub fn rows_times_matrix(
    x: &[f32],
    rows: usize,
    w: &[f32],
    d_input: usize,
    d_output: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(x.len(), rows * d_input);
    assert_eq!(w.len(), d_input * d_output);
    assert!(bias.is_none_or(|bias| bias.len() == d_output));
    // Each task: a contiguous range of outputs for every row, its accumulators kept in L1/L2.
    let tasks = rayon::current_num_threads().max(1);
    let width = d_output.div_ceil(tasks).div_ceil(MIN_COLUMNS).max(1) * MIN_COLUMNS;
    let parts: Vec<(usize, Vec<f32>)> = (0..d_output.div_ceil(width))
        .into_par_iter()
        .map(|part| {
            let columns = part * width..((part + 1) * width).min(d_output);
            (part, columns_of_product(x, rows, w, d_input, d_output, columns, bias))
        })
        .collect();
    let mut y = vec![0f32; rows * d_output];
    for (part, values) in parts {
        let start = part * width;
        let count = values.len() / rows;
        for (row, values) in values.chunks_exact(count).enumerate() {
            y[row * d_output + start..][..count].copy_from_slice(values);
        }
    }
    y
}

/// `y = x w^T` for `rows` rows of `x` (row-major `[rows, d_input]`) and a row-major `w`
/// (`[d_output, d_input]`); returns `[rows, d_output]`.
pub fn rows_times_transposed(x: &[f32], rows: usize, w: &[f32], d_input: usize, d_output: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * d_input);
    assert_eq!(w.len(), d_input * d_output);
    // [d_output, rows]: each task a run of weight rows, each weight row dotted with every x row.
    let mut transposed = vec![0f32; d_output * rows];
    let per_task = d_output.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    transposed.par_chunks_mut(per_task * rows).enumerate().for_each(|(task, out)| {
        let first = task * per_task;
        for (i, out) in out.chunks_exact_mut(rows).enumerate() {
            let w_row = &w[(first + i) * d_input..][..d_input];
            for (row, out) in out.iter_mut().enumerate() {
                *out = dot(w_row, &x[row * d_input..][..d_input]);
            }
        }
    });
    let mut y = vec![0f32; rows * d_output];
    for (n, values) in transposed.chunks_exact(rows).enumerate() {
        for (row, &value) in values.iter().enumerate() {
            y[row * d_output + n] = value;
        }
    }
    y
}

/// Outputs `columns` of `x w + bias`, `[rows, columns.len()]`.
fn columns_of_product(
    x: &[f32],
    rows: usize,
    w: &[f32],
    d_input: usize,
    d_output: usize,
    columns: std::ops::Range<usize>,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let count = columns.len();
    let mut acc = vec![0f32; rows * count];
    if let Some(bias) = bias {
        for acc in acc.chunks_exact_mut(count) {
            acc.copy_from_slice(&bias[columns.clone()]);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature the function is compiled for was detected at run time.
            unsafe { simd::accumulate_avx512(&mut acc, x, rows, w, d_input, d_output, columns.start) };
            return acc;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            unsafe { simd::accumulate_avx2(&mut acc, x, rows, w, d_input, d_output, columns.start) };
            return acc;
        }
    }
    accumulate(&mut acc, x, rows, w, d_input, d_output, columns.start);
    acc
}

/// Weight rows between the one [`accumulate`] reads and the one it prefetches.
const PREFETCH_ROWS: usize = 4;

/// `acc[r, j] += sum_k x[r, k] w[k, first + j]`, reading `w` row by row. Written so that the
/// compiler vectorises the inner loop over `j` (lane-wise FMAs, no reassociation).
#[inline(always)]
fn accumulate(acc: &mut [f32], x: &[f32], rows: usize, w: &[f32], d_input: usize, d_output: usize, first: usize) {
    let count = acc.len() / rows;
    for k in 0..d_input {
        let w_row = &w[k * d_output + first..][..count];
        // Each task reads a column range of every weight row, short runs that the hardware
        // prefetcher picks up late: ask for the row PREFETCH_ROWS ahead, a cache line at a time.
        #[cfg(target_arch = "x86_64")]
        if k + PREFETCH_ROWS < d_input {
            let ahead = w[(k + PREFETCH_ROWS) * d_output + first..][..count].as_ptr();
            for line in (0..count).step_by(16) {
                // SAFETY: a prefetch reads nothing; the address is inside `w`.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ahead.add(line).cast())
                };
            }
        }
        for (row, acc) in acc.chunks_exact_mut(count).enumerate() {
            let xk = x[row * d_input + k];
            for (a, &wv) in acc.iter_mut().zip(w_row) {
                *a = xk.mul_add(wv, *a);
            }
        }
    }
}

/// `sum_k a[k] b[k]` in 16 lanes (then summed), FMAs lane-wise.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let (a_rest, b_rest) = (a_chunks.remainder(), b_chunks.remainder());
    for (a, b) in a_chunks.zip(b_chunks) {
        for i in 0..16 {
            lanes[i] = a[i].mul_add(b[i], lanes[i]);
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(a, b)| a * b).sum();
    lanes.iter().sum::<f32>() + tail
}

/// [`dot_lanes`] with the fastest instructions the CPU has.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature the function is compiled for was detected at run time.
            return unsafe { simd::dot_avx512(a, b) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { simd::dot_avx2(a, b) };
        }
    }
    dot_lanes(a, b)
}

/// The portable loops compiled for AVX-512 and for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
mod simd {
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn accumulate_avx512(
        acc: &mut [f32],
        x: &[f32],
        rows: usize,
        w: &[f32],
        d_input: usize,
        d_output: usize,
        first: usize,
    ) {
        super::accumulate(acc, x, rows, w, d_input, d_output, first)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate_avx2(
        acc: &mut [f32],
        x: &[f32],
        rows: usize,
        w: &[f32],
        d_input: usize,
        d_output: usize,
        first: usize,
    ) {
        super::accumulate(acc, x, rows, w, d_input, d_output, first)
    }

    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        super::dot_lanes(a, b)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        super::dot_lanes(a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| (((i * 7 + seed * 13) % 29) as f32 - 14.0) / 9.0).collect()
    }

    /// The product in f64, `[rows, d_output]`, for a `[d_input, d_output]` weight.
    fn reference(x: &[f32], rows: usize, w: &[f32], d_input: usize, d_output: usize) -> Vec<f64> {
        (0..rows)
            .flat_map(|r| {
                (0..d_output).map(move |n| {
                    (0..d_input).map(|k| f64::from(x[r * d_input + k]) * f64::from(w[k * d_output + n])).sum()
                })
            })
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((f64::from(g) - w).abs() <= 1e-5 * (1.0 + w.abs()), "output {i}: {g} vs {w}");
        }
    }

    #[test]
    fn both_layouts_equal_the_product_on_awkward_sizes() {
        for (rows, d_input, d_output) in [(1, 1, 1), (1, 33, 70), (3, 130, 257), (4, 64, 1000), (2, 17, 5)] {
            let (x, w) = (values(rows * d_input, 1), values(d_input * d_output, 2));
            let want = reference(&x, rows, &w, d_input, d_output);
            assert_close(&rows_times_matrix(&x, rows, &w, d_input, d_output, None), &want);
            // The same weight stored [d_output, d_input].
            let transposed: Vec<f32> =
                (0..d_output).flat_map(|n| (0..d_input).map(|k| w[k * d_output + n]).collect::<Vec<_>>()).collect();
            assert_close(&rows_times_transposed(&x, rows, &transposed, d_input, d_output), &want);
            let bias = values(d_output, 3);
            let with_bias: Vec<f64> =
                want.iter().enumerate().map(|(i, &y)| y + f64::from(bias[i % d_output])).collect();
            assert_close(&rows_times_matrix(&x, rows, &w, d_input, d_output, Some(&bias)), &with_bias);
        }
    }
}
