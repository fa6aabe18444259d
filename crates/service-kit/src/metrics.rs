//! The process-wide metrics registry behind `/metrics`: the `metrics` facade's recorder,
//! in fixed memory, rendered as Prometheus text.
//!
//! - Counters and gauges are one atomic each.
//! - A histogram is rendered as a Prometheus summary: quantiles
//!   ([`QUANTILES`]) over the last 40–60 s, and `_sum` and `_count` since the start. Samples
//!   fall into log-linear buckets (32 per doubling, so a quantile is within 1.6 % of a
//!   sample's value), one atomic add each. Quantile 0 and 1 are the window's exact minimum
//!   and maximum. Negative samples count as 0; NaN is dropped.
//! - Its memory is fixed when a series is first registered. Nothing grows with the samples,
//!   and no thread drains them. At most [`SERIES_MAX`] series per kind; past that a new
//!   series is dropped, and every registration of it (the facade registers at each macro
//!   call) is counted in `keel_metrics_series_dropped_total`.
//!
//! Built without a calibrated clock. The exporter it replaces (metrics-exporter-prometheus)
//! calibrated quanta's TSC clock at start, spinning for up to 200 ms on a busy machine. It
//! also queued every histogram sample until its upkeep and grew a sketch per series
//! (docs/BENCHMARKS.md, arm-controller).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

/// Quantiles rendered for every histogram.
pub const QUANTILES: [f64; 7] = [0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0];

/// A histogram's window is this many generations, the oldest cleared and made current every
/// [`GENERATION_MS`]: quantiles cover the last 40–60 s.
pub const GENERATIONS: usize = 3;

/// How long a histogram generation takes samples.
pub const GENERATION_MS: u64 = 20_000;

/// Series per kind (counters, gauges, histograms) before new ones are dropped.
pub const SERIES_MAX: usize = 4_096;

/// Buckets per doubling, as a power of two.
const SUB_BUCKET_BITS: u32 = 5;
/// The smallest and largest distinguished binary exponents: 2^-30 (~1 ns as seconds) to 2^40
/// (~10^12). Smaller samples share the first bucket, larger ones the last.
const EXP_MIN: i32 = -30;
const EXP_MAX: i32 = 40;
const BUCKETS: usize = ((EXP_MAX - EXP_MIN) as usize) << SUB_BUCKET_BITS;

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// Installs the registry as the global recorder on first call and returns it; later calls
/// share it. A recorder installed before (in a test binary) keeps the facade's samples, and
/// this registry renders only what is recorded into it directly.
pub fn registry() -> &'static Registry {
    let mut first = false;
    let registry = REGISTRY.get_or_init(|| {
        first = true;
        Registry::default()
    });
    if first {
        let _ = metrics::set_global_recorder(Global(registry));
        let spawned = std::thread::Builder::new().name("metrics-window".into()).spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(GENERATION_MS));
                registry.rotate();
            }
        });
        if let Err(err) = spawned {
            tracing::warn!(error = %err, "cannot start the metrics window thread");
        }
    }
    registry
}

/// Whether [`registry`] has installed the recorder in this process.
#[cfg(test)]
pub(crate) fn installed() -> bool {
    REGISTRY.get().is_some()
}

/// Counters, gauges and histograms by key.
#[derive(Default)]
pub struct Registry {
    counters: Series<AtomicU64>,
    gauges: Series<AtomicU64>,
    histograms: Series<Summary>,
    dropped: AtomicU64,
}

struct Series<T>(RwLock<HashMap<Key, Arc<T>>>);

impl<T> Default for Series<T> {
    fn default() -> Self {
        Self(RwLock::new(HashMap::new()))
    }
}

impl<T> Series<T> {
    /// The series for `key`, created by `make` if it is new and there is room.
    fn get_or_insert(&self, key: &Key, make: impl FnOnce() -> T) -> Option<Arc<T>> {
        if let Some(found) = self.0.read().unwrap_or_else(|e| e.into_inner()).get(key) {
            return Some(found.clone());
        }
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = map.get(key) {
            return Some(found.clone());
        }
        if map.len() >= SERIES_MAX {
            return None;
        }
        let made = Arc::new(make());
        map.insert(key.clone(), made.clone());
        Some(made)
    }

