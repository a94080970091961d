//! Nemotron-H's mixture of experts (transformers' `NemotronHMoE`, `NemotronHTopkRouter`,
//! `NemotronHExperts`): a sigmoid router in f32 whose choice adds a per-expert correction bias
//! (the weights stay the raw scores), optionally restricted to the best groups of experts; the
//! chosen experts' non-gated relu² MLPs, weighted; plus a shared expert on every token.
//!
//! Routing is read back to the host once per call (a `[tokens, experts]` table); each expert hit
//! then runs as one batched product over its tokens, so the number of kernel launches grows with
//! the experts used, not with the tokens.

use burn::module::{Initializer, Module, Param};
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::{DType, Device, IndexingUpdateOp, Int, Tensor, TensorData};

use super::{Linear, LinearConfig};
use crate::error::{Error, Result};

/// Shape and routing of a mixture of experts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeConfig {
    /// Model width.
    pub hidden_size: usize,
    /// Routed experts (`n_routed_experts`).
    pub num_experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Inner width of a routed expert (`moe_intermediate_size`).
    pub expert_intermediate_size: usize,
    /// Inner width of the shared expert (`moe_shared_expert_intermediate_size`).
    pub shared_intermediate_size: usize,
    /// Groups the experts are split into for routing (`n_group`).
    pub n_group: usize,
    /// Groups a token may choose from (`topk_group`).
    pub topk_group: usize,
    /// Whether the chosen weights are normalised to sum to one (`norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Factor on the chosen weights (`routed_scaling_factor`).
    pub routed_scaling_factor: f64,
    /// Width the experts work in, when they sit behind a latent projection (`moe_latent_size`).
    pub latent_size: Option<usize>,
    /// Whether the MLPs have biases (`mlp_bias`).
    pub bias: bool,
}

impl MoeConfig {
    /// A lower bound of the parameter count, in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        let input = self.latent_size.unwrap_or(self.hidden_size) as u128;
        let expert = input.saturating_mul(self.expert_intermediate_size as u128).saturating_mul(2);
        let shared = (self.hidden_size as u128).saturating_mul(self.shared_intermediate_size as u128).saturating_mul(2);
        expert.saturating_mul(self.num_experts as u128).saturating_add(shared)
    }

    /// Creates the block (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> Moe {
        let (h, input) = (self.hidden_size, self.latent_size.unwrap_or(self.hidden_size));
        let mlp = |width: usize, inner: usize| Relu2Mlp {
            up_proj: LinearConfig::new(width, inner, self.bias).init(device),
            down_proj: LinearConfig::new(inner, width, self.bias).init(device),
        };
        Moe {
            gate: TopkRouter {
                weight: Initializer::Zeros.init([self.num_experts, h], device),
                e_score_correction_bias: Initializer::Zeros.init([self.num_experts], device),
            },
            experts: (0..self.num_experts).map(|_| mlp(input, self.expert_intermediate_size)).collect(),
            shared_experts: mlp(h, self.shared_intermediate_size),
            fc1_latent_proj: self.latent_size.map(|latent| LinearConfig::new(h, latent, self.bias).init(device)),
            fc2_latent_proj: self.latent_size.map(|latent| LinearConfig::new(latent, h, self.bias).init(device)),
            config: *self,
        }
    }
}

/// `down(relu(up(x))^2)` (`NemotronHMLP`; also each routed expert).
#[derive(Module, Debug)]
pub struct Relu2Mlp {
    /// `[inner, width]`
    pub up_proj: Linear,
    /// `[width, inner]`
    pub down_proj: Linear,
}

impl Relu2Mlp {
    /// # Shapes
    /// - x: `[.., width]`
    /// - output: `[.., width]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.down_proj.forward(relu(self.up_proj.forward(x)).powi_scalar(2))
    }
}

/// The router's parameters (`NemotronHTopkRouter`).
#[derive(Module, Debug)]
pub struct TopkRouter {
    /// `[experts, hidden]`
    pub weight: Param<Tensor<2>>,
    /// Added to the scores when choosing (not when weighting), `[experts]`.
    pub e_score_correction_bias: Param<Tensor<1>>,
}

