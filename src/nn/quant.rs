//! Weight-only quantization of linear layers: symmetric integers in blocks of [`BLOCK`] input
//! features per output feature, each block with one f32 scale (llama.cpp's q8_0 and q4_0 grids,
//! stored here along the `[d_input, d_output]` layout of [`Linear`](super::Linear)).
//!
//! On the CPU the product with a few rows of activations (decode) reads the packed weights once,
//! widening them in registers: the bytes read per token are what bounds decode, so they shrink by
//! 4 (q8) and 8 (q4) against f32. Longer inputs, and other backends, dequantize the weight and use
//! the backend's matmul.

use std::borrow::Cow;

use rayon::prelude::*;

/// Input features that share one scale.
pub const BLOCK: usize = 32;

/// Outputs per panel: the packed weight is stored panel by panel, each panel's rows contiguous,
/// so a thread computing a panel streams one contiguous region.
pub const PANEL: usize = 64;

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
    /// Bytes of one row (one input feature) of a panel.
    const fn panel_row_bytes(self) -> usize {
        match self {
            QuantKind::Q8 => PANEL,
            QuantKind::Q4 => PANEL / 2,
        }
    }

    /// Whether a `[d_input, d_output]` weight can be stored this way.
    pub fn fits(self, d_input: usize, d_output: usize) -> bool {
        d_input > 0 && d_output > 0 && d_input.is_multiple_of(BLOCK)
    }
}

/// A quantized `[d_input, d_output]` weight in host memory.
///
/// Outputs are padded to whole panels of [`PANEL`]. Panel `p` holds, for each input `k`, the
/// levels of outputs `p * PANEL..(p + 1) * PANEL` (q8: one `i8` each; q4: per 32 outputs, 16
/// bytes with output `j` in the low nibble and `j + 16` in the high one, stored `+ 8`), and for
/// each block of [`BLOCK`] inputs the panel's scales.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight<'a> {
    /// The grid.
    pub kind: QuantKind,
    /// Input features (a multiple of [`BLOCK`]).
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// `[panels, d_input, panel row bytes]`.
    pub values: Cow<'a, [u8]>,
    /// `[panels, d_input / BLOCK, PANEL]`.
    pub scales: Cow<'a, [f32]>,
}

impl PackedWeight<'_> {
    /// Bytes of packed values of a `[d_input, d_output]` weight.
    pub fn values_len(kind: QuantKind, d_input: usize, d_output: usize) -> usize {
        d_output.div_ceil(PANEL) * d_input * kind.panel_row_bytes()
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
        let (panels, blocks, row_bytes) = (d_output.div_ceil(PANEL), d_input / BLOCK, kind.panel_row_bytes());
        let mut values = vec![0u8; panels * d_input * row_bytes];
        let mut scales = vec![0f32; panels * blocks * PANEL];
        values.par_chunks_mut(d_input * row_bytes).zip(scales.par_chunks_mut(blocks * PANEL)).enumerate().for_each(
            |(panel, (values, scales))| {
                let columns = panel * PANEL..((panel + 1) * PANEL).min(d_output);
                for (block, scales) in scales.chunks_mut(PANEL).enumerate() {
                    let rows = block * BLOCK..(block + 1) * BLOCK;
                    for (j, n) in columns.clone().enumerate() {
                        // The weight of largest magnitude, with its sign.
                        let extreme = rows
                            .clone()
                            .map(|k| weight[k * d_output + n])
                            .fold(0f32, |m, w| if w.abs() > m.abs() { w } else { m });
                        scales[j] = match kind {
                            QuantKind::Q8 => extreme.abs() / 127.0,
                            // As q4_0: the extreme lands on -8, the one level without a +8.
                            QuantKind::Q4 => extreme / -8.0,
                        };
                    }
                    for k in rows {
                        let level = |j: usize| {
                            let n = panel * PANEL + j;
                            if n >= d_output || scales[j] == 0.0 {
                                0.0
                            } else {
                                (weight[k * d_output + n] / scales[j]).round()
                            }
                        };
                        let row = &mut values[k * row_bytes..(k + 1) * row_bytes];
                        match kind {
                            QuantKind::Q8 => {
                                for (j, byte) in row.iter_mut().enumerate() {
                                    *byte = level(j).clamp(-127.0, 127.0) as i8 as u8;
                                }
                            }
                            QuantKind::Q4 => {
                                for (group, bytes) in row.chunks_mut(16).enumerate() {
                                    for (j, byte) in bytes.iter_mut().enumerate() {
                                        let low = level(group * 32 + j).clamp(-8.0, 7.0) as i32 + 8;
                                        let high = level(group * 32 + j + 16).clamp(-8.0, 7.0) as i32 + 8;
                                        *byte = (low | (high << 4)) as u8;
                                    }
                                }
                            }
                        }
                    }
                }
            },
        );
        PackedWeight { kind, d_input, d_output, values: values.into(), scales: scales.into() }
    }

    /// The weight back in f32, row-major `[d_input, d_output]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (k_total, n) = (self.d_input, self.d_output);
        let row_bytes = self.kind.panel_row_bytes();
        let mut out = vec![0f32; k_total * n];
        out.par_chunks_mut(n).enumerate().for_each(|(k, row)| {
            let block = k / BLOCK;
            for panel in 0..self.panels() {
                let mut levels = [0f32; PANEL];
                let offset = (panel * k_total + k) * row_bytes;
                widen(self.kind, &self.values[offset..offset + row_bytes], &mut levels);
                let scales = &self.scales[(panel * (k_total / BLOCK) + block) * PANEL..][..PANEL];
                let columns = panel * PANEL..((panel + 1) * PANEL).min(n);
                for ((w, level), scale) in row[columns].iter_mut().zip(levels).zip(scales) {
                    *w = level * scale;
                }
            }
        });
        out
    }

    /// Bytes this weight occupies.
    pub fn bytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len()
    }

    /// `y = x W` for `rows` rows of `x` (row-major `[rows, d_input]`); returns `[rows, d_output]`.
    /// Threads take whole panels; each streams its panels once for all rows.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.d_input);
        let n = self.d_output;
        let panels: Vec<Vec<f32>> =
            (0..self.panels()).into_par_iter().map(|panel| self.panel(x, rows, panel)).collect();
        let mut out = vec![0f32; rows * n];
        for (panel, acc) in panels.iter().enumerate() {
            let columns = panel * PANEL..((panel + 1) * PANEL).min(n);
            for r in 0..rows {
                out[r * n + columns.start..r * n + columns.end].copy_from_slice(&acc[r * PANEL..][..columns.len()]);
            }
        }
        out
    }

    /// One panel of `x W`, `[rows, PANEL]`.
    fn panel(&self, x: &[f32], rows: usize, panel: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: the features the function is compiled for were detected at run time.
                return unsafe { panel_avx512(self, x, rows, panel) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { panel_avx2(self, x, rows, panel) };
            }
        }
        panel_body(self, x, rows, panel)
    }
}