    /// Every series, sorted by name and labels.
    fn sorted(&self) -> Vec<(Key, Arc<T>)> {
        let map = self.0.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

impl Registry {
    /// A counter's handle (a no-op one past [`SERIES_MAX`]).
    pub fn counter(&self, key: &Key) -> Counter {
        match self.counters.get_or_insert(key, || AtomicU64::new(0)) {
            Some(counter) => Counter::from_arc(counter),
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Counter::noop()
            }
        }
    }

    /// A gauge's handle (a no-op one past [`SERIES_MAX`]).
    pub fn gauge(&self, key: &Key) -> Gauge {
        match self.gauges.get_or_insert(key, || AtomicU64::new(0f64.to_bits())) {
            Some(gauge) => Gauge::from_arc(gauge),
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Gauge::noop()
            }
        }
    }

    /// A histogram's handle (a no-op one past [`SERIES_MAX`]).
    pub fn histogram(&self, key: &Key) -> Histogram {
        match self.histograms.get_or_insert(key, Summary::new) {
            Some(summary) => Histogram::from_arc(summary),
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Histogram::noop()
            }
        }
    }

    /// Starts a new histogram generation in every series, clearing the oldest.
    pub fn rotate(&self) {
        for (_, summary) in self.histograms.sorted() {
            summary.rotate();
        }
    }

    /// Everything in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let mut typed = String::new();
        for (key, counter) in self.counters.sorted() {
            type_line(&mut out, &mut typed, key.name(), "counter");
            sample(&mut out, key.name(), "", &key, None, counter.load(Ordering::Relaxed));
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            let name = "keel_metrics_series_dropped_total";
            type_line(&mut out, &mut typed, name, "counter");
            sample(&mut out, name, "", &Key::from_static_name(name), None, dropped);
        }
        for (key, gauge) in self.gauges.sorted() {
            type_line(&mut out, &mut typed, key.name(), "gauge");
            let value = f64::from_bits(gauge.load(Ordering::Relaxed));
            sample(&mut out, key.name(), "", &key, None, Float(value));
        }
        for (key, summary) in self.histograms.sorted() {
            type_line(&mut out, &mut typed, key.name(), "summary");
            let window = summary.window();
            for q in QUANTILES {
                let value = window.quantile(q).unwrap_or(f64::NAN);
                sample(&mut out, key.name(), "", &key, Some(q), Float(value));
            }
            let sum = f64::from_bits(summary.sum_bits.load(Ordering::Relaxed));
            sample(&mut out, key.name(), "_sum", &key, None, Float(sum));
            sample(
                &mut out,
                key.name(),
                "_count",
                &key,
                None,
                summary.count.load(Ordering::Relaxed),
            );
        }
        out
    }
}

/// The registry as the `metrics` facade's recorder.
struct Global(&'static Registry);

impl Recorder for Global {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0.counter(key)
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0.gauge(key)
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0.histogram(key)
    }
}

/// One histogram series: its counts since the start and its windowed buckets.
struct Summary {
    count: AtomicU64,
    sum_bits: AtomicU64,
    current: AtomicUsize,
    generations: [Generation; GENERATIONS],
}

/// Samples of one generation by bucket, with their exact extremes.
struct Generation {
    buckets: Box<[AtomicU64]>,
    /// Bits of the smallest and largest sample (non-negative floats order as their bits).
    min_bits: AtomicU64,
    max_bits: AtomicU64,
}

impl Generation {
    fn new() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            min_bits: AtomicU64::new(f64::INFINITY.to_bits()),
            max_bits: AtomicU64::new(0),
        }
    }

    fn clear(&self) {
        for bucket in self.buckets.iter() {
            bucket.store(0, Ordering::Relaxed);
        }
        self.min_bits.store(f64::INFINITY.to_bits(), Ordering::Relaxed);
        self.max_bits.store(0, Ordering::Relaxed);
    }
}

impl Summary {
    fn new() -> Self {
        Self {
            count: AtomicU64::new(0),
            sum_bits: AtomicU64::new(0f64.to_bits()),
            current: AtomicUsize::new(0),
            generations: std::array::from_fn(|_| Generation::new()),
        }
    }

    fn rotate(&self) {
        let next = (self.current.load(Ordering::Relaxed) + 1) % GENERATIONS;
        self.generations[next].clear();
        self.current.store(next, Ordering::Relaxed);
    }

    /// The window: every generation's buckets added up.
    fn window(&self) -> Window {
        let mut window =
            Window { counts: vec![0; BUCKETS], total: 0, min: f64::INFINITY, max: 0.0 };
        for generation in &self.generations {
            for (sum, bucket) in window.counts.iter_mut().zip(generation.buckets.iter()) {
                let n = bucket.load(Ordering::Relaxed);
                *sum += n;
                window.total += n;
            }
            window.min =
                window.min.min(f64::from_bits(generation.min_bits.load(Ordering::Relaxed)));
            window.max =
                window.max.max(f64::from_bits(generation.max_bits.load(Ordering::Relaxed)));
        }
        window
    }
}

