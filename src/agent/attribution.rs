//! Pure per-owner accounting: shares each round of a GPU's allocated time among the
//! owners of its compute processes ([`crate::owner::Owner`]).
//!
//! No I/O, no clocks: the round's instant and its [`Increment`] (from
//! [`super::accrue::GpuAccount`]) are passed in, with the owner of each process read
//! that round.
//!
//! Rules, per GPU:
//! - A round's allocated seconds are shared equally among the distinct owners of the
//!   processes read in it, and so are its allocated busy seconds. So Σ owners' allocated
//!   = the GPU's allocated, Σ owners' busy = the GPU's allocated busy (up to float
//!   rounding), and each owner's busy ≤ its allocated.
//! - Allocated SM-active seconds come per GPM window (see [`GpmStep`]): when a window
//!   closes, its allocated SM-active seconds are shared in proportion to each owner's
//!   allocated seconds within that window; a window that is dropped shares nothing (the
//!   GPU's counter gets nothing from it either).
//! - Bounded cardinality: at most [`MAX_OWNERS`] owners are tracked per GPU, the
//!   catch-all ([`catch_all`]) included. A new owner past that takes the place of the
//!   owner that released the GPU longest ago (one with no share in the open GPM window);
//!   if every other place is held by an owner with a process on the GPU now, its share
//!   goes to the catch-all.
//! - An owner with no process on the GPU keeps its totals, frozen, for `retention` after
//!   the last round it held the GPU (and while the open GPM window holds a share of it),
//!   then it is removed; one that comes back later starts again from 0.
//! - Every increment is ≥ 0: an owner's totals never decrease.

use std::time::Duration;

use super::accrue::{GpmStep, Increment};
use crate::owner::{Owner, OwnerKind};

/// Owners tracked per GPU at most, the catch-all included: a fork bomb of owners cannot
/// grow the exposition beyond this many series per GPU and family.
pub const MAX_OWNERS: usize = 64;

/// The owner the shares of owners beyond [`MAX_OWNERS`] go to: the `unknown` owner, the
/// same as a process whose owner cannot be read.
pub fn catch_all() -> Owner {
    Owner {
        kind: OwnerKind::Unknown,
        id: "unknown".into(),
        ..Owner::default()
    }
}

/// Seconds attributed to an owner: a round's increment, or running totals.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Shares {
    pub allocated_s: f64,
    pub busy_s: f64,
    pub sm_active_s: f64,
}

impl Shares {
    fn add(&mut self, other: &Shares) {
        self.allocated_s += other.allocated_s;
        self.busy_s += other.busy_s;
        self.sm_active_s += other.sm_active_s;
    }
}

/// One owner of a GPU, as tracked.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnerAccount {
    pub owner: Owner,
    /// Running totals since the owner was first seen (or seen again after removal).
    pub total: Shares,
    /// What the last round added (zero for a round the GPU did not answer).
    pub last: Shares,
    /// It had a process on the GPU in the last round.
    pub holding: bool,
    /// The instant of the last round in which it held the GPU.
    last_held: Duration,
    /// Its allocated seconds in the open GPM window.
    window_s: f64,
}

/// The owners of one GPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuOwners {
    /// In the order first seen; a place freed by an eviction is reused in place.
    owners: Vec<OwnerAccount>,
    /// Owners removed since the last [`GpuOwners::take_removed`].
    removed: Vec<Owner>,
    /// Distinct owners whose share went to the catch-all in the last round.
    overflow: usize,
}

impl GpuOwners {
    /// The tracked owners.
    pub fn owners(&self) -> &[OwnerAccount] {
        &self.owners
    }

    /// Distinct owners whose share went to the catch-all in the last round (more
    /// than [`MAX_OWNERS`] − 1 held the GPU at once).
    pub fn overflow(&self) -> usize {
        self.overflow
    }

