//! Weight-only quantization of linear layers: symmetric integers in blocks of [`BLOCK`] input
//! features per output feature, each block with one f32 scale (llama.cpp's q8_0 and q4_0 grids,
//! stored here along the `[d_input, d_output]` layout of [`Linear`](super::Linear)).
//!
//! On the CPU the product with a few rows of activations (decode) reads the packed weights once:
//! the bytes read per token are what bounds decode, so they shrink by 4 (q8) and 8 (q4) against
//! f32. As llama.cpp does, the activations are rounded to 8 bits per block of [`BLOCK`] for that
//! product, so that it runs on integer dot products (AVX-512 VNNI's `vpdpbusd` where the CPU has
//! it, plain integer loops with the same results elsewhere). Longer inputs (prefill), and other
//! backends, dequantize the weight and use the backend's f32 matmul.

use std::borrow::Cow;

use rayon::prelude::*;

/// Input features that share one scale.
pub const BLOCK: usize = 32;

/// Outputs per panel: the packed weight is stored panel by panel, each panel's inputs contiguous,
/// so a thread computing a panel streams one contiguous region.
pub const PANEL: usize = 64;

/// Bytes of one chunk: four bytes per output of a panel.
const CHUNK: usize = PANEL * 4;

/// How the weights of a linear layer are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantKind {
    /// 8-bit integers in -127..=127: 1 byte per weight plus 4 bytes per 32.
    Q8,
    /// 4-bit integers in -8..=7, two per byte: half a byte per weight plus 4 bytes per 32.
    Q4,
}

impl std::str::FromStr for QuantKind {
    type Err = String;

    /// `q8` or `q4`.
    fn from_str(name: &str) -> std::result::Result<Self, String> {
        match name.to_ascii_lowercase().as_str() {
            "q8" | "q8_0" | "int8" => Ok(QuantKind::Q8),
            "q4" | "q4_0" | "int4" => Ok(QuantKind::Q4),
            other => Err(format!("unknown quantization {other:?} (q8 or q4)")),
        }
    }
}

impl QuantKind {
    /// What a stored level carries on top of the signed one, so that it is unsigned (`vpdpbusd`
    /// multiplies unsigned bytes by signed ones).
    const fn bias(self) -> i32 {
        match self {
            QuantKind::Q8 => 128,
            QuantKind::Q4 => 8,
        }
    }

    /// Inputs one chunk holds: 4 (q8: a byte each), 8 (q4: a nibble each).
    const fn chunk_inputs(self) -> usize {
        match self {
            QuantKind::Q8 => 4,
            QuantKind::Q4 => 8,
        }
    }

    /// Whether a `[d_input, d_output]` weight can be stored this way.
    pub fn fits(self, d_input: usize, d_output: usize) -> bool {
        d_input > 0 && d_output > 0 && d_input.is_multiple_of(BLOCK)
    }
}

/// A quantized `[d_input, d_output]` weight in host memory.
///
/// Outputs are padded to whole panels of [`PANEL`]. Panel `p` holds outputs
/// `p * PANEL..(p + 1) * PANEL` as chunks of 4 (q8) or 8 (q4) inputs: in a chunk, output `j`'s
/// four bytes are at `4 j..4 j + 4`, byte `t` holding input `4 c + t` (q8), or inputs `8 c + t` in
/// its low nibble and `8 c + 4 + t` in its high one (q4), as unsigned levels (`level + 128`,
/// `level + 8`). The scales are per panel, block of [`BLOCK`] inputs and output.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight<'a> {
    /// The grid.
    pub kind: QuantKind,
    /// Input features (a multiple of [`BLOCK`]).
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// `[panels, d_input / chunk inputs, PANEL * 4]`.
    pub values: Cow<'a, [u8]>,
    /// `[panels, d_input / BLOCK, PANEL]`.
    pub scales: Cow<'a, [f32]>,
}

