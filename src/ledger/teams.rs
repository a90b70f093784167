//! The team book: a contract's allocated GPU-ms divided among the teams whose owners held
//! its GPUs. Pure: integer GPU-ms in, integer GPU-ms out.
//!
//! Per interval and GPU whose reading was credited ([`super::host`]), the contract's
//! **allocated** GPU-ms are the GPU's Δallocated (`commitmeter_gpu_allocated_seconds_total`),
//! clamped to `[0, the GPU's credited delivered]`; a GPU without the allocated counters (or
//! a checkpoint from before them) has no allocated time at all: unknown is never made up.
//! Each owner's share is its Δ since the host's checkpoint (an owner absent now ended: Δ 0;
//! one new since the checkpoint counts its whole value; after an agent restart every owner
//! counts from 0, as the GPU's counters do). A team's share is the Σ of its owners' Δ;
//! what the owners do not explain is [`UNASSIGNED`]; when their Δ exceed the GPU's
//! allocated (rounding, a checkpoint from before owners) they are scaled down with
//! [`apportion`] so the sum is exact. A team's used is its owners' Δused, bounded by its
//! allocated share; `unassigned`'s used is the GPU's Δallocated-and-used that the owners do
//! not explain, bounded likewise; and all of them by the GPU's credited used.
//!
//! [`spread`] then divides an interval's team amounts over its minutes so that per minute
//! Σ teams == the contract's allocated exactly, and each team's used <= its allocated.

use std::collections::BTreeMap;

use super::apportion;

/// The team of allocated time no owner explains (an agent without owner series, an
/// owner's increment the aggregator never saw, rounding), and of owners no `[[teams]]`
/// rule matches.
pub const UNASSIGNED: &str = "unassigned";

/// A team's (allocated, used) GPU-ms, by team name.
pub type TeamAmounts = BTreeMap<String, (i64, i64)>;

/// Adds `(allocated, used)` to `team` in `into`.
pub fn add(into: &mut TeamAmounts, team: &str, allocated: i64, used: i64) {
    if allocated == 0 && used == 0 {
        return;
    }
    let e = into.entry(team.to_string()).or_default();
    e.0 = e.0.saturating_add(allocated);
    e.1 = e.1.saturating_add(used);
}

/// One owner's increments on one GPU over an interval, with its team now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerDelta {
    pub team: String,
    pub allocated: i64,
    pub used: i64,
}

/// One GPU's interval: `allocated` GPU-ms (already clamped to its credited delivered),
/// `allocated_used` (its Δallocated-and-used, `None` unknown), `used_cap` (its credited
/// used) and its owners' increments → per team (allocated, used), with Σ allocated ==
/// `allocated` exactly, used <= allocated per team, Σ used <= `used_cap`; and what the
/// scaling down cut of each team's allocated (for the host's [`pay_owed`]).
pub fn gpu_teams(
    allocated: i64,
    allocated_used: Option<i64>,
    used_cap: i64,
    owners: &[OwnerDelta],
) -> (TeamAmounts, Vec<(String, i64)>) {
    let allocated = allocated.max(0);
    let mut raw: TeamAmounts = BTreeMap::new();
    for o in owners {
        let e = raw.entry(o.team.clone()).or_default();
        e.0 = e.0.saturating_add(o.allocated.max(0));
        e.1 = e.1.saturating_add(o.used.max(0));
    }
    let names: Vec<String> = raw.keys().cloned().collect();
    let mut a: Vec<i64> = raw.values().map(|v| v.0).collect();
    let sum: i64 = a.iter().sum();
    let mut cut = Vec::new();
    if sum > allocated {
        let scaled = apportion(allocated, &a);
        for ((n, raw), s) in names.iter().zip(&a).zip(&scaled) {
            if raw > s && n != UNASSIGNED {
                cut.push((n.clone(), raw - s));
            }
        }
        a = scaled;
    }
    let explained: i64 = a.iter().sum();
    let mut u: Vec<i64> = raw.values().zip(&a).map(|(v, &a)| v.1.min(a)).collect();
    let rest = allocated - explained;
    let rest_used = allocated_used
        .unwrap_or(0)
        .saturating_sub(u.iter().sum())
        .clamp(0, rest);
    let mut names = names;
    names.push(UNASSIGNED.to_string());
    a.push(rest);
    u.push(rest_used);
    let total_used: i64 = u.iter().sum();
    if total_used > used_cap.max(0) {
        u = apportion(used_cap.max(0), &u);
    }
    let mut out = TeamAmounts::new();
    for ((n, a), u) in names.iter().zip(a).zip(u) {
        add(&mut out, n, a, u);
    }
    (out, cut)
}