impl HistogramFn for Summary {
    fn record(&self, value: f64) {
        if value.is_nan() {
            return;
        }
        let value = value.max(0.0);
        let generation = &self.generations[self.current.load(Ordering::Relaxed)];
        generation.buckets[bucket_of(value)].fetch_add(1, Ordering::Relaxed);
        generation.min_bits.fetch_min(value.to_bits(), Ordering::Relaxed);
        generation.max_bits.fetch_max(value.to_bits(), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self.sum_bits.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + value).to_bits())
        });
    }
}

/// A histogram's samples over its window.
struct Window {
    counts: Vec<u64>,
    total: u64,
    min: f64,
    max: f64,
}

impl Window {
    /// The `q` quantile by nearest rank, as its bucket's midpoint within the window's
    /// extremes (0 and 1: the extremes themselves); `None` if the window is empty.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        if q <= 0.0 {
            return Some(self.min);
        }
        if q >= 1.0 {
            return Some(self.max);
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bucket_bounds(index);
                return Some(((low + high) / 2.0).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }
}

/// The bucket of a non-negative, non-NaN sample: its binary exponent and the top
/// [`SUB_BUCKET_BITS`] bits of its mantissa.
fn bucket_of(value: f64) -> usize {
    let bits = value.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32 - 1023;
    if exponent < EXP_MIN {
        return 0;
    }
    if exponent >= EXP_MAX {
        return BUCKETS - 1;
    }
    let sub = (bits >> (52 - SUB_BUCKET_BITS)) as usize & ((1 << SUB_BUCKET_BITS) - 1);
    (((exponent - EXP_MIN) as usize) << SUB_BUCKET_BITS) | sub
}

/// The values bucket `index` holds: [low, high).
fn bucket_bounds(index: usize) -> (f64, f64) {
    let exponent = EXP_MIN + (index >> SUB_BUCKET_BITS) as i32;
    let sub = (index & ((1 << SUB_BUCKET_BITS) - 1)) as f64;
    let step = 2f64.powi(exponent) / f64::from(1u32 << SUB_BUCKET_BITS);
    let low = 2f64.powi(exponent) + sub * step;
    (low, low + step)
}

/// A float as Prometheus writes it (`NaN`, `+Inf`, `-Inf`).
struct Float(f64);

impl std::fmt::Display for Float {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            v if v.is_nan() => f.write_str("NaN"),
            v if v == f64::INFINITY => f.write_str("+Inf"),
            v if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            v => write!(f, "{v}"),
        }
    }
}

/// `# TYPE` once per metric name (series of one name are adjacent: sorted).
fn type_line(out: &mut String, last: &mut String, name: &str, kind: &str) {
    if last != name {
        let _ = writeln!(out, "# TYPE {} {kind}", sanitize(name));
        last.clear();
        last.push_str(name);
    }
}