/// A mixture of experts with a shared expert (`NemotronHMoE`).
#[derive(Module, Debug)]
pub struct Moe {
    /// The router.
    pub gate: TopkRouter,
    /// The routed experts.
    pub experts: Vec<Relu2Mlp>,
    /// The expert every token goes through.
    pub shared_experts: Relu2Mlp,
    /// Into the experts' latent width, if they have one.
    pub fc1_latent_proj: Option<Linear>,
    /// Out of the experts' latent width.
    pub fc2_latent_proj: Option<Linear>,
    #[module(skip)]
    config: MoeConfig,
}

impl Moe {
    /// # Shapes
    /// - x: `[batch, seq_len, hidden]`
    /// - output: `[batch, seq_len, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let [batch, seq_len, hidden] = x.dims();
        let tokens = batch * seq_len;
        let flat = x.clone().reshape([tokens, hidden]);
        let routes = self.route(flat.clone())?;
        let input = match &self.fc1_latent_proj {
            Some(projection) => projection.forward(flat),
            None => flat,
        };
        let width = input.dims()[1];
        let device = input.device();
        let dtype = input.dtype();
        let mut routed = Tensor::<2>::zeros([tokens, width], &device).cast(dtype);
        for (expert, chosen) in routes.iter().enumerate().filter(|(_, chosen)| !chosen.is_empty()) {
            let (rows, weights): (Vec<i64>, Vec<f32>) = chosen.iter().map(|&(row, w)| (row as i64, w)).unzip();
            let count = rows.len();
            let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [count]), &device);
            let weights = Tensor::<2>::from_data(TensorData::new(weights, [count, 1]), &device).cast(dtype);
            let out = self.experts[expert].forward(input.clone().select(0, rows.clone())) * weights;
            routed = routed.select_assign(0, rows, out, IndexingUpdateOp::Add);
        }
        let routed = match &self.fc2_latent_proj {
            Some(projection) => projection.forward(routed),
            None => routed,
        };
        Ok(routed.reshape([batch, seq_len, hidden]) + self.shared_experts.forward(x))
    }

    /// For each expert, the tokens routed to it with their weights (`NemotronHTopkRouter.forward`).
    fn route(&self, x: Tensor<2>) -> Result<Vec<Vec<(usize, f32)>>> {
        let c = &self.config;
        let experts = c.num_experts;
        let logits = x.cast(DType::F32).matmul(self.gate.weight.val().cast(DType::F32).transpose());
        let scores = sigmoid(logits).into_data().convert::<f32>();
        let scores = scores.as_slice::<f32>().map_err(|e| Error::Input(format!("router scores: {e:?}")))?;
        let bias = self.gate.e_score_correction_bias.val().cast(DType::F32).into_data().convert::<f32>();
        let bias = bias.as_slice::<f32>().map_err(|e| Error::Input(format!("router bias: {e:?}")))?;
        if scores.iter().any(|s| !s.is_finite()) {
            return Err(Error::NonFinite { stage: "the MoE router" });
        }
        let per_group = experts / c.n_group;
        let mut routes = vec![Vec::new(); experts];
        for (token, scores) in scores.chunks_exact(experts).enumerate() {
            let choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
            // A group's score is the sum of its two best; tokens choose among the best groups.
            let mut groups: Vec<(usize, f32)> = choice
                .chunks_exact(per_group)
                .map(|group| {
                    let mut best = group.to_vec();
                    best.sort_by(|a, b| b.total_cmp(a));
                    best.iter().take(2).sum()
                })
                .enumerate()
                .collect();
            groups.sort_by(|a, b| b.1.total_cmp(&a.1));
            let allowed: Vec<usize> = groups.iter().take(c.topk_group).map(|&(group, _)| group).collect();
            let mut candidates: Vec<usize> = (0..experts).filter(|e| allowed.contains(&(e / per_group))).collect();
            candidates.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]));
            candidates.truncate(c.top_k);
            let mut weights: Vec<f32> = candidates.iter().map(|&e| scores[e]).collect();
            if c.norm_topk_prob {
                let sum = weights.iter().sum::<f32>() + 1e-20;
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            for (&expert, weight) in candidates.iter().zip(weights) {
                routes[expert].push((token, weight * c.routed_scaling_factor as f32));
            }
        }
        Ok(routes)
    }
}