/// Pays what earlier intervals cut of teams' allocated (`owed`, by the readings' rounding:
/// the owners' counters summing a little above the GPU's) from this interval's
/// `unassigned` allocated, in proportion to what each is owed. Without it the rounding
/// would lean one way: a team loses the ms cut when its owners round up, and `unassigned`
/// keeps the ms left when they round down. The sum of `teams` is unchanged, and each
/// team's used stays <= its allocated.
pub fn pay_owed(teams: &mut TeamAmounts, owed: &mut BTreeMap<String, i64>) {
    let Some(&(spare, spare_used)) = teams.get(UNASSIGNED) else {
        return;
    };
    // `unassigned` is never owed: what is cut of it stays in it.
    owed.remove(UNASSIGNED);
    let names: Vec<String> = owed.keys().cloned().collect();
    let debts: Vec<i64> = owed.values().copied().collect();
    let pay = spare.min(debts.iter().sum());
    if pay <= 0 {
        return;
    }
    let parts = apportion(pay, &debts);
    for (n, p) in names.iter().zip(parts) {
        if p > 0 {
            add(teams, n, p, 0);
            if let Some(d) = owed.get_mut(n) {
                *d -= p;
            }
        }
    }
    owed.retain(|_, d| *d > 0);
    let left = spare - pay;
    teams.remove(UNASSIGNED);
    add(teams, UNASSIGNED, left, spare_used.min(left));
}

/// Divides an interval's team amounts over its minutes: `minutes[i]` is the contract's
/// allocated GPU-ms of minute `i` (summing to Σ teams' allocated). Returns per minute the
/// teams' (allocated, used), non-zero rows only, such that per minute Σ allocated ==
/// `minutes[i]` exactly, per team Σ over minutes == its amounts exactly, and per team
/// and minute used <= allocated.
///
/// Minute by minute, each minute's allocated is apportioned in proportion to what each
/// team has left: never more than it has left (the total to place is at most what all
/// have left), and the last minute takes exactly the rest. A team's used is then
/// apportioned over its own minutes' allocated (used <= allocated, so no part exceeds its
/// weight).
pub fn spread(teams: &TeamAmounts, minutes: &[i64]) -> Vec<TeamAmounts> {
    let names: Vec<&String> = teams.keys().collect();
    let mut left: Vec<i64> = teams.values().map(|v| v.0.max(0)).collect();
    let mut cells: Vec<Vec<i64>> = Vec::with_capacity(minutes.len());
    for &m in minutes {
        let row = apportion(m, &left);
        for (l, r) in left.iter_mut().zip(&row) {
            *l -= r;
        }
        cells.push(row);
    }
    let mut out = vec![TeamAmounts::new(); minutes.len()];
    for (j, (name, &(_, used))) in names.iter().zip(teams.values()).enumerate() {
        let col: Vec<i64> = cells.iter().map(|row| row[j]).collect();
        let used = apportion(used.max(0), &col);
        for (i, (&a, u)) in col.iter().zip(used).enumerate() {
            add(&mut out[i], name, a, u);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn od(team: &str, allocated: i64, used: i64) -> OwnerDelta {
        OwnerDelta {
            team: team.into(),
            allocated,
            used,
        }
    }

    #[test]
    fn owners_fill_the_gpu_and_the_rest_is_unassigned() {
        let (t, _) = gpu_teams(
            60_000,
            Some(30_000),
            40_000,
            &[od("a", 20_000, 10_000), od("b", 10_000, 15_000)],
        );
        // b's used is bounded by its allocated; unassigned's used is what the GPU's
        // allocated-and-used leaves.
        assert_eq!(t["a"], (20_000, 10_000));
        assert_eq!(t["b"], (10_000, 10_000));
        assert_eq!(t[UNASSIGNED], (30_000, 10_000));
    }

    #[test]
    fn owners_beyond_the_gpu_are_scaled_down_exactly() {
        let (t, cut) = gpu_teams(1_000, None, 1_000, &[od("a", 1_000, 0), od("b", 1_000, 0)]);
        assert_eq!(cut, vec![("a".into(), 500), ("b".into(), 500)]);
        assert_eq!(t.values().map(|v| v.0).sum::<i64>(), 1_000);
        assert_eq!((t["a"].0, t["b"].0), (500, 500));
        assert!(!t.contains_key(UNASSIGNED));
        // Nothing allocated: nothing at all.
        assert!(gpu_teams(0, Some(0), 0, &[od("a", 5, 5)]).0.is_empty());
    }

    #[test]
    fn used_never_exceeds_the_gpus_credited_used() {
        let (t, _) = gpu_teams(600, Some(600), 100, &[od("a", 300, 300), od("b", 300, 300)]);
        assert_eq!(t.values().map(|v| v.1).sum::<i64>(), 100);
        assert!(t.values().all(|v| v.1 <= v.0));
    }

    #[test]
    fn spread_keeps_both_margins_exact() {
        let teams: TeamAmounts = [
            ("a".into(), (7, 7)),
            ("b".into(), (5, 1)),
            ("c".into(), (1, 0)),
        ]
        .into_iter()
        .collect();
        let rows = spread(&teams, &[3, 6, 4]);
        for (row, m) in rows.iter().zip([3, 6, 4]) {
            assert_eq!(row.values().map(|v| v.0).sum::<i64>(), m);
            assert!(row.values().all(|v| v.1 <= v.0));
        }
        for (name, &(a, u)) in &teams {
            let got: (i64, i64) = rows
                .iter()
                .filter_map(|r| r.get(name))
                .fold((0, 0), |s, v| (s.0 + v.0, s.1 + v.1));
            assert_eq!(got, (a, u), "{name}");
        }
    }
}
