//! Dynamic batching: concurrent requests share forward passes of one model instance.
//!
//! One OS thread owns the [`Engine`] (the model is never shared between threads and never runs
//! on the async reactor). It takes the first waiting image, then keeps collecting until it holds
//! `max_batch` images or `max_wait` has passed since the first one, and runs them as one batch.
//! While a batch runs, new images queue up and form the next one, so under load the batch
//! fills without waiting at all, and throughput approaches the batch-16 figure.
//!
//! Reloading: the same thread loads the new bundle between two batches, so no batch is cut off.
//! A request is decoded for the model it saw when it arrived (its *generation*); the thread keeps
//! the model it replaced, so images decoded for it before the swap are still answered by it,
//! and a bundle that fails to load leaves the old model serving.

use crate::engine::Engine;
use retina_model::Prediction;
use retina_model::explain::{HeatMap, grad_cam};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How batches are formed.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    /// Most images in one forward pass.
    pub max_batch: usize,
    /// Longest an image waits for others to join its batch.
    pub max_wait: Duration,
    /// Images that may wait in the queue before new ones are refused (503).
    pub queue_capacity: usize,
}

/// Why a queued image got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// The queue is full: the service is overloaded.
    #[error("the service is at capacity ({0} images queued); retry shortly")]
    Busy(usize),
    /// The model thread has stopped (shutting down).
    #[error("the model is shutting down")]
    Stopped,
    /// The forward pass panicked; the model thread survives and serves the next batch.
    #[error("the forward pass failed: {0}")]
    Failed(String),
    /// The image was prepared for a model that has been replaced twice since; send it again.
    #[error("the model was reloaded while this image waited; send it again")]
    Replaced,
}

struct Job {
    input: Vec<f32>,
    generation: u64,
    reply: oneshot::Sender<Result<Prediction, BatchError>>,
}

/// What the model thread is asked to do.
enum Msg<T> {
    Predict(Job),
    /// Grad-CAM of one prepared input (`?heatmap=true`), between batches.
    Explain(Explain),
    /// Load the bundle again; the answer is the new model's info, or why it was refused.
    Reload(oneshot::Sender<anyhow::Result<T>>),
}

/// A heat map asked for: the prepared input, the model it was prepared for, where to answer.
struct Explain {
    input: Vec<f32>,
    generation: u64,
    reply: oneshot::Sender<Result<HeatMap, BatchError>>,
}

/// Observes each forward pass's size (the Prometheus batch-size histogram).
pub type BatchObserver = Arc<dyn Fn(usize) + Send + Sync>;

/// Counters for `/v1/stats` and the load test.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Forward passes run.
    pub batches: AtomicU64,
    /// Images predicted.
    pub images: AtomicU64,
    /// Largest batch so far.
    pub largest: AtomicU64,
    /// Images dropped before their batch because the client had gone.
    pub abandoned: AtomicU64,
    /// Total forward-pass time, microseconds.
    pub forward_us: AtomicU64,
}

impl BatchStats {
    /// Mean images per forward pass.
    pub fn mean_batch(&self) -> f64 {
        let b = self.batches.load(Ordering::Relaxed);
        if b == 0 {
            0.0
        } else {
            self.images.load(Ordering::Relaxed) as f64 / b as f64
        }
    }
}

/// Handle for submitting images; cheap to clone.
pub struct Batcher<T> {
    tx: SyncSender<Msg<T>>,
    capacity: usize,
    /// Counters shared with the model thread.
    pub stats: Arc<BatchStats>,
}