    /// Owners removed (retention passed, or evicted for a new owner) since the last call.
    pub fn take_removed(&mut self) -> Vec<Owner> {
        std::mem::take(&mut self.removed)
    }

    /// Attributes a healthy round of the GPU taken at `at`: `holders` has the owner of
    /// each compute process read in the round (duplicates allowed), `inc` what
    /// [`super::accrue::GpuAccount::healthy`] made of the same round. Allocated time with
    /// no holder (which the agent never produces: a process has an owner, `unknown` at
    /// worst) goes to the catch-all, so the sums hold whatever the caller passes.
    pub fn healthy(&mut self, at: Duration, holders: &[Owner], inc: &Increment) {
        for o in &mut self.owners {
            o.last = Shares::default();
            o.holding = false;
        }
        // A window that ends without metrics shares nothing: its owners' stake in it is
        // gone before any place is given out, so they can make room for newcomers.
        if matches!(inc.gpm_window, GpmStep::None | GpmStep::Opened) {
            self.close_window(None);
        }
        let mut distinct: Vec<&Owner> = holders.iter().collect();
        distinct.sort_unstable();
        distinct.dedup();
        let n = distinct.len();
        // Owners already tracked keep their places first, so none of them is evicted
        // for a newcomer of the same round.
        let mut places = Vec::with_capacity(n.max(1));
        let mut new = Vec::new();
        for owner in distinct {
            match self.owners.iter().position(|o| o.owner == *owner) {
                Some(i) => {
                    self.owners[i].holding = true;
                    places.push(i);
                }
                None => new.push(owner),
            }
        }
        self.overflow = 0;
        for owner in new {
            let i = self.place_for(owner, at);
            self.owners[i].holding = true;
            places.push(i);
        }
        if n == 0 && (inc.allocated_s > 0.0 || inc.allocated_busy_s > 0.0) {
            let i = self.catch_all_place(at);
            places.push(i);
        }
        let count = places.len().max(1) as f64;
        let share = Shares {
            allocated_s: inc.allocated_s.max(0.0) / count,
            busy_s: inc.allocated_busy_s.max(0.0) / count,
            sm_active_s: 0.0,
        };
        for &i in &places {
            let o = &mut self.owners[i];
            o.last.add(&share);
            o.last_held = at;
        }
        match inc.gpm_window {
            GpmStep::None | GpmStep::Opened => {}
            GpmStep::Grew => {
                for &i in &places {
                    self.owners[i].window_s += share.allocated_s;
                }
            }
            GpmStep::Closed => {
                for &i in &places {
                    self.owners[i].window_s += share.allocated_s;
                }
                self.close_window(Some(inc.allocated_sm_active_s.max(0.0)));
            }
        }
        for o in &mut self.owners {
            let last = o.last;
            o.total.add(&last);
        }
    }

    /// The GPU did not answer this round: nobody holds it as far as the agent knows,
    /// and the open GPM window is dropped (as [`super::accrue::GpuAccount::interrupted`]
    /// drops it).
    pub fn interrupted(&mut self) {
        for o in &mut self.owners {
            o.last = Shares::default();
            o.holding = false;
        }
        self.overflow = 0;
        self.close_window(None);
    }

    /// Removes the owners that have not held the GPU for `retention` as of `at`, have no
    /// share in the open GPM window and got nothing in the last round: an owner's last
    /// increment is always exported in at least one round before its series go.
    pub fn expire(&mut self, at: Duration, retention: Duration) {
        let removed = &mut self.removed;
        self.owners.retain(|o| {
            let keep = o.holding
                || o.window_s > 0.0
                || o.last != Shares::default()
                || at.saturating_sub(o.last_held) < retention;
            if !keep {
                removed.push(o.owner.clone());
            }
            keep
        });
    }

