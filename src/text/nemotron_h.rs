//! The Nemotron-H decoder (transformers' `models/nemotron_h/modeling_nemotron_h.py`,
//! `NemotronHModel`): a stack of pre-norm residual blocks, each one mixer chosen by the config's
//! layer pattern — Mamba-2 (`M`), grouped-query attention without positional encoding (`*`), a
//! mixture of experts (`E`) or a relu² MLP (`-`) — then a final RMSNorm.
//!
//! Attention layers keep keys and values in the [`KvCache`], Mamba layers their convolution and
//! SSM states beside them; left padding is hidden from attention by the cache's mask and enters
//! the Mamba layers as zeros, as transformers does.

use burn::module::{Initializer, Module};
use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::mamba::{Mamba2Config, Mamba2Mixer};
use crate::nn::moe::{Moe, MoeConfig, Relu2Mlp};
use crate::nn::quant::QuantKind;
use crate::nn::{KvCache, Linear, LinearConfig, RmsNorm, RmsNormConfig, scaled_dot_product_attention};
use crate::text::decoder::Embedding;

/// The mixer of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Mamba-2 (`linear_attention`, pattern `M`).
    Mamba,
    /// Attention (`full_attention`, pattern `*`).
    Attention,
    /// Mixture of experts (`moe`, pattern `E`).
    Moe,
    /// relu² MLP (`mlp`, pattern `-`).
    Mlp,
}

impl LayerType {
    /// The type of a `layers_block_type` entry.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "linear_attention" | "mamba" => Some(Self::Mamba),
            "full_attention" | "attention" => Some(Self::Attention),
            "moe" => Some(Self::Moe),
            "mlp" => Some(Self::Mlp),
            _ => None,
        }
    }

    /// The type of a `hybrid_override_pattern` character.
    pub fn from_symbol(symbol: char) -> Option<Self> {
        match symbol {
            'M' => Some(Self::Mamba),
            '*' => Some(Self::Attention),
            'E' => Some(Self::Moe),
            '-' => Some(Self::Mlp),
            _ => None,
        }
    }
}

/// Everything that defines a Nemotron-H decoder (`NemotronHConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct NemotronHConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Each block's mixer, in order.
    pub layers: Vec<LayerType>,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Width of an attention head.
    pub head_dim: usize,
    /// Inner width of the relu² MLP blocks.
    pub intermediate_size: usize,
    /// Whether the MLP blocks have biases.
    pub mlp_bias: bool,
    /// The Mamba-2 mixers.
    pub mamba: Mamba2Config,
    /// The mixtures of experts.
    pub moe: MoeConfig,
    /// Epsilon of every RMSNorm.
    pub layer_norm_epsilon: f64,
    /// The longest sequence the model is meant for.
    pub max_position_embeddings: usize,
    /// Whether the output projection reuses the embeddings.
    pub tie_word_embeddings: bool,
    /// How the linear layers are quantized, chosen at load.
    pub quantization: Option<QuantKind>,
}

impl NemotronHConfig {
    /// A lower bound of the parameter count, in saturating arithmetic.
    pub fn min_parameters(&self) -> u128 {
        let hidden = self.hidden_size as u128;
        let attention = hidden
            .saturating_mul((self.num_attention_heads + self.num_key_value_heads) as u128 * self.head_dim as u128)
            .saturating_mul(2);
        let mlp = hidden.saturating_mul(self.intermediate_size as u128).saturating_mul(2);
        let layers = self.layers.iter().fold(0u128, |sum, layer| {
            sum.saturating_add(match layer {
                LayerType::Mamba => self.mamba.min_parameters(),
                LayerType::Attention => attention,
                LayerType::Moe => self.moe.min_parameters(),
                LayerType::Mlp => mlp,
            })
        });
        let embeddings = (self.vocab_size as u128).saturating_mul(hidden);
        layers.saturating_add(embeddings).saturating_add(if self.tie_word_embeddings { 0 } else { embeddings })
    }