/// The levels of one panel row, as f32.
#[inline(always)]
fn widen(kind: QuantKind, values: &[u8], out: &mut [f32; PANEL]) {
    match kind {
        QuantKind::Q8 => {
            for (o, &v) in out.iter_mut().zip(&values[..PANEL]) {
                *o = f32::from(v as i8);
            }
        }
        QuantKind::Q4 => {
            let values: &[u8; PANEL / 2] = values[..PANEL / 2].try_into().expect("a q4 panel row");
            for group in 0..PANEL / 32 {
                for j in 0..16 {
                    let byte = values[group * 16 + j];
                    out[group * 32 + j] = f32::from(byte & 15) - 8.0;
                    out[group * 32 + 16 + j] = f32::from(byte >> 4) - 8.0;
                }
            }
        }
    }
}

/// Rows of activations handled together: their partial sums stay in registers.
const ROW_GROUP: usize = 4;

/// The kernel, compiled once per instruction set by the wrappers below.
#[inline(always)]
fn panel_body(w: &PackedWeight<'_>, x: &[f32], rows: usize, panel: usize) -> Vec<f32> {
    let k_total = w.d_input;
    let row_bytes = w.kind.panel_row_bytes();
    let values = &w.values[panel * k_total * row_bytes..(panel + 1) * k_total * row_bytes];
    let scales = &w.scales[panel * (k_total / BLOCK) * PANEL..(panel + 1) * (k_total / BLOCK) * PANEL];
    let mut out = vec![0f32; rows * PANEL];
    for first in (0..rows).step_by(ROW_GROUP) {
        let group = ROW_GROUP.min(rows - first);
        let mut acc = [[0f32; PANEL]; ROW_GROUP];
        for (block, scales) in scales.chunks_exact(PANEL).enumerate() {
            let mut partial = [[0f32; PANEL]; ROW_GROUP];
            for k in block * BLOCK..(block + 1) * BLOCK {
                let mut levels = [0f32; PANEL];
                widen(w.kind, &values[k * row_bytes..(k + 1) * row_bytes], &mut levels);
                for (r, partial) in partial.iter_mut().enumerate().take(group) {
                    let xv = x[(first + r) * k_total + k];
                    for (p, &l) in partial.iter_mut().zip(&levels) {
                        *p = xv.mul_add(l, *p);
                    }
                }
            }
            for (acc, partial) in acc.iter_mut().zip(&partial).take(group) {
                for ((a, &p), &s) in acc.iter_mut().zip(partial).zip(scales) {
                    *a = p.mul_add(s, *a);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate().take(group) {
            out[(first + r) * PANEL..(first + r + 1) * PANEL].copy_from_slice(acc);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn panel_avx512(w: &PackedWeight<'_>, x: &[f32], rows: usize, panel: usize) -> Vec<f32> {
    panel_body(w, x, rows, panel)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_avx2(w: &PackedWeight<'_>, x: &[f32], rows: usize, panel: usize) -> Vec<f32> {
    panel_body(w, x, rows, panel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(d_input: usize, d_output: usize) -> Vec<f32> {
        (0..d_input * d_output).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32)).collect()
    }

    fn reference(x: &[f32], w: &[f32], rows: usize, d_input: usize, d_output: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * d_output];
        for r in 0..rows {
            for k in 0..d_input {
                for n in 0..d_output {
                    y[r * d_output + n] += x[r * d_input + k] * w[k * d_output + n];
                }
            }
        }
        y
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
            assert_eq!(packed.bytes(), panels * (kind.panel_row_bytes() * k + 4 * (k / BLOCK) * PANEL));
        }
    }

    #[test]
    fn matmul_equals_the_dequantized_product_on_awkward_sizes() {
        for (kind, k, n) in
            [(QuantKind::Q8, 32, 1), (QuantKind::Q8, 96, 1000), (QuantKind::Q4, 64, 544), (QuantKind::Q4, 32, 70)]
        {
            let packed = PackedWeight::quantize(kind, &weight(k, n), k, n);
            let dense = packed.dequantize();
            for rows in [1, 3, 17] {
                let x: Vec<f32> = (0..rows * k).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
                let got = packed.matmul(&x, rows);
                let want = reference(&x, &dense, rows, k, n);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{kind:?} {k}x{n} rows {rows} at {i}: {a} vs {b}");
                }
            }
        }
    }
}