    /// Ends the open window: shares `sm_active_s` (if it closed with metrics) in
    /// proportion to each owner's allocated time in it.
    fn close_window(&mut self, sm_active_s: Option<f64>) {
        let in_window: f64 = self.owners.iter().map(|o| o.window_s).sum();
        for o in &mut self.owners {
            if let Some(sm) = sm_active_s.filter(|_| in_window > 0.0) {
                o.last.sm_active_s += sm * (o.window_s / in_window);
            }
            o.window_s = 0.0;
        }
    }

    /// The place of an owner not tracked yet: a new one while there is room, else the
    /// place of the owner that released the GPU longest ago, else the catch-all's.
    fn place_for(&mut self, owner: &Owner, at: Duration) -> usize {
        let catch_all = catch_all();
        if *owner == catch_all {
            return self.catch_all_place(at);
        }
        let named = self.owners.iter().filter(|o| o.owner != catch_all).count();
        if named < MAX_OWNERS - 1 {
            self.owners.push(OwnerAccount::new(owner.clone(), at));
            return self.owners.len() - 1;
        }
        let evictable = self
            .owners
            .iter()
            .enumerate()
            .filter(|(_, o)| !o.holding && o.window_s == 0.0 && o.owner != catch_all)
            .min_by_key(|(_, o)| o.last_held)
            .map(|(i, _)| i);
        match evictable {
            Some(i) => {
                let old =
                    std::mem::replace(&mut self.owners[i], OwnerAccount::new(owner.clone(), at));
                self.removed.push(old.owner);
                i
            }
            None => {
                self.overflow += 1;
                self.catch_all_place(at)
            }
        }
    }

    fn catch_all_place(&mut self, at: Duration) -> usize {
        let catch_all = catch_all();
        let i = match self.owners.iter().position(|o| o.owner == catch_all) {
            Some(i) => i,
            None => {
                self.owners.push(OwnerAccount::new(catch_all, at));
                self.owners.len() - 1
            }
        };
        self.owners[i].holding = true;
        i
    }
}

