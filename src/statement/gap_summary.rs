//! The statement's summary of a billing period's delivery gaps ([`crate::ledger::gaps`]),
//! beside its SLA section: per cause, how many gaps overlap the period, the GPU-hours of gap
//! time inside it, the longest gap, the XID codes seen and the gaps still running at the
//! statement's end. Pure: the caller passes the gaps the ledger stored and the time their
//! open ones run to. The evidence export ([`super::gaps`]) has the same gaps one per row.
//!
//! # Clipping to the period
//!
//! A gap counts only its part inside the period `[from, to)`: a gap that began in the
//! previous period, or runs on into the next, is split at the boundary, so the figures of
//! adjacent periods add up to the whole gap exactly. An open gap runs to `until` (the first
//! minute not yet sealed, as the statement's minutes do).
//!
//! - `gpu_lost`, `host_unreachable`: one GPU per gap, so its GPU-ms in the period are the
//!   milliseconds of the gap inside it ([`Gap::overlap_ms`]): exact, and the same as the
//!   evidence rows' `in_period_ms`.
//! - `short`: contract-level; its GPU-ms are the shortfall the ledger summed minute by
//!   minute (`short_gpu_ms`), of which it does not keep the per-minute split. A short gap
//!   entirely inside the period counts all of it, exactly. One that crosses the period's
//!   edge is split in proportion to its time on each side ([`prorate`]): the parts of
//!   adjacent periods still add up to the whole exactly (each part is a difference of one
//!   cumulative, rounded-down function, so the rounding telescopes), but the split assumes
//!   an even shortfall and is flagged ([`CauseSummary::prorated`]): a commitment that steps
//!   up at the period boundary while the fleet stays short moves shortfall across it.

use std::collections::BTreeSet;

use crate::ledger::{Cause, Gap};

/// The summary of a period's delivery gaps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GapSummary {
    /// Open gaps count up to here.
    pub until_ms: i64,
    /// The end of what the statement covers: the period's end, or `until_ms` when earlier.
    /// A gap that has not ended by then is still running ([`CauseSummary::open`]).
    pub end_ms: i64,
    /// One per [`Cause::ALL`], in that order (zeros where there were none).
    pub causes: Vec<CauseSummary>,
}

/// The gaps of one cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CauseSummary {
    pub cause: Cause,
    /// Gaps overlapping the period.
    pub gaps: u64,
    /// GPU-ms of gap inside the period (see the module doc).
    pub gpu_ms: i64,
    /// Some `short` gap crossed the period's edge: its GPU-ms were split by time.
    pub prorated: bool,
    /// The longest of them, whole (not clipped), an open one up to `until`.
    pub longest: Option<Longest>,
    /// The distinct XID codes seen during them, in numeric order.
    pub xids: Vec<String>,
    /// How many had not ended by the statement's end ([`GapSummary::end_ms`]).
    pub open: u64,
}

/// The longest gap of a cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Longest {
    /// Empty for `short`.
    pub target: String,
    /// Empty for `short`.
    pub gpu: String,
    pub start_ms: i64,
    /// `None` while open.
    pub end_ms: Option<i64>,
    /// To its end, or to `until` while open.
    pub duration_ms: i64,
}

/// Where a gap ends for counting: its end, or `until_ms` while open (never before its start).
fn effective_end(g: &Gap, until_ms: i64) -> i64 {
    g.end_ms.unwrap_or(until_ms).max(g.start_ms)
}

/// The part of `total` that falls in `[from, to)` when `total` is spread evenly over
/// `[start, end)`: `F(min(to, end)) − F(max(from, start))` with
/// `F(t) = ⌊total · (t − start) / (end − start)⌋`, so the parts of adjacent spans add up to
/// `total` exactly. An empty `[start, end)` puts all of `total` at `start`.
pub fn prorate(total: i64, (start, end): (i64, i64), (from, to): (i64, i64)) -> i64 {
    if end <= start {
        return if (from..to).contains(&start) {
            total
        } else {
            0
        };
    }
    let len = i128::from(end) - i128::from(start);
    let f = |t: i64| -> i128 {
        let t = i128::from(t.clamp(start, end)) - i128::from(start);
        (i128::from(total) * t).div_euclid(len)
    };
    let (a, b) = (from.max(start), to.min(end));
    if b <= a {
        return 0;
    }
    i64::try_from(f(b) - f(a)).unwrap_or(if total < 0 { i64::MIN } else { i64::MAX })
}

