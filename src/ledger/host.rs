//! One host's readings → one interval of evidence. Pure: the caller passes the times.
//!
//! An agent's counters move at its own sampling rounds, not when the aggregator happens to
//! receive them. So a reading is placed at the agent's own time of its last round
//! (`commitmeter_agent_last_round_timestamp_seconds`), shifted by a per-host offset that is
//! 0 while the agent's clock agrees with the aggregator's within the clock tolerance
//! ([`CLOCK_TOLERANCE_MS`] on the system clock) and is
//! re-anchored to the receive time when it does not (a host whose clock is far off). Between
//! two readings the host's GPUs were:
//!
//! - **expected** over the whole interval: the GPUs of the previous reading;
//! - **watched** over the part the agent's sampler covered
//!   (`commitmeter_agent_sampled_seconds_total`; after an agent restart, only the new
//!   process's rounds): a GPU that answered, or one that vanished while the agent watched,
//!   counts as reported; a GPU whose reading is rejected does not;
//! - **delivered** and **used** by what their counters say, if physically possible: a time
//!   counter cannot grow faster than the time watched, used cannot exceed delivered, a
//!   running agent's counters never decrease, and an agent that keeps restarting is suspect.
//!
//! - **held**, per GPU, from the allocated counters: allocated time not used by the
//!   contract's signal (Δallocated − Δallocated-and-used), clamped to the GPU's delivered −
//!   used. A reading without those counters (an older agent, a checkpoint from before
//!   them) gives held 0 for the interval: its idle counts unallocated, never a jump. What
//!   the clamps cut of the readings' rounding is carried to the next interval
//!   (`carry_held`), so they do not lean one way (`held_tests`).
//!
//! - **allocated**, per GPU, and its division among teams: see [`super::teams`]. The
//!   checkpoint keeps each GPU's owners' counters, so the next interval diffs them.
//!
//! Delivered never exceeds the watched capacity of the GPUs whose readings were accepted, and
//! used never exceeds delivered: a surplus (rounding, or an agent clock re-anchored mid-way)
//! is carried to the host's next interval, up to the clock tolerance per GPU, instead of
//! becoming phantom overage in one minute and phantom shortfall in the next.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::teams::{self, OwnerDelta, TeamAmounts};

/// An agent clock further than this from the aggregator's (lag included) is re-anchored:
/// its readings are placed on the aggregator's clock from then on. Also the most surplus
/// a host may carry to its next interval, per GPU. (On the system clock; a simulated clock
/// scales it.)
pub const CLOCK_TOLERANCE_MS: i64 = 30_000;
/// Rounding slack between an agent's counters and its round time (both whole ms), per GPU.
const EXACT_SLACK_MS: i64 = 2;
/// An agent restart within this long of the previous one is suspect, not free credit.
pub const RESTART_SUSPECT_MS: i64 = 300_000;

/// Whole milliseconds of an exposed seconds value: each cumulative value is rounded once,
/// here, so differences of readings telescope and never drift. The scraper has already
/// refused non-finite, negative and absurd values.
pub fn ms_from_seconds(seconds: f64) -> i64 {
    (seconds * 1000.0).round() as i64
}

/// Counter values of one GPU as scraped, in whole milliseconds (each cumulative value is
/// rounded once, so differences telescope and never drift).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuCounters {
    /// `commitmeter_gpu_observed_seconds_total`: delivered time.
    pub observed_ms: i64,
    /// The contract's usage signal (busy, allocated or SM-active time).
    pub used_ms: i64,
    /// `commitmeter_gpu_allocated_seconds_total`: time a compute process held the GPU.
    /// `None`: not exported (an agent older than the idle split, or a checkpoint written
    /// before it), so no held time can be told for the GPU: its idle counts unallocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_ms: Option<i64>,
    /// The part of `allocated_ms` that the contract's usage signal counts as used
    /// (`commitmeter_gpu_allocated_busy_seconds_total`, `…_allocated_sm_active_…`, or
    /// `allocated_ms` itself under `usage_signal = "allocated"`); `None` as above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_used_ms: Option<i64>,
}