impl<T> Clone for Batcher<T> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
            capacity: self.capacity,
            stats: self.stats.clone(),
        }
    }
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the model thread. `load` runs on it (so the engine never crosses threads), at
    /// start and on every reload, with the generation the loaded model will be; the first
    /// result, after a warm-up pass, is sent to `ready`.
    pub fn start(
        policy: BatchPolicy,
        load: impl Fn(u64) -> anyhow::Result<(Engine, T)> + Send + 'static,
        ready: oneshot::Sender<anyhow::Result<T>>,
        observe: BatchObserver,
    ) -> std::io::Result<(Batcher<T>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = sync_channel::<Msg<T>>(policy.queue_capacity);
        let stats = Arc::new(BatchStats::default());
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("retina-model".into())
            .spawn(move || {
                let warm = |generation| {
                    load(generation).and_then(|(engine, info)| {
                        warm_up(&engine, policy.max_batch)?;
                        Ok((engine, info))
                    })
                };
                let (engine, info) = match warm(0) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(info));
                let mut models = Models {
                    current: (0, engine),
                    previous: None,
                };
                run(&mut models, &rx, policy, &thread_stats, &observe, &warm);
            })?;
        Ok((
            Batcher {
                tx,
                capacity: policy.queue_capacity,
                stats,
            },
            handle,
        ))
    }

    /// Asks the model thread to load the bundle again, after the batches already queued.
    /// Waits for queue room (call it off the async reactor).
    pub fn reload(&self) -> anyhow::Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Reload(reply))
            .map_err(|_| anyhow::anyhow!("{}", BatchError::Stopped))?;
        rx.blocking_recv()
            .map_err(|_| anyhow::anyhow!("{}", BatchError::Stopped))?
    }

    /// Queues a Grad-CAM of one prepared input for the model of `generation`.
    pub fn explain(
        &self,
        input: Vec<f32>,
        generation: u64,
    ) -> Result<oneshot::Receiver<Result<HeatMap, BatchError>>, BatchError> {
        let (reply, rx) = oneshot::channel();
        let ask = Explain {
            input,
            generation,
            reply,
        };
        match self.tx.try_send(Msg::Explain(ask)) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(BatchError::Busy(self.capacity)),
            Err(TrySendError::Disconnected(_)) => Err(BatchError::Stopped),
        }
    }

    /// Queues one prepared input; the answer arrives on the returned receiver.
    /// `generation` is the model the input was prepared for.
    pub fn submit(
        &self,
        input: Vec<f32>,
        generation: u64,
    ) -> Result<oneshot::Receiver<Result<Prediction, BatchError>>, BatchError> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Msg::Predict(Job {
            input,
            generation,
            reply,
        })) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(BatchError::Busy(self.capacity)),
            Err(TrySendError::Disconnected(_)) => Err(BatchError::Stopped),
        }
    }
}

/// One pass at the largest batch size, and one at batch 1, so the first requests do not pay
/// for allocation and kernel set-up.
fn warm_up(engine: &Engine, max_batch: usize) -> anyhow::Result<()> {
    let s = engine.bundle.metadata.config.preprocess.image_size;
    let zeros = vec![0.0f32; 3 * s * s];
    for n in [max_batch, 1] {
        let inputs: Vec<&[f32]> = (0..n).map(|_| zeros.as_slice()).collect();
        let out = engine.forward(&inputs);
        anyhow::ensure!(
            out.len() == n,
            "warm-up produced {} answers for {n}",
            out.len()
        );
    }
    Ok(())
}

/// The model serving now and the one it replaced, each with its generation.
struct Models {
    current: (u64, Engine),
    previous: Option<(u64, Engine)>,
}

impl Models {
    fn for_generation(&self, g: u64) -> Option<&Engine> {
        if self.current.0 == g {
            return Some(&self.current.1);
        }
        self.previous
            .as_ref()
            .filter(|(pg, _)| *pg == g)
            .map(|(_, e)| e)
    }
}

fn run<T>(
    models: &mut Models,
    rx: &Receiver<Msg<T>>,
    policy: BatchPolicy,
    stats: &BatchStats,
    observe: &BatchObserver,
    load: &dyn Fn(u64) -> anyhow::Result<(Engine, T)>,
) {
    let max_batch = policy.max_batch.max(1);
    // Jobs of another generation than the batch being formed wait here for the next one.
    let mut held: std::collections::VecDeque<Job> = Default::default();
    loop {
        let first = match held.pop_front() {
            Some(job) => job,
            // Ends when every sender is gone: the server has drained and dropped its handles.
            None => match rx.recv() {
                Ok(Msg::Predict(job)) => job,
                Ok(Msg::Reload(reply)) => {
                    reload(models, load, reply);
                    continue;
                }
                Ok(Msg::Explain(ask)) => {
                    explain(models, ask);
                    continue;
                }
                Err(_) => break,
            },
        };
        let generation = first.generation;
        let deadline = Instant::now() + policy.max_wait;
        let mut jobs = vec![first];
        let mut reload_after = None;
        let mut explain_after = Vec::new();
        while jobs.len() < max_batch && reload_after.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Msg::Predict(job)) if job.generation == generation => jobs.push(job),
                Ok(Msg::Predict(job)) => held.push_back(job),
                // This batch runs first: a reload never cuts one off.
                Ok(Msg::Reload(reply)) => reload_after = Some(reply),
                Ok(Msg::Explain(ask)) => explain_after.push(ask),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        run_batch(models, jobs, generation, stats, observe);
        for ask in explain_after {
            explain(models, ask);
        }
        if let Some(reply) = reload_after {
            reload(models, load, reply);
        }
    }
}

