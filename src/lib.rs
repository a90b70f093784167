//! commitmeter: of the GPU capacity a lab pays for, how much was delivered, used and
//! left idle. The agent role turns NVML readings into per-GPU counters.

pub mod agent;
pub mod aggregator;
pub mod alloc;
pub mod check;
pub mod cli;
pub mod clock;
pub mod configfile;
pub mod contract;
pub mod demo;
pub mod http;
pub mod labels;
pub mod ledger;
pub mod logging;
pub mod owner;
pub mod statement;
pub mod statement_cmd;