impl GpuCounters {
    /// Held GPU-ms of an interval: allocated and not used by the contract's signal
    /// (Δallocated − Δallocated-and-used), clamped to `[0, unused]` where `unused` is the
    /// GPU's delivered − used of the interval, and what the clamp cut if that is only the
    /// readings' rounding (at most [`EXACT_SLACK_MS`] either way; more is impossible and
    /// dropped), for the host's `carry_held`. 0 when either reading lacks the counters
    /// (unknown is never made up) or one went down (`prev`: `None` after a restart, when
    /// the counters count from 0).
    fn held_since(&self, prev: Option<&GpuCounters>, unused: i64) -> (i64, i64) {
        let (Some(a), Some(au)) = (self.allocated_ms, self.allocated_used_ms) else {
            return (0, 0);
        };
        let (da, dau) = match prev {
            None => (a, au),
            Some(p) => match (p.allocated_ms, p.allocated_used_ms) {
                (Some(pa), Some(pau)) => (a - pa, au - pau),
                _ => return (0, 0),
            },
        };
        if da < 0 || dau < 0 {
            return (0, 0);
        }
        let raw = da.saturating_sub(dau);
        let held = raw.clamp(0, unused.max(0));
        let cut = raw - held;
        (held, if cut.abs() <= EXACT_SLACK_MS { cut } else { 0 })
    }
}

impl GpuCounters {
    /// Δallocated and Δallocated-and-used since `prev` (`None`: after a restart, counting
    /// from 0); `None` when either reading lacks the allocated counter or it went down.
    fn allocated_since(&self, prev: Option<&GpuCounters>) -> Option<(i64, Option<i64>)> {
        let a = self.allocated_ms?;
        let (da, dau) = match prev {
            None => (a, self.allocated_used_ms),
            Some(p) => (
                a - p.allocated_ms?,
                self.allocated_used_ms
                    .zip(p.allocated_used_ms)
                    .map(|(n, o)| n - o),
            ),
        };
        (da >= 0).then_some((da, dau.filter(|d| *d >= 0)))
    }
}

/// One owner's increment between two counter values: its whole value when new since the
/// checkpoint, after an agent restart, or when it went down (a new owner under the same
/// labels).
fn owner_delta(now: i64, prev: Option<i64>) -> i64 {
    match prev {
        Some(p) if now >= p => now - p,
        _ => now.max(0),
    }
}

/// One successful scrape of a host, already checked for sanity by the scraper (finite,
/// non-negative, bounded values; no duplicate series).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// Aggregator clock when the response arrived.
    pub received_ms: i64,
    /// The agent's time of the round its counters include; `None` for exporters without it.
    pub agent_ms: Option<i64>,
    /// `process_start_time_seconds` of the agent: a change is a restart.
    pub agent_start_ms: Option<i64>,
    /// `commitmeter_agent_sampled_seconds_total`: how long the agent watched its GPUs.
    pub sampled_ms: Option<i64>,
    /// Per GPU UUID (after the contract's model filter). Empty: the target serves no GPU
    /// series (another exporter, or NVML down since the agent started): not reporting.
    pub gpus: BTreeMap<String, GpuCounters>,
    /// Per (GPU UUID, [`crate::owner::Owner::key`]): the owner's counters on that GPU and
    /// its team. Only GPUs of `gpus`; empty from an agent without owner series (all the
    /// GPUs' allocated time is then `unassigned`).
    pub owners: BTreeMap<(String, String), OwnerCounters>,
}

/// One owner's counters on one GPU, as scraped (whole ms), with the team the
/// aggregator's `[[teams]]` rules gave it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerCounters {
    pub team: String,
    /// `commitmeter_owner_allocated_seconds_total`.
    pub allocated_ms: i64,
    /// The contract's usage signal on the owner's share (`commitmeter_owner_busy_…`,
    /// `…_sm_active_…`, or `allocated_ms` under `usage_signal = "allocated"`).
    pub used_ms: i64,
}

/// The last reading accepted from a host: the baseline of the next interval.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Placement time (aggregator time scale).
    pub at_ms: i64,
    pub agent_ms: Option<i64>,
    pub agent_start_ms: Option<i64>,
    pub sampled_ms: Option<i64>,
    pub gpus: BTreeMap<String, GpuCounters>,
    /// Per GPU UUID, per [`crate::owner::Owner::key`]: the owners' (allocated, used)
    /// counters of that reading, the baseline of their next increments. Empty in a
    /// checkpoint from before owners (their first increments are then scaled into the
    /// GPU's allocated time, see [`super::teams`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub owners: BTreeMap<String, BTreeMap<String, OwnerMark>>,
}

/// An owner's counters as a checkpoint keeps them: `[allocated_ms, used_ms]`.
pub type OwnerMark = [i64; 2];

