//! Splitting a benchmark over several processes: shard `I` of `N` takes the items at positions
//! `I, I + N, I + 2N, ...` of the benchmark file, so every item lands in exactly one shard and the
//! shards differ in size by at most one.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// One part of a benchmark split into `count` parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 0-based, below `count`.
    pub index: usize,
    /// How many shards the benchmark is split into (at least 1).
    pub count: usize,
}

impl Shard {
    /// The whole benchmark.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`.
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(Error::Input(format!("shard {index}/{count}: the index must be below the count (0-based)")));
        }
        Ok(Self { index, count })
    }

    /// The shard of a Slurm job-array task, from `SLURM_ARRAY_TASK_ID`, `SLURM_ARRAY_TASK_COUNT`,
    /// `SLURM_ARRAY_TASK_MIN` (default 0) and `SLURM_ARRAY_TASK_STEP` (default 1), read through
    /// `var`; `None` outside a job array. An array `--array=1-8` gives shards 0/8 to 7/8.
    pub fn from_slurm(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|value| {
                    value.trim().parse::<usize>().map_err(|_| Error::Input(format!("{name}={value} is not a number")))
                })
                .transpose()
        };
        let (Some(id), Some(count)) = (number("SLURM_ARRAY_TASK_ID")?, number("SLURM_ARRAY_TASK_COUNT")?) else {
            return Ok(None);
        };
        let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        if id < min || (id - min) % step != 0 {
            return Err(Error::Input(format!(
                "SLURM_ARRAY_TASK_ID={id} is not in the array {min}..(step {step}) that SLURM_ARRAY_TASK_MIN/STEP describe"
            )));
        }
        Self::new((id - min) / step, count).map(Some)
    }

    /// The shard from the process environment's Slurm variables; `None` outside a job array.
    pub fn from_slurm_env() -> Result<Option<Self>> {
        Self::from_slurm(|name| std::env::var(name).ok())
    }

    /// Whether the item at `position` (0-based, in benchmark order) belongs to this shard.
    pub fn contains(&self, position: usize) -> bool {
        position % self.count == self.index
    }

    /// The file-name tag of this shard's outputs: `3-of-8`.
    pub fn tag(&self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = Error;

    /// Parses `I/N` (0-based `I`).
    fn from_str(text: &str) -> Result<Self> {
        let parse = |part: &str| part.trim().parse::<usize>().ok();
        match text.split_once('/').map(|(index, count)| (parse(index), parse(count))) {
            Some((Some(index), Some(count))) => Self::new(index, count),
            _ => Err(Error::Input(format!("shard {text:?}: expected I/N, e.g. 0/4"))),
        }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_item_exactly_once() {
        for items in [0, 1, 7, 100, 101] {
            for count in [1, 2, 3, 8, 16, 150] {
                let mut seen = vec![0; items];
                for index in 0..count {
                    let shard = Shard::new(index, count).unwrap();
                    (0..items).filter(|&p| shard.contains(p)).for_each(|p| seen[p] += 1);
                    let size = (0..items).filter(|&p| shard.contains(p)).count();
                    assert!(size == items / count || size == items / count + 1, "shards are balanced");
                }
                assert!(seen.iter().all(|&n| n == 1), "{items} items, {count} shards: {seen:?}");
            }
        }
    }

    #[test]
    fn parses_index_over_count() {
        assert_eq!("2/4".parse::<Shard>().unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1/0", "a/2", "3", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn slurm_array_variables_give_the_shard() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(key, _)| *key == name).map(|(_, value)| value.to_string())
        };
        assert_eq!(Shard::from_slurm(env(&[])).unwrap(), None);
        let zero_based = env(&[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "2")]);
        assert_eq!(Shard::from_slurm(zero_based).unwrap(), Some(Shard { index: 1, count: 2 }));
        let one_based = env(&[
            ("SLURM_ARRAY_TASK_ID", "8"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "8"),
        ]);
        assert_eq!(Shard::from_slurm(one_based).unwrap(), Some(Shard { index: 7, count: 8 }));
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        assert_eq!(Shard::from_slurm(stepped).unwrap(), Some(Shard { index: 2, count: 3 }));
        let garbage = env(&[("SLURM_ARRAY_TASK_ID", "x"), ("SLURM_ARRAY_TASK_COUNT", "2")]);
        assert!(Shard::from_slurm(garbage).is_err());
    }
}
