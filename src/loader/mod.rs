//! Loading checkpoints: `config.json`, safetensors weights in either layout, and the few
//! tokenizer facts the model itself needs. The only code that knows checkpoint tensor names.

pub mod hub;
pub mod layout;
pub mod safetensors;

use std::collections::BTreeSet;
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, FloatDType, Int, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

pub use self::hub::{HubOptions, resolve};
pub use self::layout::Source;
pub use self::safetensors::WeightFiles;
use crate::config::{CheckpointConfig, FamilyConfig, InternVlCheckpoint};
use crate::error::{Error, Result};
use crate::models::{InternVlModel, Model};
use crate::nn::quant::{PackedWeight, QuantKind};
use crate::vision::RadioVisionConfig;

/// How a checkpoint is loaded, beyond what its files say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Quantize the decoder's linear layers to this grid as they are read (the output
    /// projection to 8 bits; the vision tower and projector stay in the model's dtype). `None`
    /// keeps every weight in the device's float dtype.
    pub quantize: Option<QuantKind>,
}

/// Loads a model of any supported family from a local checkpoint directory: `config.json`, the
/// weights, and the few tokenizer facts the model itself needs.
pub fn load(dir: &Path, device: &Device) -> Result<(CheckpointConfig, Model)> {
    load_with(dir, device, &LoadOptions::default())
}

/// [`load`] with options (quantization).
pub fn load_with(dir: &Path, device: &Device, options: &LoadOptions) -> Result<(CheckpointConfig, Model)> {
    let mut config = CheckpointConfig::from_file(&dir.join("config.json"))?;
    config.set_quantization(options.quantize);
    let files = WeightFiles::open(dir)?;
    let config_path = dir.join("config.json");
    // A quantized model keeps an 8-bit copy of tied embeddings as its output projection.
    let quantized_tied_head = options.quantize.is_some() && config.tie_word_embeddings();
    let head = |canonical: &str| -> String {
        if quantized_tied_head && canonical == "lm_head.weight" {
            "language_model.embed_tokens.weight".into()
        } else {
            canonical.into()
        }
    };
    let model = match &mut config.family {
        FamilyConfig::InternVl(checkpoint) => {
            resolve_image_token(dir, checkpoint)?;
            let model = &checkpoint.model;
            let layers = model.vision.num_hidden_layers as u128 + model.text.num_hidden_layers as u128;
            check_size(model.min_parameters(), layers, &files, &config_path)?;
            let text = model.text.clone();
            let sources = |canonical: &str| layout::internvl::sources(checkpoint.layout, &head(canonical), &text);
            let tied = if text.tie_word_embeddings { INTERNVL_STORED_LM_HEADS } else { &[] };
            Model::InternVl(fill(model.init(device), &files, &sources, tied, device)?)
        }
        FamilyConfig::QwenVl(checkpoint) => {
            let model = &checkpoint.model;
            let layers = model.vision.depth as u128 + model.text.num_hidden_layers as u128;
            check_size(model.min_parameters(), layers, &files, &config_path)?;
            let sources = |canonical: &str| layout::qwen_vl::sources(model.variant, &head(canonical));
            let tied: &[&str] = if model.text.tie_word_embeddings { &["lm_head.weight"] } else { &[] };
            Model::QwenVl(fill(model.init(device), &files, &sources, tied, device)?)
        }
        FamilyConfig::Llava(checkpoint) => {
            let model = &checkpoint.model;
            let layers = model.vision.num_hidden_layers() as u128 + model.text.num_hidden_layers as u128;
            check_size(model.min_parameters(), layers, &files, &config_path)?;
            let mut ignored = layout::llava::IGNORED.to_vec();
            if model.text.tie_word_embeddings {
                ignored.extend(["language_model.lm_head.weight", "lm_head.weight"]);
            }
            let sources = |canonical: &str| layout::llava::sources(&head(canonical));
            Model::Llava(fill(model.init(device), &files, &sources, &ignored, device)?)
        }
        FamilyConfig::NemotronOmni(checkpoint) => {
            settle_radio(&mut checkpoint.model.vision, &files, &config_path)?;
            let model = &checkpoint.model;
            let layers = model.vision.num_hidden_layers as u128 + model.text.layers.len() as u128;
            check_size(model.min_parameters(), layers, &files, &config_path)?;
            let ignored: Vec<&str> = files.names().filter(|name| layout::nemotron::is_ignored(name)).collect();
            Model::NemotronOmni(fill(model.init(device), &files, &layout::nemotron::omni_sources, &ignored, device)?)
        }
    };
    Ok((config, model))
}

