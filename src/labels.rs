//! Typed label sets for the series of both roles, so that a label-order mistake does not
//! compile.
//!
//! A label set is a struct whose field names *are* the label names, declared with
//! [`label_set!`]: its [`LabelSet::NAMES`] and the values handed to the `prometheus` crate
//! both come from that one field list, so they cannot disagree. A [`Family`] is a metric
//! vector created with its set's names and addressed only by a value of that set:
//! `m.period.with(&ContractKind { contract: &id, kind })` — a missing, extra or misnamed
//! label is a compile error, and the order is the struct's, not the caller's.
//!
//! Why typed wrappers over the current `prometheus` crate rather than the official
//! `prometheus-client` (`#[derive(EncodeLabelSet)]`): the series are a public contract
//! (README tables, `tests/readme.rs`, promtool, dashboards, alert rules), and changing the
//! client library changes the exposition itself (OpenMetrics text with `# EOF` and `_total`
//! handling, another content type, no process collector, a different registry and
//! custom-collector API for the ledger counters and the agent's round lock). That is a
//! behaviour change to be re-verified series by series; issue 11 is a behaviour-unchanged
//! step. The wrappers give the same guarantee — label names defined once, values by name —
//! with byte-identical exposition, and a later move to `prometheus-client` can start from
//! these structs (each becomes a `#[derive(EncodeLabelSet)]`).

use std::marker::PhantomData;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{CounterVec, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// A set of labels: the names, in the order the vector is registered with, and one
/// member's values in the same order. Implemented by [`label_set!`] only.
pub trait LabelSet {
    /// The label names: the struct's field names, in declaration order.
    const NAMES: &'static [&'static str];
    /// Calls `f` with the values, in the order of [`LabelSet::NAMES`].
    fn with_values<R>(&self, f: impl FnOnce(&[&str]) -> R) -> R;

    /// `(name, value)` pairs, in the order of [`LabelSet::NAMES`] (for collectors that
    /// build their samples themselves).
    fn pairs(&self) -> Vec<(&'static str, String)> {
        self.with_values(|values| {
            Self::NAMES
                .iter()
                .zip(values)
                .map(|(n, v)| (*n, v.to_string()))
                .collect()
        })
    }
}

/// A type that is written as a label value.
pub trait LabelValue {
    fn label_value(&self) -> &str;
}

impl LabelValue for &str {
    fn label_value(&self) -> &str {
        self
    }
}

impl LabelValue for crate::ledger::Kind {
    fn label_value(&self) -> &str {
        self.name()
    }
}

/// Declares a label set: `pub struct Name<'a> { label: Type, ... }`, every field a label
/// named as the field, of a type that is [`LabelValue`] (`&'a str`, a ledger `Kind`).
macro_rules! label_set {
    ($(
        $(#[$meta:meta])*
        $vis:vis struct $name:ident<$lt:lifetime> { $( $field:ident : $ty:ty ),+ $(,)? }
    )+) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis struct $name<$lt> { $( pub $field: $ty, )+ }

        impl $crate::labels::LabelSet for $name<'_> {
            const NAMES: &'static [&'static str] = &[$( stringify!($field) ),+];
            fn with_values<R>(&self, f: impl FnOnce(&[&str]) -> R) -> R {
                f(&[$( $crate::labels::LabelValue::label_value(&self.$field) ),+])
            }
        }
    )+};
}
pub(crate) use label_set;

/// A metric vector whose children are addressed by a label set `L` only.
///
/// `L` is the set with any lifetime (e.g. `Family<ContractKind<'static>, GaugeVec>`): the
/// family is covariant in it, so a set borrowing shorter-lived strings is accepted.
#[derive(Clone)]
pub struct Family<L, V> {
    vec: V,
    _labels: PhantomData<L>,
}

/// A family of gauges.
pub type Gauges<L> = Family<L, GaugeVec>;
/// A family of float counters.
pub type Counters<L> = Family<L, CounterVec>;
/// A family of integer counters.
pub type IntCounters<L> = Family<L, IntCounterVec>;

/// The metric vectors a [`Family`] can hold.
pub trait NewVec: Collector + Clone + Sized + 'static {
    fn new_vec(opts: Opts, names: &[&str]) -> prometheus::Result<Self>;
}

macro_rules! new_vec {
    ($($t:ty),+) => {$(
        impl NewVec for $t {
            fn new_vec(opts: Opts, names: &[&str]) -> prometheus::Result<Self> {
                <$t>::new(opts, names)
            }
        }
    )+};
}
new_vec!(GaugeVec, IntGaugeVec, CounterVec, IntCounterVec);

impl<L: LabelSet, V: NewVec> Family<L, V> {
    /// A vector named `name` with the labels of `L`, not registered.
    pub fn new(name: &str, help: &str) -> prometheus::Result<Self> {
        Ok(Self {
            vec: V::new_vec(Opts::new(name, help), L::NAMES)?,
            _labels: PhantomData,
        })
    }

    /// A vector named `name` with the labels of `L`, registered in `registry`.
    pub fn register(registry: &Registry, name: &str, help: &str) -> prometheus::Result<Self> {
        let f = Self::new(name, help)?;
        registry.register(Box::new(f.vec.clone()))?;
        Ok(f)
    }
}

impl<L: LabelSet, B: MetricVecBuilder> Family<L, MetricVec<B>> {
    /// The child of these labels, created (at zero) if it does not exist yet.
    pub fn with(&self, labels: &L) -> B::M {
        labels.with_values(|v| self.vec.with_label_values(v))
    }

    /// Removes the child of these labels; false if there was none.
    pub fn remove(&self, labels: &L) -> bool {
        labels.with_values(|v| self.vec.remove_label_values(v).is_ok())
    }
}

impl<L, V: NewVec> Family<L, V> {
    /// The underlying vector, to register it elsewhere.
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(self.vec.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Kind;
    use prometheus::{Encoder, TextEncoder};

    label_set! {
        struct Pair<'a> { first: &'a str, kind: Kind }
    }

    #[test]
    fn names_and_values_come_from_the_same_fields() {
        assert_eq!(Pair::NAMES, ["first", "kind"]);
        let p = Pair {
            kind: Kind::Idle,
            first: "a",
        };
        assert_eq!(
            p.pairs(),
            [("first", "a".to_string()), ("kind", "idle".to_string())]
        );
        let r = Registry::new();
        let f: Family<Pair<'static>, GaugeVec> = Family::register(&r, "m", "Help.").unwrap();
        let local = String::from("b");
        f.with(&Pair {
            first: &local,
            kind: Kind::Used,
        })
        .set(2.0);
        f.with(&p).set(1.0);
        let mut out = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "# HELP m Help.\n# TYPE m gauge\nm{first=\"a\",kind=\"idle\"} 1\nm{first=\"b\",kind=\"used\"} 2\n"
        );
        assert!(f.remove(&p));
        assert!(!f.remove(&p));
    }
}