impl PackedWeight<'_> {
    /// Bytes of packed values of a `[d_input, d_output]` weight.
    pub fn values_len(kind: QuantKind, d_input: usize, d_output: usize) -> usize {
        d_output.div_ceil(PANEL) * (d_input / kind.chunk_inputs()) * CHUNK
    }

    /// Scales of a `[d_input, d_output]` weight.
    pub fn scales_len(d_input: usize, d_output: usize) -> usize {
        d_output.div_ceil(PANEL) * (d_input / BLOCK) * PANEL
    }

    /// Panels the outputs fill.
    pub fn panels(&self) -> usize {
        self.d_output.div_ceil(PANEL)
    }

    /// Quantizes a row-major `[d_input, d_output]` weight: each block's scale maps its largest
    /// magnitude to the edge of the grid (q4: to -8, with its sign, as q4_0), values round to
    /// nearest.
    pub fn quantize(kind: QuantKind, weight: &[f32], d_input: usize, d_output: usize) -> PackedWeight<'static> {
        assert!(kind.fits(d_input, d_output), "a {d_input}x{d_output} weight does not fit {kind:?} blocks");
        assert_eq!(weight.len(), d_input * d_output);
        let (blocks, panel_bytes) = (d_input / BLOCK, (d_input / kind.chunk_inputs()) * CHUNK);
        let mut values = vec![0u8; Self::values_len(kind, d_input, d_output)];
        let mut scales = vec![0f32; Self::scales_len(d_input, d_output)];
        values.par_chunks_mut(panel_bytes).zip(scales.par_chunks_mut(blocks * PANEL)).enumerate().for_each(
            |(panel, (values, scales))| {
                let columns = panel * PANEL..((panel + 1) * PANEL).min(d_output);
                for (block, scales) in scales.chunks_mut(PANEL).enumerate() {
                    let inputs = block * BLOCK..(block + 1) * BLOCK;
                    for (j, n) in columns.clone().enumerate() {
                        // The weight of largest magnitude, with its sign.
                        let extreme = inputs
                            .clone()
                            .map(|k| weight[k * d_output + n])
                            .fold(0f32, |m, w| if w.abs() > m.abs() { w } else { m });
                        scales[j] = match kind {
                            QuantKind::Q8 => extreme.abs() / 127.0,
                            // As q4_0: the extreme lands on -8, the one level without a +8.
                            QuantKind::Q4 => extreme / -8.0,
                        };
                    }
                    for k in inputs {
                        let (chunk, t) = (k / kind.chunk_inputs(), k % kind.chunk_inputs());
                        let chunk = &mut values[chunk * CHUNK..(chunk + 1) * CHUNK];
                        for (j, n) in columns.clone().enumerate() {
                            let level =
                                if scales[j] == 0.0 { 0.0 } else { (weight[k * d_output + n] / scales[j]).round() };
                            match kind {
                                QuantKind::Q8 => chunk[4 * j + t] = (level.clamp(-127.0, 127.0) as i32 + 128) as u8,
                                QuantKind::Q4 => {
                                    let nibble = (level.clamp(-8.0, 7.0) as i32 + 8) as u8;
                                    chunk[4 * j + t % 4] |= if t < 4 { nibble } else { nibble << 4 };
                                }
                            }
                        }
                    }
                }
            },
        );
        PackedWeight { kind, d_input, d_output, values: values.into(), scales: scales.into() }
    }

    /// The stored (unsigned) level of input `k`, output `j` of `panel`.
    fn stored(&self, panel: usize, k: usize, j: usize) -> i32 {
        let chunks = self.d_input / self.kind.chunk_inputs();
        let (chunk, t) = (k / self.kind.chunk_inputs(), k % self.kind.chunk_inputs());
        let byte = self.values[(panel * chunks + chunk) * CHUNK + 4 * j + t % 4];
        i32::from(match self.kind {
            QuantKind::Q8 => byte,
            QuantKind::Q4 if t < 4 => byte & 15,
            QuantKind::Q4 => byte >> 4,
        })
    }

    /// The weight back in f32, row-major `[d_input, d_output]`. Threads take blocks of inputs;
    /// each decodes its chunks whole.
    pub fn dequantize(&self) -> Vec<f32> {
        let (k_total, n) = (self.d_input, self.d_output);
        let (blocks, per_chunk) = (k_total / BLOCK, self.kind.chunk_inputs());
        let chunks = k_total / per_chunk;
        let bias = self.kind.bias();
        let mut out = vec![0f32; k_total * n];
        out.par_chunks_mut(BLOCK * n).enumerate().for_each(|(block, rows)| {
            for panel in 0..self.panels() {
                let width = PANEL.min(n - panel * PANEL);
                let scales = &self.scales[(panel * blocks + block) * PANEL..][..PANEL];
                for c in 0..BLOCK / per_chunk {
                    let chunk = &self.values[(panel * chunks + block * (BLOCK / per_chunk) + c) * CHUNK..][..CHUNK];
                    for t in 0..per_chunk {
                        let row = &mut rows[(c * per_chunk + t) * n + panel * PANEL..][..width];
                        for (j, (w, &scale)) in row.iter_mut().zip(scales).enumerate() {
                            let byte = chunk[4 * j + t % 4];
                            let stored = match self.kind {
                                QuantKind::Q8 => byte,
                                QuantKind::Q4 if t < 4 => byte & 15,
                                QuantKind::Q4 => byte >> 4,
                            };
                            *w = (i32::from(stored) - bias) as f32 * scale;
                        }
                    }
                }
            }
        });
        out
    }

    /// Bytes this weight occupies.
    pub fn bytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len()
    }

    /// `y = x W` for `rows` rows of `x` (row-major `[rows, d_input]`), the rows rounded to 8 bits
    /// per block first; returns `[rows, d_output]`. Threads take whole panels; each streams its
    /// panels once for all rows.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.d_input);
        let x = QuantizedRows::new(x, rows, self.d_input);
        let n = self.d_output;
        // Panel by panel, `[panels, rows, PANEL]`: for one row, the output padded to whole panels.
        let mut panels = vec![0f32; self.panels() * rows * PANEL];
        panels.par_chunks_mut(rows * PANEL).enumerate().for_each(|(panel, out)| self.panel(&x, panel, out));
        if rows == 1 {
            panels.truncate(n);
            return panels;
        }
        let mut out = vec![0f32; rows * n];
        for (panel, acc) in panels.chunks(rows * PANEL).enumerate() {
            let columns = panel * PANEL..((panel + 1) * PANEL).min(n);
            for r in 0..rows {
                out[r * n + columns.start..r * n + columns.end].copy_from_slice(&acc[r * PANEL..][..columns.len()]);
            }
        }
        out
    }

    /// One panel of `x W` into `out`, `[rows, PANEL]` (zeros on entry).
    fn panel(&self, x: &QuantizedRows, panel: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                // SAFETY: the features the function is compiled for were detected at run time.
                return unsafe { vnni::panel(self, x, panel, out) };
            }
        }
        self.panel_portable(x, panel, out)
    }

    /// [`panel`](Self::panel) in plain integer arithmetic, with the same results.
    fn panel_portable(&self, x: &QuantizedRows, panel: usize, out: &mut [f32]) {
        let blocks = self.d_input / BLOCK;
        let bias = self.kind.bias();
        let mut levels = vec![[0i32; PANEL]; BLOCK];
        for block in 0..blocks {
            for (i, levels) in levels.iter_mut().enumerate() {
                for (j, level) in levels.iter_mut().enumerate() {
                    *level = self.stored(panel, block * BLOCK + i, j);
                }
            }
            let scales = &self.scales[(panel * blocks + block) * PANEL..][..PANEL];
            for r in 0..x.rows {
                let xs = &x.values[r * self.d_input + block * BLOCK..][..BLOCK];
                let correction = bias * x.sums[r * blocks + block];
                let row_scale = x.scales[r * blocks + block];
                for (j, (y, &scale)) in out[r * PANEL..(r + 1) * PANEL].iter_mut().zip(scales).enumerate() {
                    let dot: i32 = levels.iter().zip(xs).map(|(levels, &xv)| levels[j] * i32::from(xv)).sum();
                    *y = ((dot - correction) as f32).mul_add(scale * row_scale, *y);
                }
            }
        }
    }
}