/// Loads an InternVL-family checkpoint as its concrete model type.
pub fn load_internvl(dir: &Path, device: &Device) -> Result<(CheckpointConfig, InternVlModel)> {
    let (config, model) = load(dir, device)?;
    match model {
        Model::InternVl(model) => Ok((config, model)),
        _ => Err(Error::UnsupportedArchitecture {
            path: dir.join("config.json"),
            architectures: vec![format!("{:?}", config.architecture)],
            supported: "InternVL-family architectures (use loader::load for any family)".into(),
        }),
    }
}

/// Reads what the RADIO tower's shape leaves to the weights: its prefix tokens (CLS and registers),
/// the side of its position table (remote-code configs do not state them) and whether its blocks
/// have layer scales (the published checkpoint's do not).
fn settle_radio(vision: &mut RadioVisionConfig, files: &WeightFiles, path: &Path) -> Result<()> {
    let shape = |name: &str| files.get(&format!("{}{name}", layout::nemotron::RADIO)).map(|entry| entry.shape.clone());
    if let Some(shape) = shape("patch_generator.cls_token.token") {
        vision.prefix_tokens = shape[0];
    }
    if let Some(shape) = shape("patch_generator.pos_embed") {
        let cells = shape.get(1).copied().unwrap_or(0);
        let side = cells.isqrt();
        if side == 0 || side * side != cells {
            return Err(Error::config(
                path,
                format!("the RADIO position table holds {cells} cells, not a square grid"),
            ));
        }
        vision.position_grid = side;
    }
    vision.layer_scale = shape("blocks.0.layer_scale1.lambda1").is_some();
    Ok(())
}

/// Where an InternVL checkpoint may store a tied `lm_head` anyway (never used).
const INTERNVL_STORED_LM_HEADS: &[&str] =
    &["language_model.lm_head.weight", "lm_head.weight", "language_model.output.weight"];

/// OpenGVLab checkpoints do not name their image-context token id in config.json: it comes from
/// `tokenizer.json`, or for SentencePiece checkpoints (InternLM2) from `tokenizer_config.json`.
fn resolve_image_token(dir: &Path, checkpoint: &mut InternVlCheckpoint) -> Result<()> {
    if checkpoint.model.image_token_id.is_some() {
        return Ok(());
    }
    let token = checkpoint.model.variant.image_context_token();
    checkpoint.model.image_token_id = match added_token_id(&dir.join("tokenizer.json"), token)? {
        Some(id) => Some(id),
        None => crate::processing::tokenizer::TokenizerConfig::from_dir(dir)?
            .added_tokens()?
            .into_iter()
            .find_map(|(id, content)| (content == token).then_some(id)),
    };
    Ok(())
}

/// Refuses a configuration that describes a model bigger than its weight files (`needed`
/// parameters at least, `layers` layers), before anything is allocated for it: a typo'd or hostile
/// `hidden_size` must be an error, not an abort.
fn check_size(needed: u128, layers: u128, files: &WeightFiles, path: &Path) -> Result<()> {
    let held = files.total_elements() as u128;
    if needed > held {
        return Err(Error::config(
            path,
            format!("it describes a model of at least {needed} parameters, but the weight files hold {held} values"),
        ));
    }
    let tensors = files.names().count() as u128;
    if layers > tensors {
        return Err(Error::config(
            path,
            format!("it describes {layers} layers, but the weight files hold {tensors} tensors"),
        ));
    }
    Ok(())
}

