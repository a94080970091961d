//! A Llama-family decoder: token embeddings, pre-norm layers of grouped-query attention with
//! rotate-half RoPE and a gated MLP, final RMSNorm. Qwen2 is the same with biases on q, k and v;
//! Qwen3 adds an RMSNorm over each head of q and k; the Qwen-VL decoders take three position rows
//! per token (multimodal RoPE) and Qwen3-VL adds vision features to the first layers' outputs
//! (DeepStack) (transformers' `models/qwen2/modeling_qwen2.py`, `models/llama/modeling_llama.py`,
//! `models/qwen3/modeling_qwen3.py`, `models/qwen3_vl/modeling_qwen3_vl.py`).

use burn::module::{Initializer, Module, Param};
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::nn::quant::QuantKind;
use crate::nn::rope::{MultimodalRope, RopeScaling, RopeTables};
use crate::nn::{
    Activation, AttentionMask, GatedMlp, GatedMlpConfig, KvCache, Linear, LinearConfig, RmsNorm, RmsNormConfig,
    RotaryEmbedding, scaled_dot_product_attention,
};

/// Shape and options of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Inner width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Epsilon of the RMSNorms.
    pub rms_norm_eps: f64,
    /// Base frequency of the rotary embedding.
    pub rope_theta: f64,
    /// How the rotary frequencies are scaled for long contexts.
    pub rope_scaling: RopeScaling,
    /// Qwen-VL's multimodal RoPE: which position row each frequency takes (`None`: one row).
    pub mrope: Option<MultimodalRope>,
    /// Qwen3's RMSNorm over each head of q and k, before RoPE.
    pub qk_norm: bool,
    /// Mistral's sliding window: each token attends to at most this many (itself included).
    pub sliding_window: Option<usize>,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// Biases on the q, k and v projections (Qwen2: yes; Llama: `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`; never for Qwen2).
    pub o_bias: bool,
    /// Biases in the MLP (`mlp_bias`).
    pub mlp_bias: bool,
    /// Activation of the MLP gate.
    pub hidden_act: Activation,
    /// Whether the output projection reuses the embedding table.
    pub tie_word_embeddings: bool,
    /// How the decoder's linear layers (and the output projection, in 8 bits) are quantized;
    /// chosen at load ([`crate::loader::LoadOptions`]), never read from a checkpoint.
    pub quantization: Option<QuantKind>,
}

