//! `GET /metrics`: the service's counters in the Prometheus text format, through the Prometheus
//! project's own Rust client (`prometheus-client`).
//!
//! Route labels are the route *templates* (`/v2/models/{name}/infer`), never the paths asked
//! for, so a scanner probing random URLs cannot grow the number of series.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of one request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template, or `unmatched`.
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// HTTP status code.
    pub status: String,
}

/// Labels of a per-route histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route template.
    pub route: String,
}

/// Labels of a reload counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `refused`.
    pub result: String,
}

/// Labels of the model gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The served model name.
    pub name: String,
    /// Its version (content hash of the bundle).
    pub version: String,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~8 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    /// Requests by route, method and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency by route, seconds.
    pub latency: Family<RouteLabels, Histogram>,
    /// Images per forward pass.
    pub batch_size: Histogram,
    /// Images predicted.
    pub images: Counter,
    /// Seconds the last (re)load of the model took, warm-up included.
    pub model_load_seconds: Gauge<f64, AtomicU64>,
    /// Reloads by result.
    pub reloads: Family<ReloadLabels, Counter>,
    /// 1 for the model serving now (name and version as labels).
    pub model: Family<ModelLabels, Gauge>,
}

impl Metrics {
    /// Registers every metric; `revision` is the git revision the binary was built from.
    pub fn new(revision: &str) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "retina_http_requests",
            "HTTP requests answered, by route template, method and status",
            requests.clone(),
        );
        let latency =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "retina_http_request_duration_seconds",
            "Time from request to response, by route template",
            latency.clone(),
        );
        let batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]);
        registry.register(
            "retina_batch_size",
            "Images per forward pass of the model",
            batch_size.clone(),
        );
        let images = Counter::default();
        registry.register(
            "retina_images_predicted",
            "Images predicted",
            images.clone(),
        );
        let model_load_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "retina_model_load_seconds",
            "Seconds the last model load (or reload) took, warm-up included",
            model_load_seconds.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "retina_model_reloads",
            "Model reloads asked for (SIGHUP or the repository API), by result",
            reloads.clone(),
        );
        let model = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "retina_model",
            "The model serving now: 1, with its name and version",
            model.clone(),
        );
        registry.register(
            "retina_build",
            "The retina-infer build",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("revision", revision.to_string()),
            ]),
        );
        Metrics {
            registry,
            requests,
            latency,
            batch_size,
            images,
            model_load_seconds,
            reloads,
            model,
        }
    }

    /// Marks `name`/`version` as the model serving now.
    pub fn set_model(&self, name: &str, version: &str, load_seconds: f64) {
        self.model.clear();
        self.model
            .get_or_create(&ModelLabels {
                name: name.into(),
                version: version.into(),
            })
            .set(1);
        self.model_load_seconds.set(load_seconds);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
