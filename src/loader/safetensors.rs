//! Memory-mapped safetensors checkpoints, single-file or sharded
//! (`model.safetensors.index.json`), with every header validated up front.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{Element, FloatDType, TensorData};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Index into the shard list.
    file: usize,
    /// Stored element type.
    pub dtype: Dtype,
    /// Stored shape.
    pub shape: Vec<usize>,
    /// Byte range within the file.
    range: std::ops::Range<usize>,
}

/// All tensors of a checkpoint, by name.
pub struct WeightFiles {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    tensors: BTreeMap<String, TensorEntry>,
}

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

impl WeightFiles {
    /// Opens `model.safetensors.index.json` and its shards if present, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: Index =
                serde_json::from_str(&text).map_err(|source| Error::Json { path: index_path.clone(), source })?;
            let mut shards: Vec<&String> = index.weight_map.values().collect();
            shards.sort();
            shards.dedup();
            if let Some(outside) = shards.iter().find(|name| !is_plain_relative(name)) {
                return Err(Error::Safetensors {
                    path: index_path.clone(),
                    reason: format!("shard {outside:?} is not a file inside the checkpoint directory"),
                });
            }
            let files = Self::open_files(shards.iter().map(|name| dir.join(name)).collect())?;
            // Every tensor the index promises must be in the shard it names.
            for (name, shard) in &index.weight_map {
                let found = files.tensors.get(name).map(|entry| &files.paths[entry.file]);
                if found != Some(&dir.join(shard)) {
                    return Err(Error::Safetensors {
                        path: dir.join(shard),
                        reason: format!("{INDEX_FILE} places tensor {name} in this shard, but it is not there"),
                    });
                }
            }
            Ok(files)
        } else {
            Self::open_files(vec![dir.join(SINGLE_FILE)])
        }
    }

    /// Opens the given files as one checkpoint.
    pub fn open_files(paths: Vec<PathBuf>) -> Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut tensors = BTreeMap::new();
        for (file, path) in paths.iter().enumerate() {
            let handle = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; a checkpoint rewritten while mapped is the caller's
            // problem, as with any memory-mapped model file.
            let map = unsafe { Mmap::map(&handle) }.map_err(|e| Error::io(path, e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| Error::Safetensors { path: path.clone(), reason: e.to_string() })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                let entry = TensorEntry {
                    file,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    range: data_start + start..data_start + end,
                };
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(Error::Safetensors {
                        path: path.clone(),
                        reason: format!("tensor {name} is stored in more than one shard"),
                    });
                }
            }
            maps.push(map);
        }
        Ok(Self { paths, maps, tensors })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The entry for `name`, if the checkpoint has it.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// Total number of values in all tensors.
    pub fn total_elements(&self) -> usize {
        self.tensors.values().map(|entry| entry.shape.iter().product::<usize>()).sum()
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> usize {
        self.tensors.values().map(|entry| entry.range.len()).sum()
    }

    /// Decodes the given ranges of rows (dim 0) of a tensor, concatenated, converted to `dtype`
    /// (`[0..rows]` is the whole tensor). With `transpose`, the result (2-D) comes back with its
    /// two axes swapped.
    pub fn read_rows(
        &self,
        name: &str,
        rows: &[std::ops::Range<usize>],
        dtype: FloatDType,
        transpose: bool,
    ) -> Result<TensorData> {
        let entry =
            self.tensors.get(name).ok_or_else(|| Error::Weights { missing: vec![name.into()], unused: vec![] })?;
        let element = match entry.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => return Err(Error::UnsupportedDtype { name: name.into(), dtype: format!("{other:?}") }),
        };
        let bytes = &self.maps[entry.file][entry.range.clone()];
        let stored_rows = entry.shape.first().copied().unwrap_or(1);
        let row_bytes = bytes.len().checked_div(stored_rows).unwrap_or(0);
        if rows.iter().any(|r| r.start > r.end || r.end > stored_rows) {
            return Err(Error::Safetensors {
                path: self.paths[entry.file].clone(),
                reason: format!("rows {rows:?} of tensor {name}, which has {stored_rows}"),
            });
        }
        let selected: std::borrow::Cow<[u8]> = match rows {
            [range] => bytes[range.start * row_bytes..range.end * row_bytes].into(),
            _ => {
                rows.iter().flat_map(|range| &bytes[range.start * row_bytes..range.end * row_bytes]).copied().collect()
            }
        };
        let mut shape = entry.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = rows.iter().map(|r| r.len()).sum();
        }
        debug_assert_eq!(selected.len(), shape.iter().product::<usize>() * element);
        Ok(decode(&selected, entry.dtype, dtype, shape, transpose))
    }
}