    /// Creates the decoder (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> NemotronHModel {
        let h = self.hidden_size;
        let norm = RmsNormConfig { d_model: h, eps: self.layer_norm_epsilon };
        let linear = |d_in, d_out| LinearConfig::new(d_in, d_out, false).quantized(self.quantization).init(device);
        let mixer = |layer: LayerType| match layer {
            LayerType::Mamba => Mixer::Mamba(self.mamba.init(device)),
            LayerType::Attention => Mixer::Attention(HeadlessAttention {
                q_proj: linear(h, self.num_attention_heads * self.head_dim),
                k_proj: linear(h, self.num_key_value_heads * self.head_dim),
                v_proj: linear(h, self.num_key_value_heads * self.head_dim),
                o_proj: linear(self.num_attention_heads * self.head_dim, h),
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
                head_dim: self.head_dim,
            }),
            LayerType::Moe => Mixer::Moe(self.moe.init(device)),
            LayerType::Mlp => Mixer::Mlp(Relu2Mlp {
                up_proj: LinearConfig::new(h, self.intermediate_size, self.mlp_bias).init(device),
                down_proj: LinearConfig::new(self.intermediate_size, h, self.mlp_bias).init(device),
            }),
        };
        NemotronHModel {
            embeddings: Embedding { weight: Initializer::Zeros.init([self.vocab_size, h], device) },
            layers: self.layers.iter().map(|&layer| Block { norm: norm.init(device), mixer: mixer(layer) }).collect(),
            norm_f: norm.init(device),
            config: self.clone(),
        }
    }

    /// The output projection (absent when tied and not quantized).
    pub fn lm_head(&self, device: &Device) -> Option<Linear> {
        let quantization = self.quantization.map(|_| QuantKind::Q8);
        (!self.tie_word_embeddings || quantization.is_some())
            .then(|| LinearConfig::new(self.hidden_size, self.vocab_size, false).quantized(quantization).init(device))
    }

    /// An empty cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        KvCache::new(self.layers.len(), batch, self.num_key_value_heads, self.head_dim, capacity)
    }
}

/// The Nemotron-H decoder without its output projection (`NemotronHModel`).
#[derive(Module, Debug)]
pub struct NemotronHModel {
    /// Token embeddings.
    pub embeddings: Embedding,
    /// The blocks.
    pub layers: Vec<Block>,
    /// Final norm.
    pub norm_f: RmsNorm,
    #[module(skip)]
    config: NemotronHConfig,
}

/// `x + mixer(norm(x))` (`NemotronHBlock`).
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before the mixer.
    pub norm: RmsNorm,
    /// The mixer.
    pub mixer: Mixer,
}

/// A block's mixer.
#[allow(clippy::large_enum_variant)] // one per block: its size does not matter
#[derive(Module, Debug)]
pub enum Mixer {
    /// Mamba-2.
    Mamba(Mamba2Mixer),
    /// Attention without positional encoding.
    Attention(HeadlessAttention),
    /// Mixture of experts.
    Moe(Moe),
    /// relu² MLP.
    Mlp(Relu2Mlp),
}

/// Causal grouped-query attention with no positional encoding (`NemotronHAttention`).
#[derive(Module, Debug)]
pub struct HeadlessAttention {
    /// `[heads * head_dim, hidden]`
    pub q_proj: Linear,
    /// `[kv_heads * head_dim, hidden]`
    pub k_proj: Linear,
    /// `[kv_heads * head_dim, hidden]`
    pub v_proj: Linear,
    /// `[hidden, heads * head_dim]`
    pub o_proj: Linear,
    #[module(skip)]
    num_heads: usize,
    #[module(skip)]
    num_kv_heads: usize,
    #[module(skip)]
    head_dim: usize,
}

