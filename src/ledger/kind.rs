//! The ledger kinds: one definition of the figures every sealed minute carries.
//!
//! [`kinds!`] below is the only list of them. It yields the [`Kind`] enum (with
//! [`Kind::ALL`], in the order of their series and database columns) and [`Totals`], one named
//! `i64` field per kind, indexable by kind (`t[Kind::Idle]`). Everything that goes through
//! every kind — sums, the store's columns, the series, the status page rows — iterates
//! [`Kind::ALL`]; what a kind *means* is decided where a `match` on `Kind` asks for it
//! (e.g. whether the price applies to it: `totals::billed`).
//!
//! To add a kind: a line in [`kinds!`] with its meaning, then follow the compiler (and
//! CONTRIBUTING.md, "Add a ledger kind": where it is computed, the store's migration, the
//! README).

use std::ops::{Index, IndexMut};

macro_rules! kinds {
    ($( $(#[doc = $doc:literal])+ $variant:ident => $field:ident, )+) => {
        /// A figure of a sealed ledger minute, in GPU-milliseconds.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Kind {
            $( $(#[doc = $doc])+ $variant, )+
        }

        impl Kind {
            /// Every kind, in the order of their series and database columns.
            pub const ALL: [Kind; Kind::COUNT] = [$( Kind::$variant ),+];
            /// How many kinds there are.
            pub const COUNT: usize = [$( stringify!($field) ),+].len();
            /// The names of [`Kind::ALL`], in order.
            pub const NAMES: [&'static str; Kind::COUNT] = [$( stringify!($field) ),+];

            /// The kind's name: the `kind` label value, the `<kind>` of
            /// `commitmeter_contract_<kind>_gpu_seconds_total`, the database column, and the
            /// status page's `data-k`.
            pub const fn name(self) -> &'static str {
                match self {
                    $( Kind::$variant => stringify!($field), )+
                }
            }
        }

        /// The figures of a sealed minute (or a sum of them), in GPU-milliseconds: one per
        /// [`Kind`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Totals {
            $( $(#[doc = $doc])+ pub $field: i64, )+
        }

        impl Index<Kind> for Totals {
            type Output = i64;
            fn index(&self, k: Kind) -> &i64 {
                match k {
                    $( Kind::$variant => &self.$field, )+
                }
            }
        }

        impl IndexMut<Kind> for Totals {
            fn index_mut(&mut self, k: Kind) -> &mut i64 {
                match k {
                    $( Kind::$variant => &mut self.$field, )+
                }
            }
        }
    };
}

kinds! {
    /// The ramp step in force, pro-rated to the millisecond: the contract's own terms.
    Committed => committed,
    /// GPU time agents observed present and answering NVML.
    Delivered => delivered,
    /// Busy (or, with `usage_signal = "allocated"`, allocated) time of delivered GPUs; never
    /// more than delivered.
    Used => used,
    /// Delivered within the commitment and not used: the underuse budget.
    Idle => idle,
    /// Committed, not delivered, and seen not to be (positive evidence only).
    Undelivered => undelivered,
    /// Committed capacity commitmeter could not see: no claim either way.
    Unreported => unreported,
    /// Used beyond the commitment.
    Overage => overage,
    /// The part of idle during which no compute process held the GPU: the scheduler or the
    /// queue was short of work. `idle = idle_unallocated + idle_allocated`.
    IdleUnallocated => idle_unallocated,
    /// The part of idle during which a compute process held the GPU and the usage signal
    /// says it was not used: a job holding capacity it does not use (allocated first against
    /// the commitment).
    IdleAllocated => idle_allocated,
}

impl Kind {
    /// The kind this one is a part of, for a refinement of a term of the identity (the idle
    /// split: `idle = idle_unallocated + idle_allocated`); `None` for a term itself. A sum
    /// across kinds must leave the parts out, or it counts them twice.
    pub const fn part_of(self) -> Option<Kind> {
        match self {
            Kind::IdleUnallocated | Kind::IdleAllocated => Some(Kind::Idle),
            Kind::Committed
            | Kind::Delivered
            | Kind::Used
            | Kind::Idle
            | Kind::Undelivered
            | Kind::Unreported
            | Kind::Overage => None,
        }
    }

    /// The kinds that are parts of this one, in [`Kind::ALL`] order (empty for most).
    pub fn parts(self) -> impl Iterator<Item = Kind> {
        Kind::ALL
            .into_iter()
            .filter(move |k| k.part_of() == Some(self))
    }

    /// Every kind in the order a reader meets them: each term of the identity followed by
    /// its parts (`idle`, then `idle_unallocated` and `idle_allocated`), for tables that
    /// show the parts indented under their kind.
    pub fn shown() -> impl Iterator<Item = Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| k.part_of().is_none())
            .flat_map(|k| std::iter::once(k).chain(k.parts()))
    }

    /// The kind of this name, if there is one.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Totals {
    /// Totals with each kind's figure given by `f`.
    pub fn from_fn(mut f: impl FnMut(Kind) -> i64) -> Totals {
        let mut t = Totals::default();
        for k in Kind::ALL {
            t[k] = f(k);
        }
        t
    }

    /// The figures in the order of [`Kind::ALL`].
    pub fn values(&self) -> [i64; Kind::COUNT] {
        Kind::ALL.map(|k| self[k])
    }

    /// Used GPU-time that counts against the commitment.
    pub fn used_within(&self) -> i64 {
        self.used - self.overage
    }

    /// Adds another total; saturates rather than wraps (a figure near `i64::MAX` GPU-ms
    /// is already nonsense, but it must never turn negative).
    pub fn add(&mut self, o: &Totals) {
        for k in Kind::ALL {
            self[k] = self[k].saturating_add(o[k]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kinds_in_the_order_of_their_series() {
        assert_eq!(
            Kind::NAMES,
            [
                "committed",
                "delivered",
                "used",
                "idle",
                "undelivered",
                "unreported",
                "overage",
                "idle_unallocated",
                "idle_allocated"
            ]
        );
        for (i, k) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(k.name(), Kind::NAMES[i]);
            assert_eq!(Kind::from_name(k.name()), Some(k));
        }
        assert_eq!(Kind::from_name("late"), None);
    }

    #[test]
    fn only_the_idle_split_is_a_part_of_another_kind() {
        for k in Kind::ALL {
            let want =
                matches!(k, Kind::IdleUnallocated | Kind::IdleAllocated).then_some(Kind::Idle);
            assert_eq!(k.part_of(), want, "{k}");
        }
        assert_eq!(
            Kind::Idle.parts().collect::<Vec<_>>(),
            [Kind::IdleUnallocated, Kind::IdleAllocated]
        );
        assert_eq!(Kind::Used.parts().count(), 0);
        let shown: Vec<&str> = Kind::shown().map(Kind::name).collect();
        assert_eq!(
            shown,
            [
                "committed",
                "delivered",
                "used",
                "idle",
                "idle_unallocated",
                "idle_allocated",
                "undelivered",
                "unreported",
                "overage"
            ]
        );
    }

    #[test]
    fn index_reads_and_writes_the_named_field() {
        let t = Totals::from_fn(|k| k as i64 + 1);
        assert_eq!(t.values(), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!((t.committed, t.idle, t.overage), (1, 4, 7));
        assert_eq!((t.idle_unallocated, t.idle_allocated), (8, 9));
        let mut s = t;
        s.add(&t);
        assert_eq!(s.values(), [2, 4, 6, 8, 10, 12, 14, 16, 18]);
        s[Kind::Unreported] = i64::MAX;
        s.add(&t);
        assert_eq!(s.unreported, i64::MAX, "saturates");
    }
}
