//! Whether retention deleted anything during a run: from the topic's configuration and the
//! brokers' `keel_retention_deleted_bytes_total`, so that the checker excuses records below a
//! log start only when retention could delete them and says it did.

use std::collections::BTreeMap;

/// The counter retention increments by the bytes it deleted.
pub const RETENTION_DELETED_METRIC: &str = "keel_retention_deleted_bytes_total";

/// Whether a topic's effective configuration lets retention delete records: `retention.ms` or
/// `retention.bytes` set to something other than -1 (unlimited). A key that is missing counts
/// as limited, since the broker's defaults apply then (`retention.ms` is 7 days by default).
pub fn retention_can_delete<'a>(config: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
    let config: BTreeMap<&str, &str> = config.into_iter().collect();
    ["retention.ms", "retention.bytes"]
        .iter()
        .any(|k| config.get(k).is_none_or(|v| v.trim() != "-1"))
}

/// The value of a metric in a Prometheus text exposition, summed over its label sets; `None`
/// when it is absent (a counter appears once it was first incremented).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if let Some(labelled) = rest.strip_prefix('{') {
            labelled.split_once('}').map(|(_, v)| v)
        } else {
            rest.starts_with(' ').then_some(rest)
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// A counter's total over a run across broker restarts: a restarted broker starts its counters
/// at zero again, so a sample below the previous one means a restart, and the new value is
/// added as it is. (What a broker counted after its last sample before dying is missed.)
#[derive(Debug, Default, Clone)]
pub struct CounterTotal {
    last: BTreeMap<u32, f64>,
    total: f64,
}

impl CounterTotal {
    pub fn observe(&mut self, broker: u32, value: f64) {
        let last = self.last.insert(broker, value).unwrap_or(0.0);
        self.total += if value >= last { value - last } else { value };
    }

    pub fn total(&self) -> f64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_retention_cannot_delete() {
        assert!(!retention_can_delete([
            ("retention.ms", "-1"),
            ("retention.bytes", "-1"),
            ("segment.bytes", "1024")
        ]));
        assert!(retention_can_delete([
            ("retention.ms", "604800000"),
            ("retention.bytes", "-1")
        ]));
        assert!(retention_can_delete([
            ("retention.ms", "-1"),
            ("retention.bytes", "1000")
        ]));
        assert!(retention_can_delete([("retention.bytes", "-1")]));
    }

    #[test]
    fn metrics_are_read_from_the_text_exposition() {
        let text = "# HELP keel_retention_deleted_bytes_total bytes\n\
                    # TYPE keel_retention_deleted_bytes_total counter\n\
                    keel_retention_deleted_bytes_total 4096\n\
                    keel_retention_deleted_bytes_total_other 1\n\
                    keel_partition_size_bytes{topic=\"t\",partition=\"0\"} 10\n\
                    keel_partition_size_bytes{topic=\"t\",partition=\"1\"} 5.5\n";
        assert_eq!(metric_value(text, RETENTION_DELETED_METRIC), Some(4096.0));
        assert_eq!(metric_value(text, "keel_partition_size_bytes"), Some(15.5));
        assert_eq!(metric_value(text, "keel_missing"), None);
    }

    #[test]
    fn a_counter_total_survives_restarts() {
        let mut t = CounterTotal::default();
        t.observe(1, 100.0);
        t.observe(2, 50.0);
        t.observe(1, 150.0);
        // Broker 1 restarted and counted 30 since.
        t.observe(1, 30.0);
        t.observe(1, 30.0);
        assert_eq!(t.total(), 230.0);
    }
}
