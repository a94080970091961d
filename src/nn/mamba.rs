//! The Mamba-2 mixer as Nemotron-H runs it (transformers' `NemotronHMamba2Mixer`, its PyTorch
//! path): one input projection into a gate `z`, the convolved stream `xBC` and the step sizes
//! `dt`; a depthwise causal convolution with SiLU over `xBC`; the selective state-space scan over
//! `x` with `B` / `C` shared by groups of heads; a gated, group-wise RMSNorm; the output
//! projection.
//!
//! A prompt runs the chunked scan (`mamba2_chunk_scan`: within each chunk a masked,
//! attention-like product; across chunks a recurrence on the chunk states); each later token runs
//! the recurrent update (`mamba2_selective_state_update`). Both continue from the states kept in
//! the [`KvCache`](super::KvCache): the last `conv_kernel - 1` inputs of the convolution and the
//! `[heads, head_dim, state]` SSM state of every sequence.

use burn::module::{Initializer, Module, Param};
use burn::tensor::activation::{silu, softplus_with_threshold};
use burn::tensor::{Bool, DType, Device, Tensor};

use super::{Linear, LinearConfig};

/// Shape and options of a Mamba-2 mixer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mamba2Config {
    /// Model width.
    pub hidden_size: usize,
    /// SSM heads (`mamba_num_heads`).
    pub num_heads: usize,
    /// Width of a head (`mamba_head_dim`).
    pub head_dim: usize,
    /// State size per head (`ssm_state_size`).
    pub state_size: usize,
    /// Groups of heads sharing `B` and `C` (`n_groups`).
    pub n_groups: usize,
    /// Width of the causal convolution (`conv_kernel`).
    pub conv_kernel: usize,
    /// Tokens per chunk of the prompt scan (`chunk_size`).
    pub chunk_size: usize,
    /// Whether the convolution has a bias (`use_conv_bias`).
    pub conv_bias: bool,
    /// Whether the input and output projections have biases (`use_bias`).
    pub proj_bias: bool,
    /// Epsilon of the gated norm (`layer_norm_epsilon`).
    pub norm_eps: f64,
    /// Lower bound of the step sizes in the prompt scan (`time_step_min`; transformers'
    /// recurrent update does not apply it).
    pub time_step_min: f64,
}

impl Mamba2Config {
    /// Width of `x` (and of the gate): heads x head width.
    pub fn intermediate_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Channels of the convolution: `x`, `B` and `C`.
    pub fn conv_dim(&self) -> usize {
        self.intermediate_size() + 2 * self.n_groups * self.state_size
    }

    /// A lower bound of the parameter count, in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        let (h, i) = (self.hidden_size as u128, self.intermediate_size() as u128);
        let projection = (i + self.conv_dim() as u128 + self.num_heads as u128).saturating_mul(h);
        projection.saturating_add(i.saturating_mul(h))
    }

    /// Creates the mixer (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> Mamba2Mixer {
        let (i, h, conv) = (self.intermediate_size(), self.num_heads, self.conv_dim());
        Mamba2Mixer {
            in_proj: LinearConfig::new(self.hidden_size, i + conv + h, self.proj_bias).init(device),
            conv1d: CausalConv1d {
                weight: Initializer::Zeros.init([conv, 1, self.conv_kernel], device),
                bias: self.conv_bias.then(|| Initializer::Zeros.init([conv], device)),
            },
            dt_bias: Initializer::Zeros.init([h], device),
            a_log: Initializer::Zeros.init([h], device),
            d: Initializer::Zeros.init([h], device),
            norm: GatedRmsNorm {
                weight: Initializer::Zeros.init([i], device),
                groups: self.n_groups,
                eps: self.norm_eps,
            },
            out_proj: LinearConfig::new(i, self.hidden_size, self.proj_bias).init(device),
            config: *self,
        }
    }
}

/// The recurrent state of one Mamba-2 layer for a batch.
#[derive(Debug, Clone)]
pub struct MambaState {
    /// The last `conv_kernel - 1` inputs of the convolution, `[batch, conv_dim, conv_kernel - 1]`.
    pub conv: Tensor<3>,
    /// The SSM state, `[batch, heads, head_dim, state]`, f32.
    pub ssm: Tensor<4>,
}

