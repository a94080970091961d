//! Where each model parameter is found in a checkpoint: one table per family, one line per rule.
//!
//! Parameter names are canonical: the crate's module paths, which follow transformers' current
//! in-memory names without the `model.` prefix (`vision_tower.*`, `visual.*`,
//! `language_model.*`, `lm_head.*`).

pub mod internvl;
pub mod llava;
pub mod nemotron;
pub mod qwen_vl;

/// A place in the checkpoint that fills one parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Checkpoint tensor name.
    pub name: String,
    /// Which of its rows (dim 0).
    pub rows: Rows,
}

/// Which rows of a stored tensor fill a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// All of them.
    All,
    /// Block `index` of `count` equal blocks (q, k and v fused one after the other).
    Block {
        /// Which block.
        index: usize,
        /// How many blocks.
        count: usize,
    },
    /// Rows `offset..offset + take` of each of `groups` groups of `group_rows` rows, concatenated
    /// (q, k and v interleaved per key/value group, as InternLM2's `wqkv`).
    Strided {
        /// Groups (key/value heads).
        groups: usize,
        /// Rows per group.
        group_rows: usize,
        /// First row taken in each group.
        offset: usize,
        /// Rows taken from each group.
        take: usize,
    },
}

impl Rows {
    /// Rows the stored tensor has when the parameter has `rows`.
    pub fn stored(self, rows: usize) -> usize {
        match self {
            Rows::All => rows,
            Rows::Block { count, .. } => rows * count,
            Rows::Strided { groups, group_rows, .. } => groups * group_rows,
        }
    }

    /// Rows the parameter has when the stored tensor has `stored` (the inverse of
    /// [`stored`](Self::stored)).
    pub fn parameter(self, stored: usize) -> usize {
        match self {
            Rows::All => stored,
            Rows::Block { count, .. } => stored / count.max(1),
            Rows::Strided { groups, take, .. } => groups * take,
        }
    }

    /// The row ranges taken, in order, when the parameter has `rows` rows.
    #[allow(clippy::single_range_in_vec_init)] // a list of ranges, of which there can be one
    pub fn ranges(self, rows: usize) -> Vec<std::ops::Range<usize>> {
        match self {
            Rows::All => vec![0..rows],
            Rows::Block { index, .. } => vec![index * rows..(index + 1) * rows],
            Rows::Strided { groups, group_rows, offset, take } => {
                (0..groups).map(|group| group * group_rows + offset..group * group_rows + offset + take).collect()
            }
        }
    }
}

/// A substring rewrite from canonical to checkpoint names; `^` anchors it at the start.
pub(crate) struct Rename(pub &'static str, pub &'static str);

pub(crate) fn whole(name: String) -> Source {
    Source { name, rows: Rows::All }
}

pub(crate) fn rename(name: &str, rules: &[Rename]) -> String {
    let mut name = name.to_string();
    for Rename(from, to) in rules {
        match from.strip_prefix('^') {
            Some(prefix) => {
                if let Some(rest) = name.strip_prefix(prefix) {
                    name = format!("{to}{rest}");
                }
            }
            None => name = name.replacen(from, to, 1),
        }
    }
    name
}
