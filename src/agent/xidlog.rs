//! Rate limiting of XID log lines. A flapping GPU can report thousands of XIDs a minute; the
//! counter `commitmeter_gpu_xid_errors_total` counts every one, and the log says what
//! changed: the first XID of a GPU at once, then at most one line per GPU every
//! [`EVERY`] with how many followed, by code, so journald stays bounded whatever a GPU does.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// At most one line per GPU this often after its first XID.
pub const EVERY: Duration = Duration::from_secs(300);

/// Per GPU (by UUID): when its last line was written and what was held back since.
#[derive(Debug)]
pub struct XidLog {
    every: Duration,
    gpus: HashMap<String, Held>,
}

#[derive(Debug)]
struct Held {
    last_line: Instant,
    /// Code → count of events not yet logged.
    codes: BTreeMap<String, u64>,
}

/// A line to write: this event, and the events held back before it (`"79×3, 48×1"`).
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    pub uuid: String,
    pub held_back: u64,
    pub codes: String,
}

impl Default for XidLog {
    fn default() -> Self {
        Self::new(EVERY)
    }
}

impl XidLog {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            gpus: HashMap::new(),
        }
    }

    /// An XID event at `now`: true when it is to be logged now (the GPU's first, or the
    /// first after a quiet `every`); otherwise it is held for [`flush`](Self::flush).
    pub fn event(&mut self, uuid: &str, code: &str, now: Instant) -> bool {
        match self.gpus.get_mut(uuid) {
            Some(h) if now.duration_since(h.last_line) < self.every => {
                *h.codes.entry(code.to_string()).or_default() += 1;
                false
            }
            Some(h) if h.codes.is_empty() => {
                h.last_line = now;
                true
            }
            // Due, but events are held: the summary (flush) carries this one too.
            Some(h) => {
                *h.codes.entry(code.to_string()).or_default() += 1;
                false
            }
            None => {
                self.gpus.insert(
                    uuid.to_string(),
                    Held {
                        last_line: now,
                        codes: BTreeMap::new(),
                    },
                );
                true
            }
        }
    }

    /// Summaries due at `now`: per GPU with held-back events whose last line is `every`
    /// old. Call once a round.
    pub fn flush(&mut self, now: Instant) -> Vec<Line> {
        let mut lines = Vec::new();
        for (uuid, h) in &mut self.gpus {
            if !h.codes.is_empty() && now.duration_since(h.last_line) >= self.every {
                lines.push(Line {
                    uuid: uuid.clone(),
                    held_back: h.codes.values().sum(),
                    codes: h
                        .codes
                        .iter()
                        .map(|(c, n)| format!("{c}×{n}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
                h.codes.clear();
                h.last_line = now;
            }
        }
        lines.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flapping_gpu_gets_one_line_then_a_summary_per_window() {
        let t0 = crate::clock::monotonic_now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut log = XidLog::new(Duration::from_secs(300));
        let mut lines = 0;
        // 10 XIDs a second for 20 minutes on one GPU; one XID on another.
        for ms in (0..1_200_000u64).step_by(100) {
            let now = t0 + Duration::from_millis(ms);
            if log.event("GPU-a", if ms % 3 == 0 { "79" } else { "48" }, now) {
                lines += 1;
            }
            lines += log.flush(now).len();
        }
        assert!(log.event("GPU-b", "13", s(10)));
        // The first line, then one summary every 5 minutes: 1 + 3 in 20 minutes.
        assert_eq!(lines, 4);
        let rest = log.flush(s(1_500));
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].uuid, "GPU-a");
        assert!(rest[0].held_back > 2_900, "{rest:?}");
        assert!(rest[0].codes.starts_with("48×"), "{rest:?}");
        assert!(log.flush(s(3_000)).is_empty());
        // A GPU quiet for a window logs its next XID at once again.
        assert!(log.event("GPU-a", "79", s(3_000)));
        assert!(!log.event("GPU-a", "79", s(3_001)));
        let due = log.flush(s(3_300));
        assert_eq!(
            due,
            vec![Line {
                uuid: "GPU-a".into(),
                held_back: 1,
                codes: "79×1".into()
            }]
        );
    }
}