/// The Mamba-2 mixer (`NemotronHMamba2Mixer`).
#[derive(Module, Debug)]
pub struct Mamba2Mixer {
    /// `[hidden] -> [z | x B C | dt]`.
    pub in_proj: Linear,
    /// Depthwise causal convolution over `x B C`.
    pub conv1d: CausalConv1d,
    /// Added to `dt` before the softplus, `[heads]`.
    pub dt_bias: Param<Tensor<1>>,
    /// `A = -exp(a_log)`, `[heads]` (the checkpoint's `A_log`).
    pub a_log: Param<Tensor<1>>,
    /// Skip connection `D`, `[heads]` (the checkpoint's `D`).
    pub d: Param<Tensor<1>>,
    /// RMSNorm of `y * silu(z)` per group.
    pub norm: GatedRmsNorm,
    /// `[intermediate] -> [hidden]`.
    pub out_proj: Linear,
    #[module(skip)]
    config: Mamba2Config,
}

/// `nn.Conv1d(channels, channels, kernel, groups=channels)`, applied causally.
#[derive(Module, Debug)]
pub struct CausalConv1d {
    /// `[channels, 1, kernel]`
    pub weight: Param<Tensor<3>>,
    /// `[channels]`
    pub bias: Option<Param<Tensor<1>>>,
}

/// `weight * rmsnorm_per_group(x * silu(gate))` (`NemotronHRMSNormGated`), in f32.
#[derive(Module, Debug)]
pub struct GatedRmsNorm {
    /// `[width]`
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    groups: usize,
    #[module(skip)]
    eps: f64,
}

impl GatedRmsNorm {
    fn forward(&self, x: Tensor<3>, gate: Tensor<3>) -> Tensor<3> {
        let [batch, seq_len, width] = x.dims();
        let x = x.cast(DType::F32) * silu(gate.cast(DType::F32));
        // [batch, seq_len, width] -> [batch, seq_len, groups, width / groups]
        let grouped = x.reshape([batch, seq_len, self.groups, width / self.groups]);
        let variance = grouped.clone().powi_scalar(2).mean_dim(3);
        let normed = (grouped * (variance + self.eps).sqrt().recip()).reshape([batch, seq_len, width]);
        normed * self.weight.val().cast(DType::F32).unsqueeze()
    }
}

impl Mamba2Mixer {
    /// The configuration the mixer was built from.
    pub fn config(&self) -> &Mamba2Config {
        &self.config
    }

    /// Mixes new tokens, continuing from `state` (none before the first tokens) and returning the
    /// state after them. `real` marks the tokens that are not padding (`None`: all are); padding
    /// enters the scan as zeros, as transformers zeroes it.
    ///
    /// # Shapes
    /// - x: `[batch, seq_len, hidden]`
    /// - output: `[batch, seq_len, hidden]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        state: Option<MambaState>,
        real: Option<Tensor<3, Bool>>,
    ) -> (Tensor<3>, MambaState) {
        let c = &self.config;
        let [batch, seq_len, _] = x.dims();
        let (i, conv_dim, heads) = (c.intermediate_size(), c.conv_dim(), c.num_heads);
        let x = zero_padding(x, real.as_ref());
        let projected = self.in_proj.forward(x);
        let dtype = projected.dtype();
        // [batch, seq_len, i + conv_dim + heads] -> z, xBC, dt
        let gate = projected.clone().narrow(2, 0, i);
        let xbc = projected.clone().narrow(2, i, conv_dim);
        let dt = projected.narrow(2, i + conv_dim, heads).cast(DType::F32);
        let recurrent = seq_len == 1 && state.is_some();
        let (conv_state, ssm_state) = match state {
            Some(state) => (state.conv, Some(state.ssm)),
            None => {
                let zeros: Tensor<3> = Tensor::zeros([batch, conv_dim, c.conv_kernel - 1], &xbc.device());
                (zeros.cast(dtype), None)
            }
        };
        let (xbc, conv_state) = self.conv1d.forward(xbc, conv_state);
        let xbc = zero_padding(silu(xbc), real.as_ref()).cast(DType::F32);
        let (n, groups) = (c.state_size, c.n_groups);
        // [batch, seq_len, conv_dim] -> x [.., heads, head_dim], B and C [.., groups, state]
        let xs = xbc.clone().narrow(2, 0, i).reshape([batch, seq_len, heads, c.head_dim]);
        let b = xbc.clone().narrow(2, i, groups * n).reshape([batch, seq_len, groups, n]);
        let cm = xbc.narrow(2, i + groups * n, groups * n).reshape([batch, seq_len, groups, n]);
        let a = self.a_log.val().cast(DType::F32).exp().neg();
        let dt = dt + self.dt_bias.val().cast(DType::F32).unsqueeze();
        let dt = softplus_with_threshold(dt, 1.0, 20.0);
        let d = self.d.val().cast(DType::F32);
        let (y, ssm_state) = if recurrent {
            let state = ssm_state.expect("recurrent implies a state");
            step(xs, dt, a, self.heads_of(b), self.heads_of(cm), d, state)
        } else {
            let dt = dt.clamp_min(c.time_step_min);
            let initial =
                ssm_state.unwrap_or_else(|| Tensor::zeros([batch, heads, c.head_dim, n], (&xs.device(), DType::F32)));
            chunk_scan(xs, dt, a, self.heads_of(b), self.heads_of(cm), d, initial, c.chunk_size)
        };
        // [batch, seq_len, heads, head_dim] -> [batch, seq_len, intermediate]
        let y = self.norm.forward(y.reshape([batch, seq_len, i]), gate);
        let out = self.out_proj.forward(y.cast(dtype));
        (out, MambaState { conv: conv_state, ssm: ssm_state })
    }

    /// `B` or `C` of each group repeated for the group's heads.
    ///
    /// # Shapes
    /// - x: `[batch, seq_len, groups, state]`
    /// - output: `[batch, seq_len, heads, state]`
    fn heads_of(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, seq_len, groups, n] = x.dims();
        let per_group = self.config.num_heads / groups;
        // [batch, seq_len, groups, 1, n] -> [batch, seq_len, groups, per_group, n]
        x.unsqueeze_dim::<5>(3).expand([batch, seq_len, groups, per_group, n]).reshape([
            batch,
            seq_len,
            groups * per_group,
            n,
        ])
    }
}