impl TextConfig {
    /// A two-layer Qwen2-shaped decoder small enough for unit tests.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 128,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: RopeScaling::None,
            mrope: None,
            qk_norm: false,
            sliding_window: None,
            max_position_embeddings: 512,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            hidden_act: Activation::Silu,
            quantization: None,
            tie_word_embeddings: true,
        }
    }

    /// The longest sequence (prompt and generated tokens) the model is meant for: the trained
    /// context, stretched by RoPE scaling where the scaling says by how much (linear and dynamic
    /// scale `max_position_embeddings`, YaRN its original context; Llama 3's configs already give
    /// the stretched length).
    pub fn context_length(&self) -> usize {
        let stretched = match self.rope_scaling {
            RopeScaling::None | RopeScaling::Llama3 { .. } => 0.0,
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => {
                self.max_position_embeddings as f64 * factor
            }
            RopeScaling::Yarn { factor, original_max_position_embeddings, .. } => {
                original_max_position_embeddings * factor
            }
        };
        self.max_position_embeddings.max(stretched.min(crate::config::MAX_CONTEXT as f64) as usize)
    }

    /// A lower bound of the parameter count (embeddings and the matrices of every layer, in
    /// saturating arithmetic): lets the loader refuse an absurd configuration before allocating.
    pub fn min_parameters(&self) -> u128 {
        let hidden = self.hidden_size as u128;
        let q = (self.num_attention_heads as u128).saturating_mul(self.head_dim as u128);
        let kv = (self.num_key_value_heads as u128).saturating_mul(self.head_dim as u128);
        let attention = hidden.saturating_mul(q.saturating_mul(2).saturating_add(kv.saturating_mul(2)));
        let mlp = hidden.saturating_mul(self.intermediate_size as u128).saturating_mul(3);
        let layers = attention.saturating_add(mlp).saturating_mul(self.num_hidden_layers as u128);
        let embeddings = (self.vocab_size as u128).saturating_mul(hidden);
        let lm_head = if self.tie_word_embeddings { 0 } else { embeddings };
        layers.saturating_add(embeddings).saturating_add(lm_head)
    }

    /// Creates the decoder (parameters filled by the loader).
    pub fn init(&self, device: &Device) -> TextModel {
        TextModel {
            embed_tokens: Embedding { weight: Initializer::Zeros.init([self.vocab_size, self.hidden_size], device) },
            layers: (0..self.num_hidden_layers).map(|_| self.init_layer(device)).collect(),
            norm: RmsNormConfig { d_model: self.hidden_size, eps: self.rms_norm_eps }.init(device),
            rope: RotaryEmbedding::new(self.head_dim, self.rope_theta, self.rope_scaling, self.max_position_embeddings),
            config: self.clone(),
        }
    }

    fn init_layer(&self, device: &Device) -> DecoderLayer {
        let (h, d) = (self.hidden_size, self.head_dim);
        let norm = RmsNormConfig { d_model: h, eps: self.rms_norm_eps };
        DecoderLayer {
            self_attn: SelfAttention {
                q_proj: LinearConfig::new(h, self.num_attention_heads * d, self.qkv_bias)
                    .quantized(self.quantization)
                    .init(device),
                k_proj: LinearConfig::new(h, self.num_key_value_heads * d, self.qkv_bias)
                    .quantized(self.quantization)
                    .init(device),
                v_proj: LinearConfig::new(h, self.num_key_value_heads * d, self.qkv_bias)
                    .quantized(self.quantization)
                    .init(device),
                o_proj: LinearConfig::new(self.num_attention_heads * d, h, self.o_bias)
                    .quantized(self.quantization)
                    .init(device),
                q_norm: self.qk_norm.then(|| RmsNormConfig { d_model: d, eps: self.rms_norm_eps }.init(device)),
                k_norm: self.qk_norm.then(|| RmsNormConfig { d_model: d, eps: self.rms_norm_eps }.init(device)),
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
                head_dim: d,
            },
            mlp: GatedMlpConfig {
                hidden_size: h,
                intermediate_size: self.intermediate_size,
                activation: self.hidden_act,
                bias: self.mlp_bias,
                quantization: self.quantization,
            }
            .init(device),
            input_layernorm: norm.init(device),
            post_attention_layernorm: norm.init(device),
        }
    }

    /// The output projection `[hidden, vocab]`, for checkpoints that have one or whose tied one
    /// is quantized (then a copy of the embeddings, in 8 bits: the output is where 4 bits lose the
    /// most, as llama.cpp also keeps it wider).
    pub fn lm_head(&self, device: &Device) -> Option<Linear> {
        let quantization = self.quantization.map(|_| QuantKind::Q8);
        (!self.tie_word_embeddings || quantization.is_some())
            .then(|| LinearConfig::new(self.hidden_size, self.vocab_size, false).quantized(quantization).init(device))
    }

    /// An empty KV cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        KvCache::new(self.num_hidden_layers, batch, self.num_key_value_heads, self.head_dim, capacity)
            .with_sliding_window(self.sliding_window)
    }
}