/// Replaces every parameter of `model` with its checkpoint tensor, found through `sources`
/// (canonical parameter name -> candidate places in the checkpoint, most likely first). Fails on a
/// shape mismatch, on parameters left unfilled and on checkpoint tensors left unused, except the
/// `tied` ones (an `lm_head` stored although tied to the embeddings).
pub fn fill<M: Module>(
    model: M,
    files: &WeightFiles,
    sources: &dyn Fn(&str) -> Vec<Source>,
    tied: &[&str],
    device: &Device,
) -> Result<M> {
    let progress = ProgressBar::new(files.total_bytes() as u64).with_style(
        ProgressStyle::with_template("loading weights {bar:40} {bytes}/{total_bytes} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut filler = Filler {
        files,
        sources,
        device: device.clone(),
        dtype: device.settings().float_dtype,
        path: Vec::new(),
        containers: Vec::new(),
        used: BTreeSet::new(),
        missing: Vec::new(),
        error: None,
        pending_scales: None,
        progress: &progress,
    };
    let model = model.map(&mut filler);
    progress.finish_and_clear();
    if let Some(error) = filler.error {
        return Err(error);
    }
    let mut used = filler.used;
    for name in tied.iter().filter(|name| files.get(name).is_some()) {
        log::debug!("ignoring {name}: the output projection is tied to the embeddings");
        used.insert(name.to_string());
    }
    let unused: Vec<String> = files.names().filter(|name| !used.contains(*name)).map(String::from).collect();
    if !filler.missing.is_empty() || !unused.is_empty() {
        return Err(Error::Weights { missing: filler.missing, unused });
    }
    Ok(model)
}

/// A layer's weight as read and quantized: its packed values and its scales.
struct QuantizedLayer {
    /// Canonical name of the weight (`<layer>.weight`).
    layer: String,
    values: Vec<u8>,
    scales: Vec<f32>,
}

/// Walks the module tree, tracking the canonical parameter path, and swaps in checkpoint tensors.
struct Filler<'a> {
    files: &'a WeightFiles,
    sources: &'a dyn Fn(&str) -> Vec<Source>,
    device: Device,
    dtype: FloatDType,
    /// Path segments of the module being visited.
    path: Vec<String>,
    /// Type of the module each entered field belongs to (`Struct:Linear`, `Enum:Norm`, ...).
    containers: Vec<String>,
    /// Checkpoint tensors consumed so far.
    used: BTreeSet<String>,
    /// Canonical names of parameters no tensor was found for.
    missing: Vec<String>,
    /// The first hard error (shape or dtype); later parameters are skipped.
    error: Option<Error>,
    /// Scales of the quantized weight whose values were just read, by layer.
    pending_scales: Option<(String, Vec<f32>)>,
    progress: &'a ProgressBar,
}

impl Filler<'_> {
    /// Whether the parameter being visited is a [`Linear`](crate::nn::Linear) weight, which checkpoints store as
    /// `[d_output, d_input]` and the layer keeps transposed.
    fn at_linear_weight(&self) -> bool {
        self.containers.last().is_some_and(|c| c == "Enum:LinearWeight")
            && self.path.last().is_some_and(|n| n == "weight")
    }

    /// Whether the parameter being visited is `values` / `scales` of a
    /// [`QuantizedWeight`](crate::nn::linear::QuantizedWeight): both come from the one checkpoint
    /// weight of the layer, quantized as it is read.
    fn at_quantized(&self, field: &str) -> bool {
        self.containers.last().is_some_and(|c| c == "Struct:QuantizedWeight")
            && self.path.last().is_some_and(|n| n == field)
    }

    /// Reads the layer's checkpoint weight (`<layer>.weight`) and quantizes it to the grid that
    /// a packed buffer of `values_len` bytes implies; returns the packed values and the scales.
    fn load_quantized(&mut self, values_len: usize) -> Result<Option<QuantizedLayer>> {
        let canonical = self.path[..self.path.len() - 1].join(".");
        let sources = (self.sources)(&canonical);
        let Some(source) = sources.into_iter().find(|s| self.files.get(&s.name).is_some()) else {
            self.missing.push(canonical);
            return Ok(None);
        };
        let entry = self.files.get(&source.name).expect("source was found above");
        let &[stored_rows, d_input] = entry.shape.as_slice() else {
            return Err(Error::ShapeMismatch { name: source.name, expected: vec![0, 0], found: entry.shape.clone() });
        };
        let d_output = source.rows.parameter(stored_rows);
        let kind = [QuantKind::Q8, QuantKind::Q4].into_iter().find(|&kind| {
            kind.fits(d_input, d_output) && PackedWeight::values_len(kind, d_input, d_output) == values_len
        });
        let ranges = source.rows.ranges(d_output);
        let (Some(kind), true) = (kind, ranges.iter().map(|r| r.len()).sum::<usize>() == d_output) else {
            return Err(Error::ShapeMismatch {
                name: source.name,
                expected: vec![values_len],
                found: entry.shape.clone(),
            });
        };
        let data = self.files.read_rows(&source.name, &ranges, FloatDType::F32, true)?;
        let weight = data
            .as_slice::<f32>()
            .map_err(|e| Error::Weights { missing: vec![format!("{}: {e:?}", source.name)], unused: vec![] })?;
        let packed = PackedWeight::quantize(kind, weight, d_input, d_output);
        self.progress.inc((d_input * d_output) as u64 * entry_bytes(entry));
        self.used.insert(source.name);
        Ok(Some(QuantizedLayer {
            layer: canonical,
            values: packed.values.into_owned(),
            scales: packed.scales.into_owned(),
        }))
    }

    fn load<const D: usize>(&mut self, expected: [usize; D]) -> Result<Option<Tensor<D>>> {
        let canonical = self.path.join(".");
        let transpose = self.at_linear_weight();
        let sources = (self.sources)(&canonical);
        let Some(source) = sources.into_iter().find(|s| self.files.get(&s.name).is_some()) else {
            self.missing.push(canonical);
            return Ok(None);
        };
        let entry = self.files.get(&source.name).expect("source was found above");
        let mut stored_expected = expected.to_vec();
        if transpose {
            stored_expected.reverse();
        }
        let rows = stored_expected[0];
        stored_expected[0] = source.rows.stored(rows);
        let ranges = source.rows.ranges(rows);
        if entry.shape != stored_expected || ranges.iter().map(|r| r.len()).sum::<usize>() != rows {
            return Err(Error::ShapeMismatch {
                name: source.name,
                expected: stored_expected,
                found: entry.shape.clone(),
            });
        }
        let data = self.files.read_rows(&source.name, &ranges, self.dtype, transpose)?;
        self.progress.inc(data.num_elements() as u64 * entry_bytes(entry));
        self.used.insert(source.name);
        Ok(Some(Tensor::from_data(data, &self.device)))
    }
}