impl OwnerAccount {
    fn new(owner: Owner, at: Duration) -> Self {
        Self {
            owner,
            total: Shares::default(),
            last: Shares::default(),
            holding: false,
            last_held: at,
            window_s: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::accrue::{Activity, Busy, GpuAccount, Reading};
    use proptest::prelude::*;

    const GAP: Duration = Duration::from_secs(5);

    fn job(id: u32) -> Owner {
        Owner {
            kind: OwnerKind::SlurmJob,
            id: id.to_string(),
            user: "alice".into(),
            ..Owner::default()
        }
    }

    fn s(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// A GPU's account and its owners, driven together as the sampler drives them.
    #[derive(Default)]
    struct Gpu {
        account: GpuAccount,
        owners: GpuOwners,
    }

    impl Gpu {
        fn round(
            &mut self,
            at_ms: u64,
            holders: &[&Owner],
            busy: f64,
            activity: Activity,
        ) -> Increment {
            let reading = Reading {
                busy: Busy::Rates(busy),
                processes: Some(holders.len() as u32),
                energy_mj: None,
                activity,
            };
            let inc = self.account.healthy(s(at_ms), &reading, GAP);
            let holders: Vec<Owner> = holders.iter().map(|o| (*o).clone()).collect();
            self.owners.healthy(s(at_ms), &holders, &inc);
            inc
        }

        fn owner(&self, o: &Owner) -> &OwnerAccount {
            self.owners
                .owners()
                .iter()
                .find(|a| a.owner == *o)
                .unwrap_or_else(|| panic!("{o:?} not tracked"))
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn a_round_is_shared_equally_among_distinct_owners() {
        let mut g = Gpu::default();
        let (a, b) = (job(1), job(2));
        g.round(0, &[&a], 1.0, Activity::Unsupported);
        g.round(1000, &[&a], 0.5, Activity::Unsupported);
        assert_eq!(g.owner(&a).total.allocated_s, 1.0);
        assert_eq!(g.owner(&a).total.busy_s, 0.5);
        // Two processes of `a` and one of `b`: halves, not thirds.
        g.round(2000, &[&a, &b, &a], 0.8, Activity::Unsupported);
        assert_eq!(g.owner(&a).last.allocated_s, 0.5);
        assert_eq!(g.owner(&b).last.allocated_s, 0.5);
        assert!(close(g.owner(&b).last.busy_s, 0.4));
        assert!(g.owner(&a).holding && g.owner(&b).holding);
        // `a` leaves: `b` holds it alone; `a` keeps its totals, frozen.
        g.round(3000, &[&b], 1.0, Activity::Unsupported);
        assert!(!g.owner(&a).holding);
        assert_eq!(g.owner(&a).last, Shares::default());
        assert_eq!(g.owner(&a).total.allocated_s, 1.5);
        assert_eq!(g.owner(&b).total.allocated_s, 1.5);
        // Nobody: no allocated time, nobody holds it.
        g.round(4000, &[], 1.0, Activity::Unsupported);
        assert!(g
            .owners
            .owners()
            .iter()
            .all(|o| !o.holding && o.last == Shares::default()));
    }

    #[test]
    fn a_gpm_window_is_shared_by_each_owners_allocated_time_in_it() {
        let mut g = Gpu::default();
        let (a, b) = (job(1), job(2));
        // The chain's first round opens a window; the next closes it.
        g.round(0, &[&a], 1.0, Activity::Baseline);
        let inc = g.round(
            1000,
            &[&a],
            1.0,
            Activity::Metrics {
                sm: 0.5,
                tensor: 0.0,
            },
        );
        assert_eq!(inc.gpm_window, GpmStep::Closed);
        assert_eq!(g.owner(&a).last.sm_active_s, 0.5);
        // A skipped sample: a and b share one second in the window; then b alone for one
        // more; the window closes at 80 % SM activity over 2 s allocated: 1.6 s, split
        // a 0.5 / b 1.5 of 2.
        g.round(2000, &[&a, &b], 1.0, Activity::Skipped);
        assert_eq!(g.owner(&a).last.sm_active_s, 0.0);
        let inc = g.round(
            3000,
            &[&b],
            1.0,
            Activity::Metrics {
                sm: 0.8,
                tensor: 0.0,
            },
        );
        assert!(close(inc.allocated_sm_active_s, 1.6));
        assert!(
            close(g.owner(&a).last.sm_active_s, 0.4),
            "{:?}",
            g.owner(&a)
        );
        assert!(close(g.owner(&b).last.sm_active_s, 1.2));
        // A failed sample drops the window: nobody gets its SM time, nor does the GPU.
        g.round(4000, &[&a], 1.0, Activity::Skipped);
        let inc = g.round(5000, &[&a], 1.0, Activity::Failed);
        assert_eq!(inc.gpm_window, GpmStep::None);
        let inc = g.round(6000, &[&a], 1.0, Activity::Baseline);
        assert_eq!(inc.gpm_window, GpmStep::Opened);
        let inc = g.round(
            7000,
            &[&a],
            1.0,
            Activity::Metrics {
                sm: 1.0,
                tensor: 0.0,
            },
        );
        assert_eq!(inc.allocated_sm_active_s, 1.0);
        assert_eq!(g.owner(&a).last.sm_active_s, 1.0);
        assert!(close(g.owner(&a).total.sm_active_s, 0.5 + 0.4 + 1.0));
    }

    #[test]
    fn an_owner_that_left_is_kept_for_the_retention_then_removed() {
        let ret = Duration::from_secs(2);
        let mut g = Gpu::default();
        let (a, b) = (job(1), job(2));
        g.round(0, &[&a, &b], 1.0, Activity::Unsupported);
        g.round(1000, &[&a, &b], 1.0, Activity::Unsupported);
        g.owners.expire(s(1000), ret);
        for t in [2000, 2500, 2999] {
            g.round(t, &[&b], 1.0, Activity::Unsupported);
            g.owners.expire(s(t), ret);
            assert_eq!(g.owner(&a).total.allocated_s, 0.5, "frozen at {t}");
            assert!(g.owners.take_removed().is_empty());
        }
        g.round(3000, &[&b], 1.0, Activity::Unsupported);
        g.owners.expire(s(3000), ret);
        assert_eq!(g.owners.take_removed(), vec![a.clone()]);
        assert_eq!(g.owners.owners().len(), 1);
        // Back later: a new series, from 0.
        g.round(4000, &[&a], 1.0, Activity::Unsupported);
        assert_eq!(g.owner(&a).total.allocated_s, 1.0);
        // A GPU that stops answering: nobody holds it; owners age out all the same.
        g.owners.interrupted();
        assert!(g.owners.owners().iter().all(|o| !o.holding));
        g.owners.expire(s(8000), ret);
        assert_eq!(g.owners.take_removed().len(), 2);
    }

    #[test]
    fn owners_past_the_bound_share_the_catch_all() {
        let mut g = Gpu::default();
        let many: Vec<Owner> = (0..70).map(job).collect();
        g.round(
            0,
            &many.iter().collect::<Vec<_>>(),
            1.0,
            Activity::Unsupported,
        );
        let inc = g.round(
            1000,
            &many.iter().collect::<Vec<_>>(),
            1.0,
            Activity::Unsupported,
        );
        assert_eq!(g.owners.owners().len(), MAX_OWNERS);
        assert_eq!(g.owners.overflow(), 70 - (MAX_OWNERS - 1));
        let unknown = g.owner(&catch_all()).last.allocated_s;
        assert!(close(unknown, 7.0 / 70.0), "{unknown}");
        let sum: f64 = g.owners.owners().iter().map(|o| o.last.allocated_s).sum();
        assert!(close(sum, inc.allocated_s));
        // A process whose owner could not be read is the catch-all too, and never
        // takes a named owner's place.
        g.round(2000, &[&catch_all(), &job(1)], 1.0, Activity::Unsupported);
        assert_eq!(g.owner(&catch_all()).last.allocated_s, 0.5);
        assert_eq!(g.owners.overflow(), 0);
        // A newcomer takes the place of the owner that left longest ago.
        g.round(3000, &[&job(500)], 1.0, Activity::Unsupported);
        assert_eq!(g.owners.owners().len(), MAX_OWNERS);
        let removed = g.owners.take_removed();
        assert_eq!(removed.len(), 1);
        assert_ne!(removed[0], job(1), "job 1 held it last round");
        assert_eq!(g.owner(&job(500)).total.allocated_s, 1.0);
    }

    #[test]
    fn allocated_time_without_holders_goes_to_the_catch_all() {
        let mut o = GpuOwners::default();
        let inc = Increment {
            observed_s: 1.0,
            allocated_s: 1.0,
            allocated_busy_s: 0.5,
            ..Increment::default()
        };
        o.healthy(s(1000), &[], &inc);
        assert_eq!(o.owners().len(), 1);
        assert_eq!(o.owners()[0].owner, catch_all());
        assert_eq!(o.owners()[0].total.busy_s, 0.5);
    }

    fn arb_activity() -> impl Strategy<Value = Activity> {
        prop_oneof![
            Just(Activity::Unsupported),
            Just(Activity::Baseline),
            Just(Activity::Skipped),
            Just(Activity::Skipped),
            (0.0..=1.2f64).prop_map(|sm| Activity::Metrics { sm, tensor: 0.0 }),
            (0.0..=1.2f64).prop_map(|sm| Activity::Metrics { sm, tensor: 0.0 }),
            Just(Activity::Failed),
        ]
    }

    /// One round: the time since the previous one (ms), the owners of its processes
    /// (indices into a pool, duplicates for several processes of one owner), the
    /// utilization, GPM, and whether the GPU answered at all.
    fn arb_round() -> impl Strategy<Value = (u64, Vec<u32>, f64, Activity, bool)> {
        (
            prop_oneof![50u64..1500, 4000u64..7000],
            prop_oneof![
                prop::collection::vec(0u32..8, 0..6),
                prop::collection::vec(0u32..100, 0..90),
            ],
            -0.1..=1.1f64,
            arb_activity(),
            prop::bool::weighted(0.95),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Against the GPU's own counters, every round: Σ owners' allocated, busy and
        /// SM-active increments equal the GPU's allocated, allocated busy and allocated
        /// SM-active increments; every owner's busy ≤ its allocated; nothing decreases;
        /// at most MAX_OWNERS tracked; holders are exactly the round's (or the
        /// catch-all); nobody outlives its retention.
        #[test]
        fn owners_add_up_to_the_gpu_and_never_decrease(
            rounds in prop::collection::vec(arb_round(), 1..60),
            retention_ms in 0u64..5000,
        ) {
            let retention = Duration::from_millis(retention_ms);
            let mut g = Gpu::default();
            let mut at = 0;
            let mut before: std::collections::HashMap<Owner, Shares> = Default::default();
            for (dt, ids, busy, activity, answered) in rounds {
                at += dt;
                let holders: Vec<Owner> = ids.iter().map(|&k| job(k)).collect();
                let inc = if answered {
                    g.round(at, &holders.iter().collect::<Vec<_>>(), busy, activity)
                } else {
                    g.account.interrupted();
                    g.owners.interrupted();
                    Increment::default()
                };
                g.owners.expire(s(at), retention);
                for o in g.owners.take_removed() {
                    before.remove(&o);
                }
                let owners = g.owners.owners();
                prop_assert!(owners.len() <= MAX_OWNERS);
                let sum = |f: fn(&Shares) -> f64| owners.iter().map(|o| f(&o.last)).sum::<f64>();
                prop_assert!(close(sum(|x| x.allocated_s), inc.allocated_s), "{} vs {inc:?}", sum(|x| x.allocated_s));
                prop_assert!(close(sum(|x| x.busy_s), inc.allocated_busy_s));
                prop_assert!(close(sum(|x| x.sm_active_s), inc.allocated_sm_active_s),
                    "{} vs {inc:?}", sum(|x| x.sm_active_s));
                let mut distinct = holders.clone();
                distinct.sort();
                distinct.dedup();
                for o in owners {
                    prop_assert!(o.last.allocated_s >= 0.0 && o.last.busy_s >= 0.0 && o.last.sm_active_s >= 0.0);
                    prop_assert!(o.total.busy_s <= o.total.allocated_s, "{o:?}");
                    if let Some(prev) = before.get(&o.owner) {
                        prop_assert!(o.total.allocated_s >= prev.allocated_s);
                        prop_assert!(o.total.busy_s >= prev.busy_s);
                        prop_assert!(o.total.sm_active_s >= prev.sm_active_s);
                    }
                    before.insert(o.owner.clone(), o.total);
                    let held = answered && distinct.contains(&o.owner);
                    if o.owner != catch_all() {
                        prop_assert_eq!(o.holding, held, "{:?}", o.owner);
                    }
                    if !o.holding && o.window_s == 0.0 && o.last == Shares::default() {
                        prop_assert!(s(at).saturating_sub(o.last_held) < retention, "{o:?} at {at}");
                    }
                }
                // A holder is tracked, or its share went to the catch-all (only when
                // the other places are held now or hold a share of the open window).
                let untracked = distinct
                    .iter()
                    .filter(|_| answered)
                    .filter(|h| !owners.iter().any(|o| o.owner == **h && o.holding))
                    .count();
                prop_assert_eq!(g.owners.overflow(), untracked);
                if untracked > 0 {
                    let named = owners.iter().filter(|o| o.owner != catch_all()).count();
                    prop_assert_eq!(named, MAX_OWNERS - 1);
                }
            }
        }
    }
}