/// Token embedding table (`nn.Embedding`).
#[derive(Module, Debug)]
pub struct Embedding {
    /// `[vocab, hidden]`
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    /// # Shapes
    /// - ids: `[batch, seq_len]`
    /// - output: `[batch, seq_len, hidden]`
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        burn::tensor::module::embedding(self.weight.val(), ids)
    }

    /// Logits with the table as output projection (a tied `lm_head`).
    ///
    /// # Shapes
    /// - hidden: `[batch, seq_len, hidden]`
    /// - output: `[batch, seq_len, vocab]`
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let [batch, seq_len, width] = hidden.dims();
        let table = self.weight.val(); // [vocab, hidden]
        let vocab = table.dims()[0];
        let hidden = hidden.reshape([batch * seq_len, width]);
        if let Some(logits) = crate::nn::gemv::times_transposed(&hidden, &table) {
            return logits.reshape([batch, seq_len, vocab]);
        }
        // `table · hidden^T` reads the table row by row, as stored; `hidden · table^T` would read it
        // through a transposed view, several times slower on the CPU backend.
        let logits = table.matmul(hidden.transpose()); // [vocab, batch * seq_len]
        logits.transpose().reshape([batch, seq_len, vocab])
    }

    /// Looks up rows of token ids, checking that they form a non-empty rectangle and stay inside
    /// a vocabulary of `vocab`.
    ///
    /// # Shapes
    /// - output: `[batch, seq_len, hidden]`
    pub fn lookup(&self, ids: &[Vec<u32>], vocab: usize) -> Result<Tensor<3>> {
        let batch = ids.len();
        let seq_len = ids.first().map_or(0, Vec::len);
        if batch == 0 || seq_len == 0 || ids.iter().any(|row| row.len() != seq_len) {
            return Err(Error::Input("token ids must be a non-empty rectangle".into()));
        }
        if let Some(&bad) = ids.iter().flatten().find(|&&id| id as usize >= vocab) {
            return Err(Error::Input(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let flat: Vec<i64> = ids.iter().flatten().map(|&id| i64::from(id)).collect();
        let ids = Tensor::<1, Int>::from_data(flat.as_slice(), &self.weight.lazy_device()).reshape([batch, seq_len]);
        Ok(self.forward(ids))
    }
}

/// The decoder stack without the output projection (transformers' `Qwen2Model`).
#[derive(Module, Debug)]
pub struct TextModel {
    /// Token embeddings.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    #[module(skip)]
    rope: RotaryEmbedding,
    #[module(skip)]
    config: TextConfig,
}

impl TextModel {
    /// The configuration the model was built from.
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// The device holding the weights.
    pub fn device(&self) -> Device {
        self.embed_tokens.weight.lazy_device()
    }

    /// Looks up token embeddings, checking ids against the vocabulary.
    ///
    /// # Shapes
    /// - output: `[batch, seq_len, hidden]`
    pub fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>> {
        self.embed_tokens.lookup(ids, self.config.vocab_size)
    }

    /// Runs the decoder over new tokens, appending their keys and values to `cache`; positions
    /// follow from the cache.
    ///
    /// # Shapes
    /// - inputs_embeds: `[batch, seq_len, hidden]`
    /// - output: `[batch, seq_len, hidden]` (after the final norm)
    pub fn forward(&self, inputs_embeds: Tensor<3>, cache: &mut KvCache) -> Result<Tensor<3>> {
        self.forward_multimodal(inputs_embeds, cache, None, None)
    }

    /// [`forward`](Self::forward) with three position rows per token (`[batch][seq_len]`, for a
    /// Qwen-VL prompt; `None` follows the cache, three equal rows) and, for Qwen3-VL's DeepStack,
    /// vision features added to the output of the first layers at the image tokens.
    ///
    /// # Shapes
    /// - inputs_embeds: `[batch, seq_len, hidden]`
    /// - output: `[batch, seq_len, hidden]` (after the final norm)
    pub fn forward_multimodal(
        &self,
        inputs_embeds: Tensor<3>,
        cache: &mut KvCache,
        positions: Option<&[Vec<[usize; 3]>]>,
        deepstack: Option<&DeepStack>,
    ) -> Result<Tensor<3>> {
        let [batch, seq_len, width] = inputs_embeds.dims();
        if batch != cache.batch_size() {
            return Err(Error::Input(format!(
                "a batch of {batch} sequences with a KV cache for {}",
                cache.batch_size()
            )));
        }
        cache.check_room(seq_len)?;
        let device = inputs_embeds.device();
        let rope = match (positions, self.config.mrope) {
            (Some(positions), Some(layout)) => {
                if positions.len() != batch || positions.iter().any(|row| row.len() != seq_len) {
                    return Err(Error::Input(format!("positions for a batch of {batch} x {seq_len} tokens")));
                }
                self.rope.multimodal_tables(positions, layout, &device)
            }
            (Some(_), None) => return Err(Error::Input("three position rows for a decoder without M-RoPE".into())),
            (None, _) => self.rope.tables(&cache.positions(seq_len), &device),
        }
        .in_dtype(inputs_embeds.dtype());
        let mask = cache.mask(seq_len, &device);
        let mut hidden = inputs_embeds;
        for (index, layer) in self.layers.iter().enumerate() {
            let attn_in = layer.input_layernorm.forward(hidden.clone());
            let attn = layer.self_attn.forward(attn_in, &rope, mask.clone(), cache, index)?;
            hidden = hidden + attn;
            let mlp = layer.mlp.forward(layer.post_attention_layernorm.forward(hidden.clone()));
            hidden = hidden + mlp;
            if let Some(deepstack) = deepstack
                && let Some(features) = deepstack.features.get(index)
            {
                let rows = hidden.reshape([batch * seq_len, width]);
                hidden = deepstack.add_to(rows, features.clone()).reshape([batch, seq_len, width]);
            }
        }
        cache.advance(seq_len);
        Ok(self.norm.forward(hidden))
    }

    /// Logits with the embedding table as output projection (tied `lm_head`).
    ///
    /// # Shapes
    /// - hidden: `[batch, seq_len, hidden]`
    /// - output: `[batch, seq_len, vocab]`
    pub fn tied_logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        self.embed_tokens.logits(hidden)
    }
}

/// Qwen3-VL's DeepStack: for each of the first layers, vision features added to that layer's output
/// at the image tokens (`_deepstack_process`).
#[derive(Debug, Clone)]
pub struct DeepStack {
    /// Per layer, `[visual_tokens, hidden]`, in the order of `rows`.
    pub features: Vec<Tensor<2>>,
    /// The flat (row-major over batch and sequence) positions of the visual tokens.
    pub rows: Vec<usize>,
}

impl DeepStack {
    /// `hidden[rows] += features`.
    ///
    /// # Shapes
    /// - hidden: `[batch * seq_len, width]`, features: `[rows.len(), width]`
    fn add_to(&self, hidden: Tensor<2>, features: Tensor<2>) -> Tensor<2> {
        let device = hidden.device();
        let indices: Vec<i64> = self.rows.iter().map(|&row| row as i64).collect();
        let indices = Tensor::<1, Int>::from_data(TensorData::new(indices, [self.rows.len()]), &device);
        let dtype = hidden.dtype();
        hidden.select_assign(0, indices, features.cast(dtype), IndexingUpdateOp::Add)
    }
}

/// One pre-norm decoder layer (`Qwen2DecoderLayer`).
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Grouped-query self-attention.
    pub self_attn: SelfAttention,
    /// Gated MLP.
    pub mlp: GatedMlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

/// Causal grouped-query attention with RoPE and a KV cache (`Qwen2Attention`).
#[derive(Module, Debug)]
pub struct SelfAttention {
    /// `[heads * head_dim, hidden]`
    pub q_proj: Linear,
    /// `[kv_heads * head_dim, hidden]`
    pub k_proj: Linear,
    /// `[kv_heads * head_dim, hidden]`
    pub v_proj: Linear,
    /// `[hidden, heads * head_dim]`
    pub o_proj: Linear,
    /// RMSNorm over each query head (Qwen3).
    pub q_norm: Option<RmsNorm>,
    /// RMSNorm over each key head (Qwen3).
    pub k_norm: Option<RmsNorm>,
    #[module(skip)]
    num_heads: usize,
    #[module(skip)]
    num_kv_heads: usize,
    #[module(skip)]
    head_dim: usize,
}

impl SelfAttention {
    /// Attends the new tokens to everything in `cache` (after writing their keys and values there).
    ///
    /// # Shapes
    /// - x: `[batch, seq_len, hidden]`
    /// - output: `[batch, seq_len, hidden]`
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        mask: AttentionMask,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor<3>> {
        let [batch, seq_len, _] = x.dims();
        let head_dim = self.head_dim;
        // [batch, seq_len, heads * head_dim] -> [batch, heads, seq_len, head_dim]
        let split = |t: Tensor<3>, heads: usize, norm: &Option<RmsNorm>| {
            let t = t.reshape([batch, seq_len, heads, head_dim]);
            let t = match norm {
                Some(norm) => norm.forward(t),
                None => t,
            };
            t.swap_dims(1, 2)
        };
        let q = rope.apply(split(self.q_proj.forward(x.clone()), self.num_heads, &self.q_norm));
        let k = rope.apply(split(self.k_proj.forward(x.clone()), self.num_kv_heads, &self.k_norm));
        let v = split(self.v_proj.forward(x), self.num_kv_heads, &None);
        let (k, v) = cache.update(layer, k, v)?;
        let scale = (head_dim as f64).powf(-0.5);
        let out = scaled_dot_product_attention(q, k, v, mask, scale);
        // [batch, heads, seq_len, head_dim] -> [batch, seq_len, heads * head_dim]
        let out = out.swap_dims(1, 2).reshape([batch, seq_len, self.num_heads * head_dim]);
        Ok(self.o_proj.forward(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_scaling_stretches_the_context() {
        let mut config = TextConfig { max_position_embeddings: 1000, ..TextConfig::tiny() };
        assert_eq!(config.context_length(), 1000);
        config.rope_scaling = RopeScaling::Dynamic { factor: 2.0 };
        assert_eq!(config.context_length(), 2000);
        config.rope_scaling = RopeScaling::Linear { factor: 4.0 };
        assert_eq!(config.context_length(), 4000);
        config.rope_scaling = RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 500.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.0,
            truncate: true,
        };
        assert_eq!(config.context_length(), 2000);
        config.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 100.0,
        };
        assert_eq!(config.context_length(), 1000);
    }
}
