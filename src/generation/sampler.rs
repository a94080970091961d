//! Choosing the next token from logits: repetition penalty, then greedy or temperature / top-k /
//! top-p sampling (the order of transformers' logits processors).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::config::{GenerationConfig, GenerationDefaults};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// A random draw from the processed distribution.
    Sample {
        /// Divides the logits.
        temperature: f32,
        /// Keep this many most likely tokens (`0`: all).
        top_k: usize,
        /// Keep the most likely tokens up to this cumulative probability.
        top_p: f32,
    },
}

/// Picks tokens for one sequence; owns its random state so each sequence is reproducible alone.
#[derive(Debug)]
pub struct Sampler {
    sampling: Sampling,
    repetition_penalty: f32,
    rng: StdRng,
}

impl Sampler {
    /// The sampler a call's settings and the checkpoint's defaults describe.
    pub fn new(config: &GenerationConfig, defaults: &GenerationDefaults) -> Self {
        let sample = match config.temperature {
            Some(t) => t > 0.0,
            None => defaults.do_sample,
        };
        let sampling = if sample {
            Sampling::Sample {
                temperature: config.temperature.unwrap_or(defaults.temperature),
                top_k: config.top_k.unwrap_or(defaults.top_k),
                top_p: config.top_p.unwrap_or(defaults.top_p),
            }
        } else {
            Sampling::Greedy
        };
        Self {
            sampling,
            repetition_penalty: config.repetition_penalty.unwrap_or(defaults.repetition_penalty),
            // Unseeded sampling draws fresh entropy: two calls without a seed differ.
            rng: match config.seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_rng(&mut rand::rng()),
            },
        }
    }

    /// How tokens are chosen.
    pub fn sampling(&self) -> Sampling {
        self.sampling
    }

    /// The next token given the last position's logits and the sequence so far (prompt included).
    pub fn next_token(&mut self, logits: &mut [f32], previous: &[u32]) -> u32 {
        if self.repetition_penalty != 1.0 {
            apply_repetition_penalty(logits, previous, self.repetition_penalty);
        }
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Sample { temperature, top_k, top_p } => {
                let candidates = candidates(logits, temperature, top_k, top_p);
                let draw: f32 = self.rng.random();
                let mut cumulative = 0.0;
                for &(token, probability) in &candidates {
                    cumulative += probability;
                    if draw < cumulative {
                        return token;
                    }
                }
                candidates.last().map_or(0, |&(token, _)| token)
            }
        }
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each token already present once.
fn apply_repetition_penalty(logits: &mut [f32], previous: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &token in previous {
        let Some(flag) = seen.get_mut(token as usize) else { continue };
        if !*flag {
            *flag = true;
            let logit = &mut logits[token as usize];
            *logit = if *logit < 0.0 { *logit * penalty } else { *logit / penalty };
        }
    }
}

/// Index of the largest logit (the first on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &value) in logits.iter().enumerate() {
        if value > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `(token, probability)` after temperature, top-k and top-p, most likely first, summing to 1.
fn candidates(logits: &[f32], temperature: f32, top_k: usize, top_p: f32) -> Vec<(u32, f32)> {
    let mut sorted: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / temperature)).collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if top_k > 0 {
        sorted.truncate(top_k);
    }
    let max = sorted.first().map_or(0.0, |&(_, l)| l);
    let mut total = 0.0;
    for entry in &mut sorted {
        entry.1 = (entry.1 - max).exp();
        total += entry.1;
    }
    for entry in &mut sorted {
        entry.1 /= total;
    }
    // The smallest head whose probability reaches top_p (at least one token).
    let mut cumulative = 0.0;
    let keep = sorted
        .iter()
        .position(|&(_, p)| {
            cumulative += p;
            cumulative >= top_p
        })
        .map_or(sorted.len(), |i| i + 1);
    sorted.truncate(keep.max(1));
    let kept: f32 = sorted.iter().map(|&(_, p)| p).sum();
    for entry in &mut sorted {
        entry.1 /= kept;
    }
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut logits = [2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 0, 1], 2.0);
        assert_eq!(logits, [1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_and_top_p_keep_the_head_of_the_distribution() {
        let logits = [4.0f32, 3.0, 2.0, 1.0, 0.0];
        let top2 = candidates(&logits, 1.0, 2, 1.0);
        assert_eq!(top2.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((top2.iter().map(|c| c.1).sum::<f32>() - 1.0).abs() < 1e-6);
        // p(0) = 0.64: top_p 0.5 keeps only the first token.
        assert_eq!(candidates(&logits, 1.0, 0, 0.5).len(), 1);
        assert_eq!(candidates(&logits, 1.0, 0, 0.9).len(), 3);
    }

    #[test]
    fn same_seed_same_draws() {
        let config = GenerationConfig::default().temperature(1.0).seed(7);
        let defaults = GenerationDefaults::default();
        let draw = |mut sampler: Sampler| {
            (0..20).map(|_| sampler.next_token(&mut [1.0, 1.1, 0.9, 1.0], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(Sampler::new(&config, &defaults)), draw(Sampler::new(&config, &defaults)));
    }

    #[test]
    fn no_seed_means_fresh_entropy() {
        let config = GenerationConfig::default().temperature(1.0);
        let defaults = GenerationDefaults::default();
        let draw = |mut sampler: Sampler| {
            (0..40).map(|_| sampler.next_token(&mut [1.0, 1.0, 1.0, 1.0], &[])).collect::<Vec<_>>()
        };
        // Equal draws from a uniform choice among 4 have probability 4^-40.
        assert_ne!(draw(Sampler::new(&config, &defaults)), draw(Sampler::new(&config, &defaults)));
    }
}