/// One sample line: `name{labels} value`.
fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    key: &Key,
    quantile: Option<f64>,
    value: impl std::fmt::Display,
) {
    out.push_str(&sanitize(name));
    out.push_str(suffix);
    let mut labels: Vec<String> = key
        .labels()
        .map(|label| format!("{}=\"{}\"", sanitize(label.key()), escape(label.value())))
        .collect();
    if let Some(q) = quantile {
        labels.push(format!("quantile=\"{q}\""));
    }
    if !labels.is_empty() {
        out.push('{');
        out.push_str(&labels.join(","));
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A metric or label name with every character Prometheus does not allow replaced by `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            let allowed =
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit());
            if allowed { c } else { '_' }
        })
        .collect()
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        let labels: Vec<metrics::Label> =
            labels.iter().map(|(k, v)| metrics::Label::new(*k, *v)).collect();
        Key::from_parts(name, labels)
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in\n{text}"))
    }

    fn value(text: &str, prefix: &str) -> f64 {
        line(text, prefix).rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn buckets_cover_every_sample_within_one_thirty_second() {
        for i in 0..BUCKETS {
            let (low, high) = bucket_bounds(i);
            if i > 0 {
                assert_eq!(bucket_of(low), i, "low end of bucket {i}");
            }
            if i < BUCKETS - 1 {
                assert_eq!(bucket_of(high), i + 1, "high end of bucket {i}");
            }
            assert!((high - low) / low <= 1.0 / 32.0 + 1e-12, "bucket {i} too wide");
        }
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(1e-12), 0);
        assert_eq!(bucket_of(1e30), BUCKETS - 1);
        assert_eq!(bucket_of(f64::INFINITY), BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_within_two_percent_of_the_samples() {
        let summary = Summary::new();
        // 1..=10,000 µs as seconds, out of order.
        for i in (1..=10_000u32).rev() {
            summary.record(f64::from(i) * 1e-6);
        }
        let window = summary.window();
        for (q, exact) in [(0.5, 5_000e-6), (0.9, 9_000e-6), (0.99, 9_900e-6), (0.999, 9_990e-6)] {
            let got = window.quantile(q).unwrap();
            assert!((got - exact).abs() / exact < 0.016, "q {q}: {got} against {exact}");
        }
        assert_eq!(window.quantile(0.0), Some(1e-6), "quantile 0 is the exact minimum");
        assert_eq!(window.quantile(1.0), Some(10_000e-6), "quantile 1 is the exact maximum");
        assert_eq!(summary.count.load(Ordering::Relaxed), 10_000);
        let sum = f64::from_bits(summary.sum_bits.load(Ordering::Relaxed));
        assert!((sum - 50_005_000e-6).abs() < 1e-6, "sum {sum}");
    }

    #[test]
    fn a_window_forgets_what_is_older_than_its_generations_and_counts_keep_it() {
        let summary = Summary::new();
        summary.record(5.0);
        summary.record(f64::NAN);
        summary.record(-1.0);
        assert_eq!(summary.window().quantile(0.0), Some(0.0), "a negative sample counts as 0");
        assert_eq!(summary.window().total, 2, "NaN dropped");
        for _ in 0..GENERATIONS - 1 {
            summary.rotate();
            assert_eq!(summary.window().quantile(1.0), Some(5.0), "still in the window");
        }
        summary.rotate();
        assert_eq!(summary.window().quantile(0.5), None, "out of the window");
        assert_eq!(summary.count.load(Ordering::Relaxed), 2, "the count is since the start");
        summary.record(7.0);
        assert_eq!(summary.window().quantile(0.5), Some(7.0));
    }

    #[test]
    fn render_writes_prometheus_text() {
        let registry = Registry::default();
        registry.counter(&key("keel_t_total", &[("arm", "a\"1")])).increment(3);
        registry.counter(&key("keel_t_total", &[("arm", "b")])).increment(1);
        registry.gauge(&key("keel_g", &[])).set(2.5);
        registry.gauge(&key("keel_inf", &[])).set(f64::INFINITY);
        let h = registry.histogram(&key("keel_h_seconds", &[("op", "x")]));
        h.record(0.25);
        h.record(0.5);
        let _empty = registry.histogram(&key("keel_empty_seconds", &[]));
        let text = registry.render();
        assert_eq!(text.matches("# TYPE keel_t_total counter\n").count(), 1, "{text}");
        assert_eq!(line(&text, "keel_t_total{arm=\"a\\\"1\"}"), "keel_t_total{arm=\"a\\\"1\"} 3");
        assert_eq!(line(&text, "keel_t_total{arm=\"b\"}"), "keel_t_total{arm=\"b\"} 1");
        assert!(text.contains("# TYPE keel_g gauge\nkeel_g 2.5\n"), "{text}");
        assert!(text.contains("keel_inf +Inf\n"), "{text}");
        assert!(text.contains("# TYPE keel_h_seconds summary\n"), "{text}");
        assert_eq!(value(&text, "keel_h_seconds{op=\"x\",quantile=\"0\"}"), 0.25);
        assert_eq!(value(&text, "keel_h_seconds{op=\"x\",quantile=\"1\"}"), 0.5);
        assert_eq!(value(&text, "keel_h_seconds_sum{op=\"x\"}"), 0.75);
        assert_eq!(value(&text, "keel_h_seconds_count{op=\"x\"}"), 2.0);
        assert!(value(&text, "keel_empty_seconds{quantile=\"0.5\"}").is_nan());
        assert_eq!(value(&text, "keel_empty_seconds_count"), 0.0);
    }

    #[test]
    fn series_past_the_limit_are_dropped_and_counted() {
        let registry = Registry::default();
        for i in 0..SERIES_MAX + 2 {
            let labels = vec![metrics::Label::new("i", i.to_string())];
            registry.counter(&Key::from_parts("keel_many_total", labels)).increment(1);
        }
        let text = registry.render();
        assert_eq!(text.lines().filter(|l| l.starts_with("keel_many_total{")).count(), SERIES_MAX);
        assert_eq!(value(&text, "keel_metrics_series_dropped_total"), 2.0);
    }
}