/// XID codes in numeric order (codes that are not numbers after them, by text).
fn xid_order(a: &String, b: &String) -> std::cmp::Ordering {
    let n = |s: &String| s.parse::<u64>().ok();
    match (n(a), n(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

/// The summary of `gaps` (one contract's) for the period `[from, to)`, open gaps running to
/// `until_ms`. Gaps are those overlapping the period, as the evidence rows select them.
pub fn summarize(gaps: &[Gap], (from, to): (i64, i64), until_ms: i64) -> GapSummary {
    let end_ms = to.min(until_ms);
    let causes = Cause::ALL
        .into_iter()
        .map(|cause| {
            let mut s = CauseSummary {
                cause,
                gaps: 0,
                gpu_ms: 0,
                prorated: false,
                longest: None,
                xids: Vec::new(),
                open: 0,
            };
            let mut xids: BTreeSet<&String> = BTreeSet::new();
            for g in gaps
                .iter()
                .filter(|g| g.cause == cause && g.overlap_ms(from, to) > 0)
            {
                let end = effective_end(g, until_ms);
                s.gaps += 1;
                let part = match cause {
                    Cause::Short => {
                        s.prorated |= g.start_ms < from || end > to;
                        prorate(g.short_gpu_ms, (g.start_ms, end), (from, to))
                    }
                    Cause::GpuLost | Cause::HostUnreachable => {
                        (end.min(to) - g.start_ms.max(from)).max(0)
                    }
                };
                s.gpu_ms = s.gpu_ms.saturating_add(part);
                let duration_ms = end - g.start_ms;
                if s.longest
                    .as_ref()
                    .is_none_or(|l| duration_ms > l.duration_ms)
                {
                    s.longest = Some(Longest {
                        target: g.target.clone(),
                        gpu: g.gpu.clone(),
                        start_ms: g.start_ms,
                        end_ms: g.end_ms,
                        duration_ms,
                    });
                }
                xids.extend(&g.xids);
                if g.end_ms.is_none_or(|e| e > end_ms) {
                    s.open += 1;
                }
            }
            s.xids = xids.into_iter().cloned().collect();
            s.xids.sort_by(xid_order);
            s
        })
        .collect();
    GapSummary {
        until_ms,
        end_ms,
        causes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_790_000_000_000;

    fn gap(cause: Cause, gpu: &str, start: i64, end: Option<i64>) -> Gap {
        let target = if cause == Cause::Short { "" } else { "h:1" };
        super::super::gaps::tests::gap(target, gpu, cause, start, end)
    }

    fn of(s: &GapSummary, cause: Cause) -> &CauseSummary {
        s.causes.iter().find(|c| c.cause == cause).unwrap()
    }

    #[test]
    fn gaps_are_clipped_to_the_period_and_open_ones_run_to_until() {
        let hour = 3_600_000;
        let period = (T0, T0 + 10 * hour);
        let mut before = gap(Cause::HostUnreachable, "a", T0 - 2 * hour, Some(T0 + hour));
        before.xids = ["79".into(), "48".into()].into();
        let mut lost = gap(Cause::GpuLost, "b", T0 + 3 * hour, None);
        lost.xids = ["119".into(), "48".into()].into();
        let after = gap(Cause::GpuLost, "c", T0 + 9 * hour, Some(T0 + 12 * hour));
        let outside = gap(Cause::GpuLost, "d", T0 - 5 * hour, Some(T0));
        let mut short = gap(Cause::Short, "", T0 + 8 * hour, Some(T0 + 12 * hour));
        short.short_gpu_ms = 4 * hour; // one GPU short for 4 hours: 2 of them inside
        let s = summarize(
            &[before, lost, after, outside, short],
            period,
            T0 + 20 * hour,
        );
        assert_eq!(s.end_ms, period.1);
        let u = of(&s, Cause::HostUnreachable);
        assert_eq!((u.gaps, u.gpu_ms, u.open), (1, hour, 0));
        assert_eq!(u.longest.as_ref().unwrap().duration_ms, 3 * hour);
        let l = of(&s, Cause::GpuLost);
        // 7 hours of the open gap and 1 of the one that ends after the period; both run on.
        assert_eq!((l.gaps, l.gpu_ms, l.open), (2, 8 * hour, 2));
        let longest = l.longest.as_ref().unwrap();
        assert_eq!(
            (longest.gpu.as_str(), longest.duration_ms),
            ("b", 17 * hour)
        );
        assert_eq!(l.xids, ["48", "119"]);
        let sh = of(&s, Cause::Short);
        assert_eq!(
            (sh.gaps, sh.gpu_ms, sh.open, sh.prorated),
            (1, 2 * hour, 1, true)
        );
        assert!(!l.prorated);
        // Provisional: the statement ends at `until`; the open gap is still running there.
        let s = summarize(&[gap(Cause::GpuLost, "b", T0, None)], period, T0 + hour);
        let l = of(&s, Cause::GpuLost);
        assert_eq!((s.end_ms, l.gpu_ms, l.open), (T0 + hour, hour, 1));
    }

    #[test]
    fn no_gaps_is_zeros_for_every_cause() {
        let s = summarize(&[], (T0, T0 + 1), T0);
        assert_eq!(s.causes.len(), Cause::ALL.len());
        assert!(s
            .causes
            .iter()
            .all(|c| c.gaps == 0 && c.gpu_ms == 0 && c.longest.is_none() && c.open == 0));
    }

    fn arb_gaps() -> impl Strategy<Value = Vec<Gap>> {
        prop::collection::vec(
            (
                0usize..3,
                0i64..2_000,
                0i64..1_500,
                any::<bool>(),
                0i64..50_000_000,
            ),
            0..20,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (c, start, len, open, short))| {
                    let cause = Cause::ALL[c];
                    // Whole seconds, so a brute-force count by second is an independent truth.
                    let start = T0 + start * 1000;
                    let mut g = gap(
                        cause,
                        &format!("g{i}"),
                        start,
                        (!open).then_some(start + len * 1000),
                    );
                    if cause == Cause::Short {
                        g.short_gpu_ms = short;
                    }
                    g
                })
                .collect()
        })
    }

    proptest! {
        /// Summed over adjacent periods that cover every gap, each cause's GPU-ms are its
        /// gaps' whole GPU-ms, exactly (clipped time, and `short`'s split shortfall).
        #[test]
        fn adjacent_periods_add_up_to_the_whole_gaps(
            gaps in arb_gaps(),
            cuts in prop::collection::btree_set(1i64..3_600_000, 0..6),
        ) {
            let until = T0 + 3_600_000;
            let mut bounds = vec![T0];
            bounds.extend(cuts.iter().map(|c| T0 + c));
            bounds.push(until);
            for cause in Cause::ALL {
                let whole: i64 = gaps
                    .iter()
                    .filter(|g| g.cause == cause)
                    .map(|g| match cause {
                        Cause::Short => g.short_gpu_ms,
                        _ => effective_end(g, until) - g.start_ms,
                    })
                    .sum();
                let sum: i64 = bounds
                    .windows(2)
                    .map(|w| of(&summarize(&gaps, (w[0], w[1]), until), cause).gpu_ms)
                    .sum();
                // Gaps of no length overlap no period; every other one is covered.
                let empty: i64 = gaps
                    .iter()
                    .filter(|g| g.cause == cause && effective_end(g, until) == g.start_ms)
                    .map(|g| if cause == Cause::Short { g.short_gpu_ms } else { 0 })
                    .sum();
                prop_assert_eq!(sum, whole - empty, "{:?}", cause);
            }
        }

        /// One-GPU causes: the GPU-ms in a period are the seconds of gap inside it, counted
        /// one by one, and the evidence rows' `in_period_ms` summed.
        #[test]
        fn one_gpu_gaps_count_the_seconds_inside_the_period(
            gaps in arb_gaps(),
            a in 0i64..2_500,
            len in 1i64..2_500,
        ) {
            let until = T0 + 3_000_000;
            let period = (T0 + a * 1000, T0 + (a + len) * 1000);
            let s = summarize(&gaps, period, until);
            let rows = super::super::gaps::rows("c", &gaps, period.0, period.1, until);
            for cause in [Cause::GpuLost, Cause::HostUnreachable] {
                let mut seconds = 0;
                for g in gaps.iter().filter(|g| g.cause == cause) {
                    let end = g.end_ms.unwrap_or(until).max(g.start_ms);
                    let mut t = g.start_ms;
                    while t < end {
                        if (period.0..period.1).contains(&t) {
                            seconds += 1;
                        }
                        t += 1000;
                    }
                }
                let c = of(&s, cause);
                prop_assert_eq!(c.gpu_ms, seconds * 1000);
                let from_rows: i64 = rows
                    .iter()
                    .filter(|r| r.cause == cause.as_str())
                    .map(|r| r.in_period_ms)
                    .sum();
                prop_assert_eq!(c.gpu_ms, from_rows);
                prop_assert_eq!(
                    c.gaps as usize,
                    rows.iter().filter(|r| r.cause == cause.as_str()).count()
                );
            }
        }

        /// A prorated part is the even share of the shortfall, rounded by less than 1 GPU-ms.
        #[test]
        fn a_prorated_part_is_the_even_share_within_a_millisecond(
            total in 0i64..(1 << 50),
            start in 0i64..1_000_000,
            len in 1i64..1_000_000,
            from in 0i64..2_000_000,
            span in 0i64..2_000_000,
        ) {
            let end = start + len;
            let to = from + span;
            let part = prorate(total, (start, end), (from, to));
            let inside = i128::from((to.min(end) - from.max(start)).max(0));
            let exact_num = i128::from(total) * inside; // part ≈ exact_num / len
            let diff = i128::from(part) * i128::from(len) - exact_num;
            prop_assert!(diff.abs() < i128::from(len), "{part} vs {exact_num}/{len}");
        }
    }
}
