//! `retina-infer serve`: predictions over HTTP for many cameras at once.
//!
//! The listener comes up first (so `/healthz` answers and the port is known), the model thread
//! loads and warms the model, and `/readyz` turns 200 when it is done. Requests are decoded on
//! tokio's blocking pool and batched dynamically on the one model thread ([`batcher`]).
//! SIGTERM (or Ctrl-C) stops accepting, lets in-flight requests finish (up to `--drain-s`),
//! stops the model thread and exits 0. SIGHUP (or `POST /v2/repository/models/{name}/load`)
//! loads the bundle from disk again without dropping a request; a bundle that fails to load is
//! refused and the old model keeps serving.
//!
//! Routes: `/v1` (this project's own), the Open Inference Protocol under `/v2` ([`oip`]), and
//! `/metrics` for Prometheus ([`metrics`]).

pub mod api;
pub mod batcher;
pub mod metrics;
pub mod oip;

use crate::engine::Engine;
use anyhow::{Context, Result, anyhow};
use api::{AppState, Limits, ModelInfo};
use batcher::{BatchPolicy, Batcher};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics::Metrics;
use retina_model::BackendChoice;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;

/// Everything `serve` is told on the command line.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Model bundle (default: the embedded model).
    pub model: Option<PathBuf>,
    /// Where it runs.
    pub backend: BackendChoice,
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    pub addr: String,
    /// Batching.
    pub policy: BatchPolicy,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Time a client gets to send its headers, and then its body.
    pub client_timeout: Duration,
    /// Longest wait for in-flight requests after SIGTERM.
    pub drain: Duration,
    /// Threads for decoding images.
    pub decode_threads: usize,
    /// Log as JSON lines instead of text.
    pub log_json: bool,
    /// The name clients address the model by (`/v2/models/{name}`).
    pub model_name: String,
}

/// Runs the service until SIGTERM or Ctrl-C.
pub fn run(opts: ServeOptions) -> Result<()> {
    init_logging(opts.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(opts.decode_threads.max(1))
        .thread_name("retina-http")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(opts))
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    // A second call (tests in one process) keeps the first subscriber.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

async fn serve(opts: ServeOptions) -> Result<()> {
    let listener = TcpListener::bind(&opts.addr)
        .await
        .with_context(|| format!("cannot listen on {}", opts.addr))?;
    let local = listener.local_addr()?;

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (model, backend) = (opts.model.clone(), opts.backend);
    let served_name = opts.model_name.clone();
    let metrics = Metrics::new(retina_model::GIT_REVISION.unwrap_or("unknown"));
    let (batch_size, images) = (metrics.batch_size.clone(), metrics.images.clone());
    let (batcher, model_thread) = Batcher::start(
        opts.policy,
        move |generation| {
            let t0 = std::time::Instant::now();
            let engine = Engine::load(model.as_deref(), backend)?;
            let info = ModelInfo {
                name: engine.model_name.clone(),
                served_name: served_name.clone(),
                version: engine.version.clone(),
                generation,
                load_seconds: t0.elapsed().as_secs_f64(),
                backend: engine.backend.name,
                backend_description: engine.backend.description.clone(),
                metadata: engine.bundle.metadata.clone(),
            };
            Ok((engine, info))
        },
        ready_tx,
        Arc::new(move |n| {
            batch_size.observe(n as f64);
            images.inc_by(n as u64);
        }),
    )
    .context("cannot start the model thread")?;
    let state = Arc::new(AppState::new(
        batcher,
        Limits {
            max_body: opts.max_body,
            body_timeout: opts.client_timeout,
        },
        metrics,
    ));
    tokio::spawn(reload_on_sighup(state.clone()));
    let app = api::router(state.clone());

    // Scripts and tests read the port from this line (it matters with port 0).
    println!("listening on http://{local}");
    tracing::info!(
        addr = %local,
        max_batch = opts.policy.max_batch,
        max_wait_ms = opts.policy.max_wait.as_millis() as u64,
        max_body_bytes = opts.max_body,
        "listening; loading the model"
    );

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(opts.client_timeout);
    let graceful = GracefulShutdown::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut ready_rx = ready_rx;
    let mut loading = true;

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let service = TowerToHyperService::new(app.clone());
                    let conn = http.serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            loaded = &mut ready_rx, if loading => {
                loading = false;
                match loaded {
                    Ok(Ok(info)) => {
                        tracing::info!(
                            model = %info.name,
                            version = %info.version,
                            backend = %info.backend_description,
                            load_s = info.load_seconds,
                            "ready"
                        );
                        state.set_current(Arc::new(info));
                    }
                    Ok(Err(e)) => return Err(e.context("cannot load the model")),
                    Err(_) => return Err(anyhow!("the model thread stopped while loading")),
                }
            },
            () = &mut shutdown => break,
        }
    }

    state.draining.store(true, Ordering::Relaxed);
    // The SIGHUP task holds a handle on the state: without it the model thread could not end.
    state.stop_reloads();
    drop(listener);
    tracing::info!(
        connections = graceful.count(),
        "shutting down: draining in-flight requests"
    );
    let drained = tokio::time::timeout(opts.drain, graceful.shutdown())
        .await
        .is_ok();
    drop(app);
    drop(state);
    if drained {
        // Every queue handle is gone now, so the model thread finishes its last batch and ends.
        let _ = tokio::task::spawn_blocking(move || model_thread.join()).await;
        tracing::info!("stopped cleanly");
    } else {
        tracing::warn!(
            drain_s = opts.drain.as_secs_f64(),
            "connections still open after the drain time; closing them"
        );
    }
    Ok(())
}

/// Loads the bundle from disk again on the model thread, between batches, and makes it the model
/// serving; on failure the old one keeps serving and the error is returned.
pub async fn reload(state: Arc<AppState>) -> Result<Arc<ModelInfo>> {
    let _one_at_a_time = state.reloading.lock().await;
    let batcher = state.batcher.clone();
    let loaded = tokio::task::spawn_blocking(move || batcher.reload())
        .await
        .map_err(|e| anyhow!("the reload task failed: {e}"))?;
    let result = |r: &str| metrics::ReloadLabels { result: r.into() };
    match loaded {
        Ok(info) => {
            let info = Arc::new(info);
            tracing::info!(
                model = %info.name,
                version = %info.version,
                load_s = info.load_seconds,
                "reloaded"
            );
            state.metrics.reloads.get_or_create(&result("ok")).inc();
            state.set_current(info.clone());
            Ok(info)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "reload refused; the old model keeps serving");
            state
                .metrics
                .reloads
                .get_or_create(&result("refused"))
                .inc();
            Err(e)
        }
    }
}

async fn reload_on_sighup(state: Arc<AppState>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload through the API");
                return;
            }
        };
        let mut stop = state.reload_stop.subscribe();
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    tracing::info!("SIGHUP: reloading the model");
                    let _ = reload(state.clone()).await;
                }
                _ = stop.changed() => return,
            }
        }
    }
    #[cfg(not(unix))]
    drop(state);
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C still works");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The `q` quantile (0..=1, nearest rank) of `v`, or `None` when empty.
pub fn quantile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}