fn entry_bytes(entry: &self::safetensors::TensorEntry) -> u64 {
    match entry.dtype {
        ::safetensors::Dtype::F32 => 4,
        _ => 2,
    }
}

impl ModuleMapper for Filler<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.containers.push(container_type.to_string());
        // Enum variants (e.g. `Norm::LayerNorm`) are not part of checkpoint names.
        if !container_type.starts_with("Enum:") {
            self.path.push(name.to_string());
        }
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.containers.pop();
        if !container_type.starts_with("Enum:") {
            self.path.pop();
        }
    }

    fn map_int<const D: usize>(&mut self, param: Param<Tensor<D, Int>>) -> Param<Tensor<D, Int>> {
        if self.error.is_some() || !self.at_quantized("values") {
            return param;
        }
        match self.load_quantized(param.lazy_shape().num_elements()) {
            Ok(Some(QuantizedLayer { layer, values, scales })) => {
                let values = crate::nn::linear::bytes_tensor(values, &self.device);
                self.pending_scales = Some((layer, scales));
                Param::initialized(param.id, values.reshape(param.lazy_shape()))
            }
            Ok(None) => param,
            Err(error) => {
                self.error = Some(error);
                param
            }
        }
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        if self.at_quantized("scales") {
            let layer = self.path[..self.path.len() - 1].join(".");
            return match self.pending_scales.take() {
                Some((pending, scales)) if pending == layer && scales.len() == param.lazy_shape().num_elements() => {
                    let scales = crate::nn::linear::f32_tensor(scales, &self.device);
                    Param::initialized(param.id, scales.reshape(param.lazy_shape()))
                }
                // The values were missing (already reported under the layer's weight), or a
                // module visited its scales first.
                _ => {
                    if self.missing.last() != Some(&layer) {
                        self.missing.push(format!("{layer}.scales"));
                    }
                    param
                }
            };
        }
        let expected: [usize; D] = param.lazy_shape().dims();
        match self.load(expected) {
            Ok(Some(tensor)) => Param::initialized(param.id, tensor),
            Ok(None) => param,
            Err(error) => {
                self.error = Some(error);
                param
            }
        }
    }
}

/// The id of an added (special) token in `tokenizer.json`, if the file exists and has it.
pub fn added_token_id(path: &Path, content: &str) -> Result<Option<u32>> {
    #[derive(serde::Deserialize)]
    struct AddedToken {
        id: u32,
        content: String,
    }
    #[derive(serde::Deserialize)]
    struct TokenizerJson {
        #[serde(default)]
        added_tokens: Vec<AddedToken>,
    }
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let tokenizer: TokenizerJson =
        serde_json::from_str(&text).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    Ok(tokenizer.added_tokens.into_iter().find(|t| t.content == content).map(|t| t.id))
}