impl CausalConv1d {
    /// Convolves new inputs after the `kernel - 1` before them; returns the outputs (no
    /// activation) and the last `kernel - 1` inputs.
    ///
    /// # Shapes
    /// - x: `[batch, seq_len, channels]`, state: `[batch, channels, kernel - 1]`
    /// - output: `[batch, seq_len, channels]` and `[batch, channels, kernel - 1]`
    fn forward(&self, x: Tensor<3>, state: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let [_, seq_len, channels] = x.dims();
        let [_, _, kernel] = self.weight.dims();
        let dtype = x.dtype();
        // [batch, channels, kernel - 1 + seq_len]
        let input = Tensor::cat(vec![state.cast(dtype), x.swap_dims(1, 2)], 2);
        let weight = self.weight.val().cast(dtype).reshape([1, channels, kernel]);
        let mut out = input.clone().narrow(2, 0, seq_len) * weight.clone().narrow(2, 0, 1);
        for tap in 1..kernel {
            out = out + input.clone().narrow(2, tap, seq_len) * weight.clone().narrow(2, tap, 1);
        }
        if let Some(bias) = &self.bias {
            out = out + bias.val().cast(dtype).reshape([1, channels, 1]);
        }
        let state = input.narrow(2, seq_len, kernel - 1);
        (out.swap_dims(1, 2), state)
    }
}

/// Zeroes the padding tokens (`real` false).
fn zero_padding(x: Tensor<3>, real: Option<&Tensor<3, Bool>>) -> Tensor<3> {
    match real {
        Some(real) => {
            let [batch, seq_len, width] = x.dims();
            x.mask_fill(real.clone().bool_not().expand([batch, seq_len, width]), 0.0)
        }
        None => x,
    }
}

/// The recurrent update for one token (`mamba2_selective_state_update`).
///
/// # Shapes
/// - x: `[batch, 1, heads, head_dim]`, dt: `[batch, 1, heads]`, a, d: `[heads]`
/// - b, c: `[batch, 1, heads, state]`, state: `[batch, heads, head_dim, state]`
/// - output: `[batch, 1, heads, head_dim]` and the new state
fn step(
    x: Tensor<4>,
    dt: Tensor<3>,
    a: Tensor<1>,
    b: Tensor<4>,
    c: Tensor<4>,
    d: Tensor<1>,
    state: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    let [batch, _, heads, head_dim] = x.dims();
    let n = b.dims()[3];
    let x = x.reshape([batch, heads, head_dim]);
    let dt = dt.reshape([batch, heads]);
    // exp(dt A): [batch, heads, 1, 1]
    let decay = (dt.clone() * a.unsqueeze()).exp().reshape([batch, heads, 1, 1]);
    // dt x B: [batch, heads, head_dim, 1] * [batch, heads, 1, state]
    let input = (x.clone() * dt.reshape([batch, heads, 1])).reshape([batch, heads, head_dim, 1])
        * b.reshape([batch, heads, 1, n]);
    let state = state * decay + input;
    // state C: [batch, heads, head_dim, state] x [batch, heads, state, 1]
    let y = state.clone().matmul(c.reshape([batch, heads, n, 1])).reshape([batch, heads, head_dim]);
    let y = y + x * d.reshape([1, heads, 1]);
    (y.reshape([batch, 1, heads, head_dim]), state)
}