/// What the ledger remembers about one target of one contract between readings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    /// When it became a target of the contract (aggregator clock).
    pub added_ms: i64,
    /// Placement time of its first reading with GPU series. Before that its size is
    /// unknown, and while a target of unknown size is dark, no shortfall of the contract
    /// can be told apart from it: everything short is unreported.
    pub sized_since_ms: Option<i64>,
    /// `Some` once sized.
    pub last: Option<Checkpoint>,
    /// Placement = agent time + this (0 while the agent's clock is within tolerance).
    pub offset_ms: i64,
    /// Surplus GPU-ms (delivered, used) carried to the next interval.
    pub carry: [i64; 2],
    /// Held GPU-ms the last interval could not take, or took too many of, by the rounding
    /// of its readings (either sign, at most [`EXACT_SLACK_MS`] per GPU): carried to the
    /// next, so that clamping at 0 and at delivered − used never leans one way.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub carry_held: i64,
    /// Allocated GPU-ms the rounding of owners' counters cut of a team (their sum above the
    /// GPU's), paid back from a later interval's `unassigned` time ([`teams::pay_owed`]),
    /// at most [`EXACT_SLACK_MS`] per owner of the reading.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub carry_teams: BTreeMap<String, i64>,
    /// Placement time of the last agent restart seen.
    pub last_restart_ms: Option<i64>,
    /// Set when the target left the contract's targets: its known GPUs stay expected
    /// (unreported) until then, since removing a target is no evidence against the provider.
    pub retired_until_ms: Option<i64>,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Why a GPU's reading was not credited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// A time counter grew faster than the time watched.
    ExceedsElapsed,
    /// Used (busy or allocated) grew faster than delivered.
    UsedExceedsDelivered,
    /// A counter of a running agent went down.
    CounterDecrease,
    /// The agent restarted again within [`RESTART_SUSPECT_MS`].
    RepeatedRestart,
}

impl Reject {
    pub const ALL: [Reject; 4] = [
        Reject::ExceedsElapsed,
        Reject::UsedExceedsDelivered,
        Reject::CounterDecrease,
        Reject::RepeatedRestart,
    ];

    /// The `reason` label of `commitmeter_ledger_rejected_gpu_seconds_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::ExceedsElapsed => "exceeds_elapsed",
            Reject::UsedExceedsDelivered => "used_exceeds_delivered",
            Reject::CounterDecrease => "counter_decrease",
            Reject::RepeatedRestart => "repeated_restart",
        }
    }
}

/// What one reading adds to the ledger, on the placement time scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    /// Expected capacity: `expected_gpus` over `[from_ms, to_ms)`.
    pub from_ms: i64,
    pub to_ms: i64,
    pub expected_gpus: i64,
    /// Reported capacity, delivered and used GPU-ms, all within `[watched_from_ms, to_ms)`.
    pub watched_from_ms: i64,
    pub reported: i64,
    pub delivered: i64,
    pub used: i64,
    /// Held GPU-ms: a compute process held the GPU and the usage signal says it was not
    /// used. Per GPU clamped to its delivered − used, in all to `delivered − used` as
    /// credited.
    pub held: i64,
    /// Allocated GPU-ms of the credited GPUs (per GPU clamped to its credited delivered):
    /// the Σ of [`Outcome::teams`]' allocated.
    pub allocated: i64,
}

/// What an interval showed of one GPU of the previous reading (for the gap list,
/// [`super::gaps`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted, and its observed time grew by at least the time watched.
    Full,
    /// Gone from the reading, or accepted with less observed time than watched.
    Short,
    /// Its reading was rejected: no evidence either way.
    Rejected,
}

/// The result of one reading, for the ledger and for the operator.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub interval: Option<Interval>,
    /// Per GPU of the previous reading (with an interval only), what the interval showed.
    pub gpus: Vec<(String, Verdict)>,
    /// GPU-ms not credited, by reason: a rejected reading's watched time (booked
    /// unreported), or a surplus beyond what the carry may hold.
    pub rejected: Vec<(Reject, i64)>,
    pub restarted: bool,
    /// The agent's clock was off by more than the tolerance: placed on ours.
    pub reanchored: bool,
    /// The interval's allocated GPU-ms by team (allocated, used), summing to
    /// [`Interval::allocated`] exactly (see [`super::teams`]).
    pub teams: TeamAmounts,
}

impl HostState {
    pub fn new(added_ms: i64) -> Self {
        Self {
            added_ms,
            ..Self::default()
        }
    }

    /// GPUs expected from this host now (0 until sized).
    pub fn gpus(&self) -> i64 {
        self.last.as_ref().map_or(0, |l| l.gpus.len() as i64)
    }

