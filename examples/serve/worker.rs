//! The model thread: takes queued requests, runs them together as one batch, and sends each
//! client its text as it is generated. A client that goes away is cancelled at the next step.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use vlm::generation::Generator;
use vlm::processing::Encoding;
use vlm::{Generation, GenerationConfig, Vlm};

/// What a client hears back.
pub enum Event {
    Delta(String),
    Done(Generation),
    Failed(vlm::Error),
}

/// Holds one place in the queue, and the image tokens its request holds pixels for, until
/// dropped (the request finished or its client left).
pub struct Slot {
    inflight: Arc<AtomicUsize>,
    image_tokens: Option<(Arc<AtomicUsize>, usize)>,
}

impl Slot {
    /// Takes a place if fewer than `limit` requests are queued or running.
    pub fn acquire(inflight: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        take(inflight, 1, limit).then(|| Self { inflight: inflight.clone(), image_tokens: None })
    }

    /// Counts the request's `tokens` (image tokens) against what all queued and running requests
    /// may hold together (`limit`); false, counting nothing, when they do not fit.
    pub fn hold_image_tokens(&mut self, queued: &Arc<AtomicUsize>, tokens: usize, limit: usize) -> bool {
        if !take(queued, tokens, limit) {
            return false;
        }
        self.image_tokens = Some((queued.clone(), tokens));
        true
    }
}

/// Adds `amount` to `counter` if the sum stays within `limit`.
fn take(counter: &AtomicUsize, amount: usize, limit: usize) -> bool {
    let before = counter.fetch_add(amount, Ordering::SeqCst);
    if before + amount > limit {
        counter.fetch_sub(amount, Ordering::SeqCst);
        return false;
    }
    true
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        if let Some((queued, tokens)) = &self.image_tokens {
            queued.fetch_sub(*tokens, Ordering::SeqCst);
        }
    }
}

/// A processed request waiting for the model.
pub struct Job {
    pub encoding: Encoding,
    pub config: GenerationConfig,
    pub events: UnboundedSender<Event>,
    /// Dropped as soon as the request is done, so its place in the queue frees up.
    pub slot: Option<Slot>,
    pub started: Instant,
}

/// Counters reported by `/health`.
#[derive(Default)]
pub struct Stats {
    pub batches: AtomicUsize,
    pub largest_batch: AtomicUsize,
    pub completed: AtomicUsize,
}

/// How much one batch may hold.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Requests.
    pub max_rows: usize,
    /// Image tokens of all its requests together (a request with more is refused before it
    /// queues): bounds the vision tower's work and memory per batch.
    pub max_image_tokens: usize,
}

/// Runs the model loop on its own thread.
pub fn spawn(vlm: Arc<Vlm>, limits: BatchLimits, queue: usize, stats: Arc<Stats>) -> SyncSender<Job> {
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Job>(queue);
    std::thread::Builder::new()
        .name("vlm-model".into())
        .spawn(move || run(&vlm, &receiver, limits, &stats))
        .expect("can start the model thread");
    sender
}

fn run(vlm: &Vlm, receiver: &Receiver<Job>, limits: BatchLimits, stats: &Stats) {
    // A job that did not fit the last batch starts the next one.
    let mut held: Option<Job> = None;
    while let Some(first) = held.take().or_else(|| receiver.recv().ok()) {
        let mut image_tokens = first.encoding.image_tokens();
        let mut jobs = vec![first];
        // Requests of a burst arrive within a moment of each other: let them join this batch.
        let window = Instant::now() + Duration::from_millis(5);
        while jobs.len() < limits.max_rows {
            match receiver.recv_timeout(window.saturating_duration_since(Instant::now())) {
                Ok(job) if image_tokens + job.encoding.image_tokens() > limits.max_image_tokens => {
                    held = Some(job);
                    break;
                }
                Ok(job) => {
                    image_tokens += job.encoding.image_tokens();
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        jobs.retain(|job| !job.events.is_closed());
        if !jobs.is_empty() {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.largest_batch.fetch_max(jobs.len(), Ordering::Relaxed);
            run_batch(vlm, jobs, stats);
        }
    }
}

/// Runs one batch to its end, counting each answered request before its client hears the end.
fn run_batch(vlm: &Vlm, mut jobs: Vec<Job>, stats: &Stats) {
    let encodings: Vec<Encoding> = jobs.iter().map(|job| job.encoding.clone()).collect();
    let configs: Vec<GenerationConfig> = jobs.iter().map(|job| job.config.clone()).collect();
    let started = jobs.iter().map(|job| job.started).min().unwrap_or_else(Instant::now);
    let tokenizer = vlm.processor().tokenizer();
    let defaults = vlm.generation_defaults();
    let mut generator = match Generator::new(vlm.model(), tokenizer, &encodings, &configs, defaults, started) {
        Ok(generator) => generator,
        Err(error) => {
            let message = error.to_string();
            for job in &jobs {
                let _ = job.events.send(Event::Failed(vlm::Error::Input(message.clone())));
            }
            return;
        }
    };
    let mut reported = vec![false; jobs.len()];
    loop {
        for (row, job) in jobs.iter().enumerate() {
            if job.events.is_closed() {
                generator.cancel(row);
            }
        }
        let deltas = if generator.is_finished() {
            vec![String::new(); jobs.len()]
        } else {
            match generator.step() {
                Ok(deltas) => deltas,
                Err(error) => {
                    let message = error.to_string();
                    for (row, job) in jobs.iter().enumerate() {
                        if !reported[row] {
                            let _ = job.events.send(Event::Failed(vlm::Error::Input(message.clone())));
                        }
                    }
                    return;
                }
            }
        };
        for (row, delta) in deltas.into_iter().enumerate() {
            if !delta.is_empty() {
                let _ = jobs[row].events.send(Event::Delta(delta));
            }
            if !reported[row] && generator.is_row_finished(row) {
                reported[row] = true;
                let generation = generator.generation(row);
                if generation.stop_reason != vlm::StopReason::Cancelled {
                    stats.completed.fetch_add(1, Ordering::Relaxed);
                }
                let _ = jobs[row].events.send(Event::Done(generation));
                // Free the queue place now rather than at the end of the batch.
                jobs[row].slot = None;
            }
        }
        if generator.is_finished() {
            return;
        }
    }
}