/// Whether a shard name from the index stays inside the checkpoint directory: relative, with
/// no `..`, root or drive component (symbolic links, as in the Hub cache, are fine).
fn is_plain_relative(name: &str) -> bool {
    let path = Path::new(name);
    !name.is_empty() && path.components().all(|part| matches!(part, std::path::Component::Normal(_)))
}

/// Little-endian bytes of `source` type -> a tensor of the device's float type (`shape`, or its
/// transpose). The only place weights change precision.
fn decode(bytes: &[u8], source: Dtype, target: FloatDType, shape: Vec<usize>, transpose: bool) -> TensorData {
    let halves = |bytes: &[u8]| bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect::<Vec<_>>();
    let as_f32 = |bytes: &[u8]| -> Vec<f32> {
        match source {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => halves(bytes).into_iter().map(|h| f16::from_bits(h).to_f32()).collect(),
            _ => halves(bytes).into_iter().map(|h| bf16::from_bits(h).to_f32()).collect(),
        }
    };
    match (target, source) {
        (FloatDType::BF16, Dtype::BF16) => {
            tensor_data(halves(bytes).into_iter().map(bf16::from_bits).collect(), shape, transpose)
        }
        (FloatDType::F16, Dtype::F16) => {
            tensor_data(halves(bytes).into_iter().map(f16::from_bits).collect(), shape, transpose)
        }
        (FloatDType::BF16, _) => tensor_data(as_f32(bytes).into_iter().map(bf16::from_f32).collect(), shape, transpose),
        (FloatDType::F16, _) => tensor_data(as_f32(bytes).into_iter().map(f16::from_f32).collect(), shape, transpose),
        _ => tensor_data(as_f32(bytes), shape, transpose),
    }
}

fn tensor_data<E: Element>(values: Vec<E>, shape: Vec<usize>, transpose: bool) -> TensorData {
    if transpose { transposed(values, &shape) } else { TensorData::new(values, shape) }
}

/// A row-major `[rows, cols]` matrix as `[cols, rows]`, copied in square blocks that stay in cache.
fn transposed<E: Element>(values: Vec<E>, shape: &[usize]) -> TensorData {
    const BLOCK: usize = 64;
    let [rows, cols] = [shape[0], shape[1]];
    let mut out = values.clone();
    for row_start in (0..rows).step_by(BLOCK) {
        for col_start in (0..cols).step_by(BLOCK) {
            for row in row_start..(row_start + BLOCK).min(rows) {
                for col in col_start..(col_start + BLOCK).min(cols) {
                    out[col * rows + row] = values[row * cols + col];
                }
            }
        }
    }
    TensorData::new(out, [cols, rows])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_must_stay_inside_the_checkpoint() {
        for good in ["model-00001-of-00002.safetensors", "shards/part1.safetensors"] {
            assert!(is_plain_relative(good), "{good}");
        }
        for bad in ["../x.safetensors", "../../x.safetensors", "/etc/x.safetensors", "a/../../x", "", "./"] {
            assert!(!is_plain_relative(bad), "{bad}");
        }
    }

    #[test]
    fn transposed_swaps_axes_across_block_edges() {
        // 70 x 130 spans partial blocks on both axes.
        let (rows, cols) = (70, 130);
        let values: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let data = transposed(values, &[rows, cols]);
        assert_eq!(data.shape().to_vec(), vec![cols, rows]);
        let out = data.as_slice::<f32>().unwrap();
        for row in 0..rows {
            for col in 0..cols {
                assert_eq!(out[col * rows + row], (row * cols + col) as f32, "({row}, {col})");
            }
        }
    }

    #[test]
    fn decode_transposes_in_the_target_type() {
        let bytes: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let data = decode(&bytes, Dtype::F32, FloatDType::BF16, vec![2, 3], true);
        let expected: Vec<bf16> = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0].map(bf16::from_f32).to_vec();
        assert_eq!(data.as_slice::<bf16>().unwrap(), expected.as_slice());
        assert_eq!(data.shape().to_vec(), vec![3, 2]);
    }
}