/// Rows of activations rounded to 8 bits per block of [`BLOCK`] (llama.cpp's q8_0): values,
/// one scale and the sum of the values per block.
struct QuantizedRows {
    rows: usize,
    /// `[rows, d_input]`.
    values: Vec<i8>,
    /// `[rows, d_input / BLOCK]`.
    scales: Vec<f32>,
    /// `[rows, d_input / BLOCK]`.
    sums: Vec<i32>,
}

impl QuantizedRows {
    fn new(x: &[f32], rows: usize, d_input: usize) -> Self {
        let blocks = rows * (d_input / BLOCK);
        let mut values = vec![0i8; x.len()];
        let mut scales = vec![0f32; blocks];
        let mut sums = vec![0i32; blocks];
        for (b, (block, out)) in x.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            for (o, &v) in out.iter_mut().zip(block) {
                *o = round_small(v * inverse).clamp(-127.0, 127.0) as i8;
            }
            scales[b] = scale;
            sums[b] = out.iter().map(|&v| i32::from(v)).sum();
        }
        Self { rows, values, scales, sums }
    }
}

/// `value` rounded to the nearest integer, ties to even, for `|value| < 2^22`: adding and taking
/// away 1.5 * 2^23 leaves no fraction bits. Unlike `f32::round` (a call into libm on baseline
/// x86-64), this compiles to vector additions.
fn round_small(value: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (value + SHIFT) - SHIFT
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    //! The panel product on AVX-512 VNNI: `vpdpbusd` multiplies 4 unsigned weight bytes by 4
    //! signed activation bytes and adds them to a 32-bit lane, 64 products per instruction.

    use std::arch::x86_64::*;

    use super::{BLOCK, CHUNK, PANEL, PackedWeight, QuantKind, QuantizedRows};

    /// Rows whose accumulators stay in registers together.
    const ROWS: usize = 4;

    /// How far ahead of the chunk being read to prefetch, in bytes: the hardware prefetcher alone
    /// left these loops at about two thirds of the machine's bandwidth.
    const PREFETCH: usize = 4096;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn panel(w: &PackedWeight<'_>, x: &QuantizedRows, panel: usize, out: &mut [f32]) {
        assert_eq!(out.len(), x.rows * PANEL);
        let (k_total, blocks) = (w.d_input, w.d_input / BLOCK);
        let chunks_per_block = BLOCK / w.kind.chunk_inputs();
        let values = &w.values[panel * (k_total / w.kind.chunk_inputs()) * CHUNK..];
        let bias = w.kind.bias();
        let nibble = _mm512_set1_epi8(15);
        for first in (0..x.rows).step_by(ROWS) {
            let group = ROWS.min(x.rows - first);
            let mut acc = [[_mm512_setzero_ps(); 4]; ROWS];
            for block in 0..blocks {
                let mut dots = [[_mm512_setzero_si512(); 4]; ROWS];
                for c in 0..chunks_per_block {
                    let chunk = &values[(block * chunks_per_block + c) * CHUNK..][..CHUNK];
                    // SAFETY: `chunk` holds CHUNK = 4 x 64 bytes.
                    let raw: [__m512i; 4] =
                        std::array::from_fn(|q| unsafe { _mm512_loadu_si512(chunk.as_ptr().add(64 * q).cast()) });
                    for q in 0..4 {
                        _mm_prefetch::<_MM_HINT_T0>(chunk.as_ptr().wrapping_add(PREFETCH + 64 * q).cast());
                    }
                    let k = block * BLOCK + c * w.kind.chunk_inputs();
                    for (r, dots) in dots.iter_mut().enumerate().take(group) {
                        let xs = &x.values[(first + r) * k_total + k..][..w.kind.chunk_inputs()];
                        // Four activation bytes, broadcast to every lane (one load).
                        let quad = |at: usize| {
                            let bytes: [u8; 4] = std::array::from_fn(|t| xs[at + t] as u8);
                            _mm512_set1_epi32(i32::from_le_bytes(bytes))
                        };
                        match w.kind {
                            QuantKind::Q8 => {
                                let xq = quad(0);
                                for q in 0..4 {
                                    dots[q] = _mm512_dpbusd_epi32(dots[q], raw[q], xq);
                                }
                            }
                            QuantKind::Q4 => {
                                let (low, high) = (quad(0), quad(4));
                                for q in 0..4 {
                                    let lows = _mm512_and_si512(raw[q], nibble);
                                    let highs = _mm512_and_si512(_mm512_srli_epi16(raw[q], 4), nibble);
                                    dots[q] = _mm512_dpbusd_epi32(dots[q], lows, low);
                                    dots[q] = _mm512_dpbusd_epi32(dots[q], highs, high);
                                }
                            }
                        }
                    }
                }
                let scales = &w.scales[(panel * blocks + block) * PANEL..][..PANEL];
                for (r, (acc, dots)) in acc.iter_mut().zip(&dots).enumerate().take(group) {
                    let b = (first + r) * blocks + block;
                    let correction = _mm512_set1_epi32(bias * x.sums[b]);
                    let row_scale = _mm512_set1_ps(x.scales[b]);
                    for q in 0..4 {
                        // SAFETY: `scales` holds PANEL = 4 x 16 floats.
                        let scale = unsafe { _mm512_loadu_ps(scales.as_ptr().add(16 * q)) };
                        let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(dots[q], correction));
                        acc[q] = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, row_scale), acc[q]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(group) {
                for (q, &lanes) in acc.iter().enumerate() {
                    // SAFETY: row `first + r` of `out` holds PANEL = 4 x 16 floats.
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr().add((first + r) * PANEL + 16 * q), lanes) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(d_input: usize, d_output: usize) -> Vec<f32> {
        (0..d_input * d_output).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32)).collect()
    }

    /// `x W` in f64 with `x` rounded as the kernels round it.
    fn reference(x: &[f32], w: &[f32], rows: usize, d_input: usize, d_output: usize) -> Vec<f32> {
        let q = QuantizedRows::new(x, rows, d_input);
        let mut y = vec![0f64; rows * d_output];
        for r in 0..rows {
            for k in 0..d_input {
                let xv = f64::from(q.values[r * d_input + k]) * f64::from(q.scales[(r * d_input + k) / BLOCK]);
                for n in 0..d_output {
                    y[r * d_output + n] += xv * f64::from(w[k * d_output + n]);
                }
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn quantization_error_stays_within_half_a_step_but_at_q4s_missing_plus_eight() {
        for kind in [QuantKind::Q8, QuantKind::Q4] {
            let (k, n) = (64, 96);
            let w = weight(k, n);
            let packed = PackedWeight::quantize(kind, &w, k, n);
            let back = packed.dequantize();
            for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                let (k_index, n_index) = (i / n, i % n);
                let scale = (n_index / PANEL * (k / BLOCK) + k_index / BLOCK) * PANEL + n_index % PANEL;
                let step = packed.scales[scale].abs();
                // A q4 weight opposite the extreme and as large would need +8: it gets 7.
                let bound = if kind == QuantKind::Q4 && (a / step).abs() > 7.5 { step } else { step / 2.0 };
                assert!((a - b).abs() <= bound * (1.0 + 1e-5), "{kind:?} at {i}: {a} vs {b} (step {step})");
            }
            let panels = n.div_ceil(PANEL);
            // A byte (q8) or half a byte (q4) per padded weight, and 4 bytes per block of 32.
            let values = match kind {
                QuantKind::Q8 => panels * PANEL * k,
                QuantKind::Q4 => panels * PANEL * k / 2,
            };
            assert_eq!(packed.bytes(), values + 4 * panels * PANEL * (k / BLOCK));
        }
    }

    #[test]
    fn matmul_equals_the_dequantized_product_on_awkward_sizes() {
        for (kind, k, n) in
            [(QuantKind::Q8, 32, 1), (QuantKind::Q8, 96, 1000), (QuantKind::Q4, 64, 544), (QuantKind::Q4, 32, 70)]
        {
            let packed = PackedWeight::quantize(kind, &weight(k, n), k, n);
            let dense = packed.dequantize();
            for rows in [1, 3, 6, 17] {
                let x: Vec<f32> = (0..rows * k).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
                let got = packed.matmul(&x, rows);
                let want = reference(&x, &dense, rows, k, n);
                let portable: Vec<f32> = {
                    let q = QuantizedRows::new(&x, rows, k);
                    let mut out = vec![0f32; rows * n];
                    for panel in 0..packed.panels() {
                        let mut acc = vec![0f32; rows * PANEL];
                        packed.panel_portable(&q, panel, &mut acc);
                        for r in 0..rows {
                            for j in 0..PANEL.min(n - panel * PANEL) {
                                out[r * n + panel * PANEL + j] = acc[r * PANEL + j];
                            }
                        }
                    }
                    out
                };
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, ((a, p), b)) in got.iter().zip(&portable).zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * scale, "{kind:?} {k}x{n} rows {rows} at {i}: {a} vs {b}");
                    assert!(
                        (a - p).abs() <= 1e-6 * scale,
                        "{kind:?} {k}x{n} rows {rows} at {i}: vnni {a} vs portable {p}"
                    );
                }
            }
        }
    }
}