impl HeadlessAttention {
    fn forward(&self, x: Tensor<3>, cache: &mut KvCache, layer: usize) -> Result<Tensor<3>> {
        let [batch, seq_len, _] = x.dims();
        let device = x.device();
        // [batch, seq_len, heads * head_dim] -> [batch, heads, seq_len, head_dim]
        let split = |t: Tensor<3>, heads: usize| t.reshape([batch, seq_len, heads, self.head_dim]).swap_dims(1, 2);
        let q = split(self.q_proj.forward(x.clone()), self.num_heads);
        let k = split(self.k_proj.forward(x.clone()), self.num_kv_heads);
        let v = split(self.v_proj.forward(x), self.num_kv_heads);
        let mask = cache.mask(seq_len, &device);
        let (k, v) = cache.update(layer, k, v)?;
        let out = scaled_dot_product_attention(q, k, v, mask, (self.head_dim as f64).powf(-0.5));
        // [batch, heads, seq_len, head_dim] -> [batch, seq_len, heads * head_dim]
        Ok(self.o_proj.forward(out.swap_dims(1, 2).reshape([batch, seq_len, self.num_heads * self.head_dim])))
    }
}

impl NemotronHModel {
    /// The configuration the decoder was built from.
    pub fn config(&self) -> &NemotronHConfig {
        &self.config
    }

    /// The device holding the weights.
    pub fn device(&self) -> Device {
        self.embeddings.weight.lazy_device()
    }

    /// Looks up token embeddings, checking ids against the vocabulary.
    ///
    /// # Shapes
    /// - output: `[batch, seq_len, hidden]`
    pub fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>> {
        self.embeddings.lookup(ids, self.config.vocab_size)
    }

    /// Runs the blocks over new tokens, continuing from (and updating) `cache`.
    ///
    /// # Shapes
    /// - inputs_embeds: `[batch, seq_len, hidden]`
    /// - output: `[batch, seq_len, hidden]` (after the final norm)
    pub fn forward(&self, inputs_embeds: Tensor<3>, cache: &mut KvCache) -> Result<Tensor<3>> {
        Ok(self.forward_with_blocks(inputs_embeds, cache, false)?.0)
    }

    /// [`forward`](Self::forward), also returning each block's output (before the final norm)
    /// when `keep_blocks`.
    pub fn forward_with_blocks(
        &self,
        inputs_embeds: Tensor<3>,
        cache: &mut KvCache,
        keep_blocks: bool,
    ) -> Result<(Tensor<3>, Vec<Tensor<3>>)> {
        let [batch, seq_len, _] = inputs_embeds.dims();
        if batch != cache.batch_size() {
            return Err(Error::Input(format!("a batch of {batch} sequences with a cache for {}", cache.batch_size())));
        }
        cache.check_room(seq_len)?;
        let real = cache.real_tokens(seq_len, &inputs_embeds.device());
        let mut hidden = inputs_embeds;
        let mut blocks = Vec::new();
        for (index, block) in self.layers.iter().enumerate() {
            let x = block.norm.forward(hidden.clone());
            let mixed = match &block.mixer {
                Mixer::Mamba(mixer) => {
                    let (out, state) = mixer.forward(x, cache.take_recurrent(index), real.clone());
                    cache.put_recurrent(index, state);
                    out
                }
                Mixer::Attention(attention) => attention.forward(x, cache, index)?,
                Mixer::Moe(moe) => moe.forward(x)?,
                Mixer::Mlp(mlp) => mlp.forward(x),
            };
            hidden = hidden + mixed;
            if keep_blocks {
                blocks.push(hidden.clone());
            }
        }
        cache.advance(seq_len);
        Ok((self.norm_f.forward(hidden), blocks))
    }

    /// Logits through the embeddings, for a tied output projection.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq_len, hidden]`
    /// - output: `[batch, seq_len, vocab]`
    pub fn tied_logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.embeddings.logits(hidden)
    }
}
