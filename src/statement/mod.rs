//! Statements of a billing period: what finance reconciles with the invoice, claims from and
//! renews on. Pure computations here ([`sla`], [`sizing`]); no I/O, no clocks.

pub mod sizing;
pub mod sla;
