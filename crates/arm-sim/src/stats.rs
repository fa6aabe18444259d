//! Latency recording (bounded) and percentiles.

use serde::Serialize;

/// Most latencies kept per series; beyond it every other one is dropped (keeps the shape).
pub const SAMPLES_MAX: usize = 4_000_000;

/// Latencies of one kind of operation, in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Series {
    samples_us: Vec<u32>,
    count: u64,
    stride: u64,
}

/// Percentiles of a [`Series`], in milliseconds.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    /// Operations recorded.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Series {
    /// Records one latency.
    pub fn record(&mut self, us: u64) {
        self.count += 1;
        let stride = self.stride.max(1);
        if !self.count.is_multiple_of(stride) {
            return;
        }
        self.samples_us.push(us.min(u64::from(u32::MAX)) as u32);
        if self.samples_us.len() >= SAMPLES_MAX {
            let kept: Vec<u32> = self.samples_us.iter().step_by(2).copied().collect();
            self.samples_us = kept;
            self.stride = stride * 2;
        }
    }

    /// Operations recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Moves everything recorded into `other`'s view (for merging per-task series).
    pub fn merge(&mut self, other: &Series) {
        self.count += other.count;
        self.samples_us.extend_from_slice(&other.samples_us);
    }

    /// Percentiles of what was recorded.
    pub fn summary(&self) -> Summary {
        let mut v = self.samples_us.clone();
        if v.is_empty() {
            return Summary { count: self.count, ..Summary::default() };
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            f64::from(v[i]) / 1000.0
        };
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64 / 1000.0;
        Summary {
            count: self.count,
            mean_ms: mean,
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: f64::from(v[v.len() - 1]) / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_series() {
        let mut s = Series::default();
        for us in 1..=1000 {
            s.record(us * 1000);
        }
        let sum = s.summary();
        assert_eq!(
            (sum.count, sum.p50_ms, sum.p99_ms, sum.p999_ms, sum.max_ms),
            (1000, 500.0, 990.0, 999.0, 1000.0)
        );
        assert!((sum.mean_ms - 500.5).abs() < 1e-9);
        assert_eq!(Series::default().summary().count, 0);
    }
}
