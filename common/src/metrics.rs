//! Registering a service's Prometheus metrics: one call per metric that builds it and adds it
//! to the service's registry. A name registered twice is an error naming the metric, never a
//! silent second copy that `/metrics` does not show.

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// A metric could not be defined or registered (an invalid name, or a name already in the
/// registry).
#[derive(Debug, thiserror::Error)]
#[error("metric {name}: {source}")]
pub struct MetricError {
    pub name: String,
    #[source]
    pub source: prometheus::Error,
}

fn register<M>(r: &Registry, name: &str, made: prometheus::Result<M>) -> Result<M, MetricError>
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let err = |source| MetricError {
        name: name.to_owned(),
        source,
    };
    let metric = made.map_err(err)?;
    r.register(Box::new(metric.clone())).map_err(err)?;
    Ok(metric)
}

pub fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, MetricError> {
    register(r, name, IntCounter::new(name, help))
}

pub fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricError> {
    register(r, name, IntCounterVec::new(Opts::new(name, help), labels))
}

pub fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, MetricError> {
    register(r, name, IntGauge::new(name, help))
}

/// A gauge of floating-point values (ratios, seconds).
pub fn gauge_f64(r: &Registry, name: &str, help: &str) -> Result<Gauge, MetricError> {
    register(r, name, Gauge::new(name, help))
}

pub fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricError> {
    register(r, name, IntGaugeVec::new(Opts::new(name, help), labels))
}

pub fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, MetricError> {
    register(
        r,
        name,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)),
    )
}

pub fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> Result<HistogramVec, MetricError> {
    register(
        r,
        name,
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels),
    )
}

/// The names of the metric families `text` (Prometheus exposition format) holds.
pub fn families(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_registered_twice_is_an_error_naming_it() {
        let r = Registry::new();
        let c = counter(&r, "nexus_test_total", "a test").unwrap();
        c.inc();
        let e = counter(&r, "nexus_test_total", "again").unwrap_err();
        assert_eq!(e.name, "nexus_test_total");
        assert!(
            e.to_string().starts_with("metric nexus_test_total: "),
            "{e}"
        );
        // The first one is still the one served.
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&r.gather())
            .unwrap();
        assert!(text.contains("nexus_test_total 1"), "{text}");
        assert!(families(&text).contains("nexus_test_total"));
        assert!(counter(&r, "not a name", "x").is_err());
    }
}