    /// Where a reading belongs in time; true when the offset had to be re-anchored.
    fn place(&mut self, received_ms: i64, agent_ms: Option<i64>, tolerance_ms: i64) -> (i64, bool) {
        let Some(agent) = agent_ms else {
            return (received_ms, false);
        };
        let at = agent.saturating_add(self.offset_ms);
        if at.abs_diff(received_ms) <= tolerance_ms.max(0) as u64 {
            return (at, false);
        }
        self.offset_ms = received_ms.saturating_sub(agent);
        (received_ms, true)
    }

    /// Applies one reading, with the clock tolerance in the ledger's time. A reading with
    /// no GPU series, or one whose time did not advance, changes nothing: its counters
    /// carry over to the next reading.
    pub fn read(&mut self, r: Reading, tolerance_ms: i64) -> Outcome {
        let mut out = Outcome::default();
        if r.gpus.is_empty() {
            return out;
        }
        let (at, reanchored) = self.place(r.received_ms, r.agent_ms, tolerance_ms);
        out.reanchored = reanchored;
        // The owners' counters and teams by GPU (owners of GPUs the reading lacks are none
        // of the contract's).
        let mut owners: BTreeMap<String, BTreeMap<String, OwnerCounters>> = BTreeMap::new();
        for ((uuid, key), o) in r.owners {
            if r.gpus.contains_key(&uuid) {
                owners.entry(uuid).or_default().insert(key, o);
            }
        }
        let now = Checkpoint {
            at_ms: at,
            agent_ms: r.agent_ms,
            agent_start_ms: r.agent_start_ms,
            sampled_ms: r.sampled_ms,
            gpus: r.gpus,
            owners: owners
                .iter()
                .map(|(uuid, per)| {
                    let marks = per
                        .iter()
                        .map(|(k, o)| (k.clone(), [o.allocated_ms, o.used_ms]))
                        .collect();
                    (uuid.clone(), marks)
                })
                .collect(),
        };
        let Some(last) = self.last.take() else {
            self.sized_since_ms = Some(at);
            self.last = Some(now);
            return out;
        };
        if at <= last.at_ms {
            self.last = Some(last);
            return out;
        }

        let decreased = || {
            now.gpus.iter().any(|(uuid, c)| {
                last.gpus
                    .get(uuid)
                    .is_some_and(|p| c.observed_ms < p.observed_ms || c.used_ms < p.used_ms)
            })
        };
        let restarted = match (last.agent_start_ms, now.agent_start_ms) {
            (Some(a), Some(b)) if a != b => true,
            (Some(_), Some(_)) => false,
            // Without a process start time, fall back on Prometheus's rule: a decrease.
            _ => decreased(),
        } || matches!((last.sampled_ms, now.sampled_ms), (Some(p), Some(n)) if n < p);
        // The new process counted from its own start: before that nobody watched.
        let from = match (restarted, now.agent_start_ms) {
            (true, Some(start)) => start.saturating_add(self.offset_ms).clamp(last.at_ms, at),
            _ => last.at_ms,
        };
        let len = at - from;
        let watched = match (now.sampled_ms, last.sampled_ms) {
            (Some(s), _) if restarted => s.clamp(0, len),
            (Some(s), Some(p)) => s.saturating_sub(p).clamp(0, len),
            _ => len,
        };
        // Counters and round time come from one clock in whole ms: only rounding separates
        // them. Otherwise (no agent time, or re-anchored) the intervals differ by up to the
        // clock tolerance.
        let exact = !reanchored && now.agent_ms.is_some() && last.agent_ms.is_some();
        let slack = |t: i64| t / 1000 + if exact { EXACT_SLACK_MS } else { tolerance_ms };
        let suspect = restarted
            && self
                .last_restart_ms
                .is_some_and(|t| at - t < RESTART_SUSPECT_MS);
        if restarted {
            self.last_restart_ms = Some(at);
            out.restarted = true;
        }

        let (mut accepted, mut vanished, mut sum_o, mut sum_u) = (0i64, 0i64, 0i64, 0i64);
        let (mut sum_h, mut cut_h, mut sum_a) = (0i64, 0i64, 0i64);
        let mut n_owners = 0i64;
        let mut owed = std::mem::take(&mut self.carry_teams);
        for (uuid, p) in &last.gpus {
            let Some(c) = now.gpus.get(uuid) else {
                // Gone while the agent watched (it re-enumerated without it): not delivered.
                vanished += 1;
                out.gpus.push((uuid.clone(), Verdict::Short));
                continue;
            };
            let (d_o, d_u) = if restarted {
                (c.observed_ms, c.used_ms)
            } else {
                (c.observed_ms - p.observed_ms, c.used_ms - p.used_ms)
            };
            let reject = if suspect {
                Some(Reject::RepeatedRestart)
            } else if d_o < 0 || d_u < 0 {
                Some(Reject::CounterDecrease)
            } else if d_o > watched + slack(watched) {
                Some(Reject::ExceedsElapsed)
            } else if d_u > d_o + d_o / 1000 + EXACT_SLACK_MS {
                Some(Reject::UsedExceedsDelivered)
            } else {
                None
            };
            match reject {
                Some(why) => {
                    out.rejected.push((why, watched));
                    out.gpus.push((uuid.clone(), Verdict::Rejected));
                }
                None => {
                    // Short beyond rounding (or, without exact agent times, beyond the
                    // clock slack): a gap; see `super::gaps`.
                    let short_slack = if exact {
                        EXACT_SLACK_MS
                    } else {
                        slack(watched)
                    };
                    let v = if d_o.saturating_add(short_slack) < watched {
                        Verdict::Short
                    } else {
                        Verdict::Full
                    };
                    out.gpus.push((uuid.clone(), v));
                    accepted += 1;
                    sum_o += d_o;
                    sum_u += d_u;
                    let (h, cut) = c.held_since((!restarted).then_some(p), d_o - d_u);
                    sum_h += h;
                    cut_h += cut;
                    // Allocated and its teams: only where the allocated counters tell it.
                    if let Some((da, dau)) = c.allocated_since((!restarted).then_some(p)) {
                        let allocated = da.clamp(0, d_o.max(0));
                        let prev = last.owners.get(uuid);
                        let deltas: Vec<OwnerDelta> = owners
                            .get(uuid)
                            .into_iter()
                            .flatten()
                            .map(|(key, o)| {
                                let mark = prev.and_then(|m| m.get(key)).filter(|_| !restarted);
                                OwnerDelta {
                                    team: o.team.clone(),
                                    allocated: owner_delta(o.allocated_ms, mark.map(|m| m[0])),
                                    used: owner_delta(o.used_ms, mark.map(|m| m[1])),
                                }
                            })
                            .collect();
                        sum_a += allocated;
                        n_owners += deltas.len() as i64;
                        let (per, cut) = teams::gpu_teams(allocated, dau, d_u, &deltas);
                        for (team, (a, u)) in per {
                            teams::add(&mut out.teams, &team, a, u);
                        }
                        for (team, c) in cut {
                            *owed.entry(team).or_default() += c;
                        }
                    }
                }
            }
        }

        let keep = accepted * tolerance_ms;
        let avail_o = sum_o + self.carry[0];
        let delivered = avail_o.min(accepted * watched);
        let carry_o = (avail_o - delivered).min(keep);
        let avail_u = sum_u + self.carry[1];
        let used = avail_u.min(delivered);
        let carry_u = (avail_u - used).min(keep);
        for (why, dropped) in [
            (Reject::ExceedsElapsed, avail_o - delivered - carry_o),
            (Reject::UsedExceedsDelivered, avail_u - used - carry_u),
        ] {
            if dropped > 0 {
                out.rejected.push((why, dropped));
            }
        }
        self.carry = [carry_o, carry_u];
        // Rounding cut either way comes back in the next interval (never more than the
        // rounding of this one's GPUs), so the clamps do not lean one way over time.
        let avail_h = sum_h + self.carry_held;
        let held = avail_h.clamp(0, delivered - used);
        let slack_h = accepted * EXACT_SLACK_MS;
        self.carry_held = (avail_h - held + cut_h).clamp(-slack_h, slack_h);
        // Pay the teams what rounding cut before (never more than rounding can owe).
        teams::pay_owed(&mut out.teams, &mut owed);
        let slack_t = n_owners.max(1) * EXACT_SLACK_MS;
        owed.values_mut().for_each(|d| *d = (*d).min(slack_t));
        self.carry_teams = owed;
        debug_assert_eq!(out.teams.values().map(|v| v.0).sum::<i64>(), sum_a);
        out.interval = Some(Interval {
            from_ms: last.at_ms,
            to_ms: at,
            expected_gpus: last.gpus.len() as i64,
            watched_from_ms: at - watched.min(len),
            reported: (accepted + vanished) * watched,
            delivered,
            used,
            held,
            allocated: sum_a,
        });
        self.last = Some(now);
        out
    }
}