/// `segsum(x)[.., i, j] = x[j + 1] + .. + x[i]` for `j <= i`, `-inf` above the diagonal
/// (transformers' `segment_sum`, which sums rather than subtracting cumulative sums).
///
/// # Shapes
/// - x: `[.., len]` (rank 4 here)
/// - output: `[.., len, len]`
fn segment_sum(x: Tensor<4>) -> Tensor<5> {
    let [d0, d1, d2, len] = x.dims();
    let device = x.device();
    let ones = Tensor::<2>::ones([len, len], &device);
    // Keep x[i] at [i, j] for j < i only.
    let below: Tensor<2, Bool> = ones.clone().tril(-1).equal_elem(1.0);
    let on_or_below: Tensor<2, Bool> = ones.tril(0).equal_elem(1.0);
    let expanded = x.unsqueeze_dim::<5>(4).expand([d0, d1, d2, len, len]);
    let shape = [d0, d1, d2, len, len];
    let kept = expanded.mask_fill(below.bool_not().unsqueeze::<5>().expand(shape), 0.0);
    kept.cumsum(3).mask_fill(on_or_below.bool_not().unsqueeze::<5>().expand(shape), f32::NEG_INFINITY)
}

/// The chunked scan of a prompt (`mamba2_chunk_scan`), from an initial state.
///
/// # Shapes
/// - x: `[batch, seq_len, heads, head_dim]`, dt: `[batch, seq_len, heads]`, a, d: `[heads]`
/// - b, c: `[batch, seq_len, heads, state]`, initial: `[batch, heads, head_dim, state]`
/// - output: `[batch, seq_len, heads, head_dim]` and the final state
#[allow(clippy::too_many_arguments)]
fn chunk_scan(
    x: Tensor<4>,
    dt: Tensor<3>,
    a: Tensor<1>,
    b: Tensor<4>,
    c: Tensor<4>,
    d: Tensor<1>,
    initial: Tensor<4>,
    chunk: usize,
) -> (Tensor<4>, Tensor<4>) {
    let [batch, seq_len, heads, head_dim] = x.dims();
    let n = b.dims()[3];
    let chunks = seq_len.div_ceil(chunk);
    let padded = chunks * chunk;
    let device = x.device();
    let pad = |t: Tensor<4>| -> Tensor<4> {
        if padded == seq_len {
            return t;
        }
        let [b0, _, d2, d3] = t.dims();
        let dtype = t.dtype();
        Tensor::cat(vec![t, Tensor::zeros([b0, padded - seq_len, d2, d3], (&device, dtype))], 1)
    };
    let x = pad(x);
    let residual = x.clone() * d.clone().reshape([1, 1, heads, 1]);
    // x dt and A dt: [batch, padded, heads, head_dim], [batch, padded, heads]
    let dt = pad(dt.unsqueeze_dim::<4>(3)).reshape([batch, padded, heads]);
    let x_dt = x * dt.clone().unsqueeze_dim::<4>(3);
    let a_dt = dt * a.reshape([1, 1, heads]);
    // Chunks: [batch, chunks, chunk, heads, ..] -> [batch, chunks, heads, chunk, ..]
    let x_dt = x_dt.reshape([batch, chunks, chunk, heads, head_dim]).swap_dims(2, 3);
    let b = pad(b).reshape([batch, chunks, chunk, heads, n]).swap_dims(2, 3);
    let c = pad(c).reshape([batch, chunks, chunk, heads, n]).swap_dims(2, 3);
    // A dt: [batch, heads, chunks, chunk]
    let a_dt = a_dt.reshape([batch, chunks, chunk, heads]).permute([0, 3, 1, 2]);
    let a_cumsum = a_dt.clone().cumsum(3);

    // 1. Within chunks: (C B^T) masked by the decays, applied to x dt.
    // [batch, heads, chunks, chunk, chunk] -> [batch, chunks, heads, chunk, chunk]
    let decay = segment_sum(a_dt).exp().swap_dims(1, 2);
    let scores = c.clone().matmul(b.clone().swap_dims(3, 4)) * decay;
    let y_diag = scores.matmul(x_dt.clone()); // [batch, chunks, heads, chunk, head_dim]

    // 2. Each chunk's state from its own tokens: [batch, chunks, heads, state, head_dim].
    let last = a_cumsum.clone().narrow(3, chunk - 1, 1);
    let decay_states = (last.clone() - a_cumsum.clone()).exp().swap_dims(1, 2).unsqueeze_dim::<5>(4);
    let states = (b * decay_states).swap_dims(3, 4).matmul(x_dt);

    // 3. Across chunks: each chunk's starting state.
    // [batch, heads, head_dim, state] -> [batch, 1, heads, state, head_dim]
    let initial = initial.swap_dims(2, 3).unsqueeze_dim::<5>(1);
    let states = Tensor::cat(vec![initial, states], 1); // [batch, chunks + 1, heads, state, head_dim]
    let zeros = Tensor::zeros([batch, heads, 1], (&device, last.dtype()));
    let ends = Tensor::cat(vec![zeros, last.reshape([batch, heads, chunks])], 2);
    // [batch, heads, chunks + 1, chunks + 1]
    let chunk_decay = segment_sum(ends.unsqueeze_dim::<4>(0)).exp().reshape([batch, heads, chunks + 1, chunks + 1]);
    // [batch, heads, chunks + 1, state * head_dim]
    let flat = states.swap_dims(1, 2).reshape([batch, heads, chunks + 1, n * head_dim]);
    let carried = chunk_decay.matmul(flat).reshape([batch, heads, chunks + 1, n, head_dim]);
    let final_state = carried.clone().narrow(2, chunks, 1).reshape([batch, heads, n, head_dim]).swap_dims(2, 3);
    let starts = carried.narrow(2, 0, chunks).swap_dims(1, 2); // [batch, chunks, heads, state, head_dim]

    // 4. Each token's read of its chunk's starting state, decayed to it.
    let decay_out = a_cumsum.exp().swap_dims(1, 2).unsqueeze_dim::<5>(4); // [batch, chunks, heads, chunk, 1]
    let y_off = c.matmul(starts) * decay_out;

    // [batch, chunks, heads, chunk, head_dim] -> [batch, padded, heads, head_dim]
    let y = (y_diag + y_off).swap_dims(2, 3).reshape([batch, padded, heads, head_dim]) + residual;
    (y.narrow(1, 0, seq_len), final_state)
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;

    fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values, shape), &crate::device::cpu())
    }

    fn pseudo(len: usize, seed: u32, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0) * scale)
            .collect()
    }

    /// The chunked scan, whatever the chunk size, equals one recurrent step per token.
    #[test]
    fn chunked_scan_equals_the_recurrence() {
        let (batch, len, heads, head_dim, n) = (2, 11, 4, 3, 5);
        let x = tensor(pseudo(batch * len * heads * head_dim, 1, 1.0), [batch, len, heads, head_dim]);
        let dt =
            tensor(pseudo(batch * len * heads, 2, 0.5).iter().map(|v| v.abs() + 0.05).collect(), [batch, len, heads]);
        let a = tensor(vec![-0.5, -1.0, -2.0, -0.1], [heads]);
        let b = tensor(pseudo(batch * len * heads * n, 3, 1.0), [batch, len, heads, n]);
        let c = tensor(pseudo(batch * len * heads * n, 4, 1.0), [batch, len, heads, n]);
        let d = tensor(vec![0.3, -0.2, 1.0, 0.0], [heads]);
        let initial = tensor(pseudo(batch * heads * head_dim * n, 5, 0.3), [batch, heads, head_dim, n]);
        let mut state = initial.clone();
        let mut ys = Vec::new();
        for t in 0..len {
            let (y, next) = step(
                x.clone().narrow(1, t, 1),
                dt.clone().narrow(1, t, 1),
                a.clone(),
                b.clone().narrow(1, t, 1),
                c.clone().narrow(1, t, 1),
                d.clone(),
                state,
            );
            ys.push(y);
            state = next;
        }
        let recurrent = Tensor::cat(ys, 1).into_data().try_to_vec::<f32>().unwrap();
        for chunk in [1, 4, 11, 16] {
            let (y, last) =
                chunk_scan(x.clone(), dt.clone(), a.clone(), b.clone(), c.clone(), d.clone(), initial.clone(), chunk);
            let y = y.into_data().try_to_vec::<f32>().unwrap();
            for (i, (p, q)) in y.iter().zip(&recurrent).enumerate() {
                assert!((p - q).abs() < 1e-4, "chunk {chunk}, output {i}: {p} vs {q}");
            }
            let last = last.into_data().try_to_vec::<f32>().unwrap();
            let want = state.clone().into_data().try_to_vec::<f32>().unwrap();
            for (p, q) in last.iter().zip(&want) {
                assert!((p - q).abs() < 1e-4, "chunk {chunk}: final state {p} vs {q}");
            }
        }
    }
}