fn reload<T>(
    models: &mut Models,
    load: &dyn Fn(u64) -> anyhow::Result<(Engine, T)>,
    reply: oneshot::Sender<anyhow::Result<T>>,
) {
    let generation = models.current.0 + 1;
    match load(generation) {
        Ok((engine, info)) => {
            let old = std::mem::replace(&mut models.current, (generation, engine));
            models.previous = Some(old);
            let _ = reply.send(Ok(info));
        }
        Err(e) => {
            let _ = reply.send(Err(e));
        }
    }
}

fn explain(models: &Models, ask: Explain) {
    if ask.reply.is_closed() {
        return;
    }
    let Some(engine) = models.for_generation(ask.generation) else {
        let _ = ask.reply.send(Err(BatchError::Replaced));
        return;
    };
    let heat = catch_unwind(AssertUnwindSafe(|| {
        grad_cam(&engine.bundle, &ask.input, &engine.backend.device)
    }));
    let _ = ask.reply.send(match heat {
        Ok(Ok(h)) => Ok(h),
        Ok(Err(e)) => Err(BatchError::Failed(e.to_string())),
        Err(panic) => Err(BatchError::Failed(panic_message(&panic))),
    });
}

fn run_batch(
    models: &Models,
    mut jobs: Vec<Job>,
    generation: u64,
    stats: &BatchStats,
    observe: &BatchObserver,
) {
    // A client that hung up no longer needs its image predicted.
    let before = jobs.len();
    jobs.retain(|j| !j.reply.is_closed());
    stats
        .abandoned
        .fetch_add((before - jobs.len()) as u64, Ordering::Relaxed);
    if jobs.is_empty() {
        return;
    }
    let Some(engine) = models.for_generation(generation) else {
        // Prepared for a model two reloads ago: its input may not fit the one serving now.
        for job in jobs {
            let _ = job.reply.send(Err(BatchError::Replaced));
        }
        return;
    };
    let t0 = Instant::now();
    let inputs: Vec<&[f32]> = jobs.iter().map(|j| j.input.as_slice()).collect();
    let outcome = catch_unwind(AssertUnwindSafe(|| engine.forward(&inputs)));
    let n = jobs.len();
    match outcome {
        Ok(predictions) if predictions.len() == n => {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.images.fetch_add(n as u64, Ordering::Relaxed);
            stats.largest.fetch_max(n as u64, Ordering::Relaxed);
            stats
                .forward_us
                .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            observe(n);
            for (job, prediction) in jobs.into_iter().zip(predictions) {
                let _ = job.reply.send(Ok(prediction));
            }
        }
        Ok(predictions) => {
            let why = format!("{} answers for {n} images", predictions.len());
            for job in jobs {
                let _ = job.reply.send(Err(BatchError::Failed(why.clone())));
            }
        }
        Err(panic) => {
            let why = panic_message(&panic);
            tracing::error!(error = %why, images = n, "forward pass panicked");
            for job in jobs {
                let _ = job.reply.send(Err(BatchError::Failed(why.clone())));
            }
        }
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Keeps the last `n` latencies for percentiles in `/v1/stats`.
#[derive(Debug)]
pub struct LatencyWindow {
    samples: Mutex<std::collections::VecDeque<f64>>,
    n: usize,
}

impl LatencyWindow {
    /// A window of the last `n` samples.
    pub fn new(n: usize) -> Self {
        Self {
            samples: Mutex::new(std::collections::VecDeque::with_capacity(n)),
            n,
        }
    }

    /// Adds one latency in milliseconds.
    pub fn record(&self, ms: f64) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() == self.n {
            s.pop_front();
        }
        s.push_back(ms);
    }

    /// The `q` quantile (0..=1) of the window, or `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<f64> = s.iter().copied().collect();
        drop(s);
        crate::serve::quantile(&mut v, q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batcher over the embedded model, started and loaded; and the model's input side.
    fn start(policy: BatchPolicy) -> (Batcher<usize>, usize) {
        let (ready, ready_rx) = oneshot::channel();
        let (batcher, _thread) = Batcher::start(
            policy,
            |_| {
                let engine = Engine::load(None, retina_model::BackendChoice::Cpu)?;
                let side = engine.bundle.metadata.config.preprocess.image_size;
                Ok((engine, side))
            },
            ready,
            Arc::new(|_| {}),
        )
        .unwrap();
        let side = ready_rx.blocking_recv().unwrap().unwrap();
        (batcher, side)
    }

    /// A forward pass that panics fails its own batch with `Failed` (HTTP 500), and the model
    /// thread goes on to answer the next one.
    #[test]
    fn a_failing_forward_pass_fails_its_batch_and_the_model_thread_serves_the_next() {
        let policy = BatchPolicy {
            max_batch: 4,
            max_wait: Duration::from_millis(1),
            queue_capacity: 8,
        };
        let (batcher, side) = start(policy);
        // An input of the wrong length: building the batch tensor panics inside the pass.
        let bad = batcher
            .submit(vec![0.0; 7], 0)
            .unwrap()
            .blocking_recv()
            .unwrap();
        let why = match bad {
            Err(BatchError::Failed(why)) => why,
            other => panic!("expected a failed pass, got {other:?}"),
        };
        // The panic's own words (burn names the 7 values that do not fill the shape).
        assert!(why.contains('7'), "{why}");
        let response =
            super::super::api::batch_error_as(BatchError::Failed(why), |status, kind, message| {
                super::super::api::api_error(status, kind, message)
            });
        assert_eq!(
            response.status(),
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        );
        // The same thread answers the next image.
        let good = batcher
            .submit(vec![0.0; 3 * side * side], 0)
            .unwrap()
            .blocking_recv()
            .unwrap();
        assert!(good.is_ok(), "{good:?}");
        assert_eq!(batcher.stats.batches.load(Ordering::Relaxed), 1);
    }

    /// An image whose client hung up before its batch ran is counted as abandoned and not
    /// predicted; the others in the batch are.
    #[test]
    fn an_abandoned_image_is_counted_and_skipped() {
        let policy = BatchPolicy {
            max_batch: 4,
            max_wait: Duration::from_millis(300),
            queue_capacity: 8,
        };
        let (batcher, side) = start(policy);
        let kept = batcher.submit(vec![0.0; 3 * side * side], 0).unwrap();
        drop(batcher.submit(vec![0.0; 3 * side * side], 0).unwrap());
        assert!(kept.blocking_recv().unwrap().is_ok());
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let stats = &batcher.stats;
        assert_eq!(
            (
                load(&stats.abandoned),
                load(&stats.images),
                load(&stats.batches)
            ),
            (1, 1, 1)
        );
        assert_eq!(stats.mean_batch(), 1.0);
    }

    #[test]
    fn the_mean_batch_is_images_per_pass() {
        let stats = BatchStats::default();
        assert_eq!(stats.mean_batch(), 0.0, "no pass yet");
        stats.batches.store(4, Ordering::Relaxed);
        stats.images.store(10, Ordering::Relaxed);
        assert_eq!(stats.mean_batch(), 2.5);
    }

    #[test]
    fn the_latency_window_keeps_the_last_n() {
        let w = LatencyWindow::new(3);
        assert_eq!(w.quantile(0.5), None);
        for ms in [100.0, 1.0, 2.0, 3.0] {
            w.record(ms);
        }
        // 100 ms fell out of the window.
        assert_eq!(w.quantile(1.0), Some(3.0));
        assert_eq!(w.quantile(0.0), Some(1.0));
    }
}
