//! Progress of a run: a bar with ETA on a terminal; plain, spaced-out lines otherwise (Slurm logs).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a line is printed when stderr is not a terminal, at most.
const LINE_INTERVAL: Duration = Duration::from_secs(30);

pub struct Progress {
    label: String,
    total: usize,
    done: usize,
    /// Items done by this process (not the ones found in the results file), for the rate.
    done_here: usize,
    score_sum: f64,
    started: Instant,
    last_line: Option<Instant>,
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Progress {
    /// `total` items in this shard, of which `done` were answered by an earlier run.
    pub fn new(label: String, total: usize, done: usize, score_sum: f64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total as u64).with_position(done as u64);
            let style = ProgressStyle::with_template("{prefix} {wide_bar} {pos}/{len} {per_sec} ETA {eta} {msg}")
                .expect("valid template");
            bar.set_style(style);
            bar.set_prefix(label.clone());
            bar.reset_eta();
            bar
        });
        Self { label, total, done, done_here: 0, score_sum, started: Instant::now(), last_line: None, bar, quiet }
    }

    /// Counts one answered item.
    pub fn advance(&mut self, score: f64) {
        self.done += 1;
        self.done_here += 1;
        self.score_sum += score;
        let mean = self.score_sum / self.done as f64;
        if let Some(bar) = &self.bar {
            bar.set_message(format!("score {:.1}%", 100.0 * mean));
            bar.inc(1);
        } else if !self.quiet {
            let due = self.last_line.is_none_or(|last| last.elapsed() >= LINE_INTERVAL);
            if due || self.done == self.total {
                self.last_line = Some(Instant::now());
                eprintln!("{}", self.line(mean));
            }
        }
    }

    fn line(&self, mean: f64) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = self.done_here as f64 / elapsed.max(1e-9);
        let left = self.total - self.done;
        let eta = if rate > 0.0 { format!("{:.0}s", left as f64 / rate) } else { "?".into() };
        format!(
            "{} {}/{} items ({:.0}%), {rate:.2} items/s, ETA {eta}, score {:.1}%",
            self.label,
            self.done,
            self.total,
            100.0 * self.done as f64 / self.total.max(1) as f64,
            100.0 * mean
        )
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
