//! The aggregator's series. Names are a public contract: dashboards and alert rules
//! read them. Counters move only when minutes seal, so they never go back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{IntGauge, Opts, Registry};

use crate::contract::Contract;
use crate::labels::{label_set, Counters, Family, Gauges, IntCounters, LabelSet};
use crate::ledger::totals::Figures;
use crate::ledger::{Kind, Totals};

label_set! {
    /// The series of a contract: `{contract}`.
    pub struct ContractLabels<'a> { contract: &'a str }
    /// A contract's figure of one kind: `commitmeter_contract_period_gpu_seconds`,
    /// `commitmeter_ledger_late_gpu_seconds_total`.
    pub struct ContractKindLabels<'a> { contract: &'a str, kind: Kind }
    /// `commitmeter_contract_info`: a contract and its terms (see [`ContractInfoLabels::of`]).
    pub struct ContractInfoLabels<'a> {
        contract: &'a str,
        provider: &'a str,
        currency: &'a str,
        usage_signal: &'a str,
        timezone: &'a str,
    }
    /// `commitmeter_contract_price_per_gpu_second`.
    pub struct PriceLabels<'a> { contract: &'a str, currency: &'a str }
    /// `commitmeter_contract_period_cost`: a priced kind in the contract's currency.
    pub struct CostLabels<'a> { contract: &'a str, currency: &'a str, kind: Kind }
    /// `commitmeter_ledger_rejected_gpu_seconds_total`: why readings were rejected.
    pub struct RejectedLabels<'a> { contract: &'a str, reason: &'a str }
    /// `commitmeter_contract_burn_rate_tier_reachable`.
    pub struct TierLabels<'a> { contract: &'a str, tier: &'a str }
    /// The series of a scrape target: `{target}`.
    pub struct TargetLabels<'a> { target: &'a str }
    /// `commitmeter_target_up`: a target and the contract it is scraped for (empty if none).
    pub struct TargetContractLabels<'a> { target: &'a str, contract: &'a str }
    /// `commitmeter_target_scrape_errors_total`: why a scrape failed.
    pub struct TargetReasonLabels<'a> { target: &'a str, reason: &'a str }
    /// `commitmeter_ledger_store_errors_total`: which write failed.
    pub struct OperationLabels<'a> { operation: &'a str }
    /// `commitmeter_team_{allocated,used}_gpu_seconds_total`: a team of a contract.
    pub struct TeamLabels<'a> { contract: &'a str, team: &'a str }
    /// `commitmeter_team_period_gpu_seconds`: a team's month to date, `kind` = `allocated`
    /// or `used`.
    pub struct TeamKindLabels<'a> { contract: &'a str, team: &'a str, kind: &'a str }
    /// `commitmeter_book_contributed_minutes_total`: what the shared book did with this
    /// shard's closed minutes (`won`, `already`, `sealed`).
    pub struct ResultLabels<'a> { result: &'a str }
}

/// The shared book's series (`[storage] postgres` only): whether it is reached, what became
/// of this shard's contributions, and the minutes this aggregator sealed.
#[derive(Clone)]
pub struct BookMetrics {
    pub up: IntGauge,
    pub contributed: IntCounters<ResultLabels<'static>>,
    pub sealed: prometheus::IntCounter,
}

impl BookMetrics {
    /// What the book may say of a contributed minute: written first (`won`), already there
    /// from a replica or a retry (`already`), refused because the book had sealed the minute
    /// without this shard (`sealed`: its hosts were counted unreported).
    pub const RESULTS: [&'static str; 3] = ["won", "already", "sealed"];

    pub fn register(
        registry: &Registry,
        shard: crate::contract::ShardSpec,
    ) -> prometheus::Result<Self> {
        let info = IntGauge::with_opts(
            Opts::new(
                "commitmeter_book_info",
                "This aggregator keeps its contract minutes in a shared book (PostgreSQL), for shard `shard` of `shards`.",
            )
            .const_label("shard", shard.index.to_string())
            .const_label("shards", shard.count.to_string()),
        )?;
        info.set(1);
        registry.register(Box::new(info))?;
        let up = IntGauge::new(
            "commitmeter_book_up",
            "1 if the last exchange with the shared book (contribute, seal, read) succeeded.",
        )?;
        registry.register(Box::new(up.clone()))?;
        let contributed: IntCounters<ResultLabels> = Family::register(
            registry,
            "commitmeter_book_contributed_minutes_total",
            "This shard's closed contract-minutes sent to the shared book, by what the book did with them: won (written first), already (a replica's or a retry's was there), sealed (refused: the book had sealed the minute without this shard, its hosts unreported).",
        )?;
        for result in Self::RESULTS {
            contributed.with(&ResultLabels { result });
        }
        let sealed = prometheus::IntCounter::new(
            "commitmeter_book_sealed_minutes_total",
            "Contract-minutes this aggregator sealed in the shared book (one aggregator seals at a time).",
        )?;
        registry.register(Box::new(sealed.clone()))?;
        Ok(Self {
            up,
            contributed,
            sealed,
        })
    }
}

impl<'a> ContractInfoLabels<'a> {
    /// The info labels of a contract, from its terms.
    pub fn of(c: &'a Contract) -> Self {
        Self {
            contract: &c.id,
            provider: &c.provider,
            currency: &c.currency,
            usage_signal: c.usage_signal.as_str(),
            timezone: &c.timezone_name,
        }
    }
}

fn label_names<L: LabelSet>() -> Vec<String> {
    L::NAMES.iter().map(|n| n.to_string()).collect()
}

/// The all-time ledger counters (every kind, and late GPU-seconds), rendered from the
/// ledger's integer GPU-ms at each scrape: exact, and identical after a restart (restored
/// from the same sums), where adding float increments would drift by an ulp and could seem
/// to go back.
#[derive(Clone)]
pub struct LedgerCounters {
    values: Arc<Mutex<BTreeMap<String, ContractCounts>>>,
    kinds: Vec<Desc>,
    late: Desc,
}

/// Per contract: all-time totals and late (delivered, used) GPU-ms.
type ContractCounts = (Totals, (i64, i64));

impl LedgerCounters {
    fn new() -> Result<Self, prometheus::Error> {
        let kinds = Kind::ALL
            .iter()
            .map(|kind| {
                Desc::new(
                    format!("commitmeter_contract_{kind}_gpu_seconds_total"),
                    format!("{kind} GPU-seconds of the contract over sealed ledger minutes."),
                    label_names::<ContractLabels>(),
                    Default::default(),
                )
            })
            .collect::<Result<_, _>>()?;
        let late = Desc::new(
            "commitmeter_ledger_late_gpu_seconds_total".into(),
            "GPU-seconds that arrived for already sealed minutes and were not counted.".into(),
            label_names::<ContractKindLabels>(),
            Default::default(),
        )?;
        Ok(Self {
            values: Arc::new(Mutex::new(BTreeMap::new())),
            kinds,
            late,
        })
    }

    pub fn set(&self, contract: &str, all_time: &Totals, late: (i64, i64)) {
        self.values
            .lock()
            .expect("ledger counters lock")
            .insert(contract.to_string(), (*all_time, late));
    }
}

fn counter_family(desc: &Desc, samples: Vec<(Vec<(&str, String)>, i64)>) -> MetricFamily {
    family(desc, MetricType::COUNTER, samples)
}

/// A family of `kind` (counter or gauge) whose samples are GPU-ms, exposed as seconds.
fn family(desc: &Desc, kind: MetricType, samples: Vec<(Vec<(&str, String)>, i64)>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(kind);
    family.set_metric(
        samples
            .into_iter()
            .map(|(labels, ms)| {
                let pairs = labels
                    .into_iter()
                    .map(|(k, v)| {
                        let mut p = proto::LabelPair::default();
                        p.set_name(k.to_string());
                        p.set_value(v);
                        p
                    })
                    .collect();
                let mut m = proto::Metric::from_label(pairs);
                if kind == MetricType::GAUGE {
                    let mut g = proto::Gauge::default();
                    g.set_value(ms as f64 / 1000.0);
                    m.set_gauge(g);
                } else {
                    let mut c = proto::Counter::default();
                    c.set_value(ms as f64 / 1000.0);
                    m.set_counter(c);
                }
                m
            })
            .collect(),
    );
    family
}

impl Collector for LedgerCounters {
    fn desc(&self) -> Vec<&Desc> {
        self.kinds.iter().chain([&self.late]).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let values = self.values.lock().expect("ledger counters lock");
        let mut out: Vec<MetricFamily> = self
            .kinds
            .iter()
            .zip(Kind::ALL)
            .map(|(desc, kind)| {
                let samples = values
                    .iter()
                    .map(|(id, (t, _))| (ContractLabels { contract: id }.pairs(), t[kind]))
                    .collect();
                counter_family(desc, samples)
            })
            .collect();
        let late = values
            .iter()
            .flat_map(|(id, (_, (d, u)))| {
                [(Kind::Delivered, *d), (Kind::Used, *u)].map(|(kind, ms)| {
                    let labels = ContractKindLabels { contract: id, kind };
                    (labels.pairs(), ms)
                })
            })
            .collect();
        out.push(counter_family(&self.late, late));
        out
    }
}

/// The team series, rendered from the books' integer GPU-ms at each scrape, like
/// [`LedgerCounters`]: all-time counters over sealed minutes (restored from the ledger,
/// so identical after a restart) and the billing period's gauges. Rows per contract and
/// team with any time only: bounded by the number of teams, never by jobs.
#[derive(Clone)]
pub struct TeamSeries {
    values: Arc<Mutex<BTreeMap<String, TeamValues>>>,
    allocated: Desc,
    used: Desc,
    period: Desc,
    contract_allocated: Desc,
}

/// One contract's team figures: all-time allocated, all-time and period team rows
/// `(team, allocated, used)`.
#[derive(Debug, Clone, Default)]
struct TeamValues {
    allocated: i64,
    all_time: Vec<(String, i64, i64)>,
    period: Vec<(String, i64, i64)>,
}

impl TeamSeries {
    fn new() -> Result<Self, prometheus::Error> {
        let desc = |name: &str, help: &str, labels: Vec<String>| {
            Desc::new(name.into(), help.into(), labels, Default::default())
        };
        Ok(Self {
            values: Arc::new(Mutex::new(BTreeMap::new())),
            allocated: desc(
                "commitmeter_team_allocated_gpu_seconds_total",
                "GPU-seconds a team's processes held the contract's GPUs over sealed ledger minutes; per contract the teams sum to commitmeter_contract_allocated_gpu_seconds_total exactly (unattributed time is team unassigned).",
                label_names::<TeamLabels>(),
            )?,
            used: desc(
                "commitmeter_team_used_gpu_seconds_total",
                "GPU-seconds of a team's allocated time that the contract's usage signal counts as used, over sealed ledger minutes (never above its allocated).",
                label_names::<TeamLabels>(),
            )?,
            period: desc(
                "commitmeter_team_period_gpu_seconds",
                "Month-to-date allocated or used GPU-seconds of a team in the current billing period (sealed minutes), by kind.",
                label_names::<TeamKindLabels>(),
            )?,
            contract_allocated: desc(
                "commitmeter_contract_allocated_gpu_seconds_total",
                "GPU-seconds a compute process held the contract's GPUs over sealed ledger minutes (from agents with the allocated counters).",
                label_names::<ContractLabels>(),
            )?,
        })
    }

    /// A contract's all-time team figures (from the durable books).
    pub fn set_all_time(&self, contract: &str, allocated: i64, teams: Vec<(String, i64, i64)>) {
        let mut v = self.values.lock().expect("team series lock");
        let e = v.entry(contract.to_string()).or_default();
        e.allocated = allocated;
        e.all_time = teams;
    }

    /// A contract's team figures of its current billing period.
    pub fn set_period(&self, contract: &str, teams: Vec<(String, i64, i64)>) {
        let mut v = self.values.lock().expect("team series lock");
        v.entry(contract.to_string()).or_default().period = teams;
    }
}

impl Collector for TeamSeries {
    fn desc(&self) -> Vec<&Desc> {
        vec![
            &self.allocated,
            &self.used,
            &self.period,
            &self.contract_allocated,
        ]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let values = self.values.lock().expect("team series lock");
        let team = |pick: fn(&(String, i64, i64)) -> i64| {
            values
                .iter()
                .flat_map(|(id, v)| {
                    v.all_time.iter().map(move |row| {
                        (
                            TeamLabels {
                                contract: id,
                                team: &row.0,
                            }
                            .pairs(),
                            pick(row),
                        )
                    })
                })
                .collect()
        };
        let period = family(
            &self.period,
            MetricType::GAUGE,
            values
                .iter()
                .flat_map(|(id, v)| {
                    v.period.iter().flat_map(move |(team, a, u)| {
                        [("allocated", *a), ("used", *u)].map(|(kind, ms)| {
                            (
                                TeamKindLabels {
                                    contract: id,
                                    team,
                                    kind,
                                }
                                .pairs(),
                                ms,
                            )
                        })
                    })
                })
                .collect(),
        );
        vec![
            counter_family(&self.allocated, team(|r| r.1)),
            counter_family(&self.used, team(|r| r.2)),
            period,
            counter_family(
                &self.contract_allocated,
                values
                    .iter()
                    .map(|(id, v)| (ContractLabels { contract: id }.pairs(), v.allocated))
                    .collect(),
            ),
        ]
    }
}

pub struct AggregatorMetrics {
    pub registry: Registry,
    pub ledger: LedgerCounters,
    pub teams: TeamSeries,
    pub period: Gauges<ContractKindLabels<'static>>,
    pub info: Gauges<ContractInfoLabels<'static>>,
    pub committed_gpus: Gauges<ContractLabels<'static>>,
    pub target_utilization: Gauges<ContractLabels<'static>>,
    pub period_start: Gauges<ContractLabels<'static>>,
    pub period_end: Gauges<ContractLabels<'static>>,
    pub utilization: Gauges<ContractLabels<'static>>,
    pub idle_budget_remaining: Gauges<ContractLabels<'static>>,
    pub projected_utilization: Gauges<ContractLabels<'static>>,
    pub required_utilization: Gauges<ContractLabels<'static>>,
    pub cost: Gauges<CostLabels<'static>>,
    pub price: Gauges<PriceLabels<'static>>,
    pub tier_reachable: Gauges<TierLabels<'static>>,
    pub usage_fallback: Gauges<ContractLabels<'static>>,
    pub rejected: Counters<RejectedLabels<'static>>,
    pub sealed_through: IntGauge,
    pub since: IntGauge,
    pub store_errors: IntCounters<OperationLabels<'static>>,
    pub pending: IntGauge,
    pub scrape_connections: IntGauge,
    pub write_ok: IntGauge,
    pub target_up: Gauges<TargetContractLabels<'static>>,
    pub target_duration: Gauges<TargetLabels<'static>>,
    pub target_gpus: Gauges<TargetLabels<'static>>,
    pub target_errors: IntCounters<TargetReasonLabels<'static>>,
    pub targets_problems: IntGauge,
    pub reload_ok: IntGauge,
    pub reload_time: IntGauge,
    pub restart_required: IntGauge,
    /// `[storage] postgres` only ([`AggregatorMetrics::with_book`]).
    pub book: Option<BookMetrics>,
}

impl AggregatorMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let build = IntGauge::with_opts(
            Opts::new(
                "commitmeter_build_info",
                "Build of the running commitmeter.",
            )
            .const_label("version", env!("CARGO_PKG_VERSION"))
            .const_label("role", "aggregator"),
        )?;
        build.set(1);
        registry.register(Box::new(build))?;

        let ledger = LedgerCounters::new()?;
        registry.register(Box::new(ledger.clone()))?;
        let teams = TeamSeries::new()?;
        registry.register(Box::new(teams.clone()))?;
        let rejected = Family::register(
            &registry,
            "commitmeter_ledger_rejected_gpu_seconds_total",
            "GPU-seconds of agent readings not credited because they were physically impossible (booked unreported), by reason.",
        )?;
        let sealed_through = IntGauge::new(
            "commitmeter_ledger_sealed_through_timestamp_seconds",
            "Ledger minutes before this time are sealed and durable.",
        )?;
        registry.register(Box::new(sealed_through.clone()))?;
        let since = IntGauge::new(
            "commitmeter_ledger_since_timestamp_seconds",
            "The ledger accounts minutes from this time on; earlier minutes are absent.",
        )?;
        registry.register(Box::new(since.clone()))?;
        let store_errors: IntCounters<OperationLabels> = Family::register(
            &registry,
            "commitmeter_ledger_store_errors_total",
            "Failed writes to the ledger database.",
        )?;
        // Exported from the start: a failed write is an increase, not a new series.
        store_errors.with(&OperationLabels {
            operation: "commit",
        });
        let pending = IntGauge::new(
            "commitmeter_ledger_pending_minutes",
            "Sealed contract-minutes waiting in memory to be written to the ledger database (not yet in the counters).",
        )?;
        registry.register(Box::new(pending.clone()))?;
        let scrape_connections = IntGauge::new(
            "commitmeter_scrape_connections",
            "Scrape connections kept open for the next round at the end of the last one (at most one per agent).",
        )?;
        registry.register(Box::new(scrape_connections.clone()))?;
        let write_ok = IntGauge::new(
            "commitmeter_ledger_last_write_successful",
            "1 if the last write of the ledger database succeeded; 0 while it cannot be written (the aggregator is then not ready).",
        )?;
        registry.register(Box::new(write_ok.clone()))?;
        let target_errors = Family::register(
            &registry,
            "commitmeter_target_scrape_errors_total",
            "Failed scrapes of an agent, by reason.",
        )?;
        let targets_problems = IntGauge::new(
            "commitmeter_targets_config_problems",
            "Targets or file_sd files skipped at the last target refresh (see the log).",
        )?;
        registry.register(Box::new(targets_problems.clone()))?;
        let reload_ok = IntGauge::new(
            "commitmeter_config_last_reload_successful",
            "1 if the last read of the config file (at start or on SIGHUP) succeeded.",
        )?;
        registry.register(Box::new(reload_ok.clone()))?;
        let reload_time = IntGauge::new(
            "commitmeter_config_last_reload_success_timestamp_seconds",
            "When the config file was last read successfully.",
        )?;
        registry.register(Box::new(reload_time.clone()))?;
        let restart_required = IntGauge::new(
            "commitmeter_config_restart_required",
            "1 if the config file on disk changes contracts or scrape settings, which apply only after a restart.",
        )?;
        registry.register(Box::new(restart_required.clone()))?;

        Ok(Self {
            period: Family::register(
                &registry,
                "commitmeter_contract_period_gpu_seconds",
                "Month-to-date GPU-seconds of the current billing period, by kind (sealed minutes).",
            )?,
            info: Family::register(
                &registry,
                "commitmeter_contract_info",
                "A contract and its terms.",
            )?,
            committed_gpus: Family::register(
                &registry,
                "commitmeter_contract_committed_gpus",
                "GPUs committed right now (the ramp step in force).",
            )?,
            target_utilization: Family::register(
                &registry,
                "commitmeter_contract_target_utilization_ratio",
                "Utilization the contract owner aims for; 1 minus this is the idle budget.",
            )?,
            period_start: Family::register(
                &registry,
                "commitmeter_contract_period_start_timestamp_seconds",
                "Start of the current billing period.",
            )?,
            period_end: Family::register(
                &registry,
                "commitmeter_contract_period_end_timestamp_seconds",
                "End of the current billing period.",
            )?,
            utilization: Family::register(
                &registry,
                "commitmeter_contract_utilization_ratio",
                "Month-to-date used (within commitment) / committed GPU-seconds.",
            )?,
            idle_budget_remaining: Family::register(
                &registry,
                "commitmeter_contract_idle_budget_remaining_ratio",
                "Share of the period's idle budget not yet spent (negative once overspent).",
            )?,
            projected_utilization: Family::register(
                &registry,
                "commitmeter_contract_projected_utilization_ratio",
                "Period-end utilization if the last 24 h pace of use continues.",
            )?,
            required_utilization: Family::register(
                &registry,
                "commitmeter_contract_required_utilization_ratio",
                "Utilization needed over the rest of the period to reach the target.",
            )?,
            cost: Family::register(
                &registry,
                "commitmeter_contract_period_cost",
                "Month-to-date cost in the contract's currency, by kind.",
            )?,
            price: Family::register(
                &registry,
                "commitmeter_contract_price_per_gpu_second",
                "Price of one committed GPU-second in the contract's currency (× 3600 per GPU-hour).",
            )?,
            tier_reachable: Family::register(
                &registry,
                "commitmeter_contract_burn_rate_tier_reachable",
                "1 if the underuse burn-rate tier can fire for this contract's target and period, 0 if its threshold is above 100 % idle.",
            )?,
            usage_fallback: Family::register(
                &registry,
                "commitmeter_contract_usage_fallback_gpus",
                "GPUs of a contract with usage_signal = \"sm_active\" counted with busy time instead (no GPM), as of their agents' last readings.",
            )?,
            target_up: Family::register(
                &registry,
                "commitmeter_target_up",
                "1 if the last scrape of the agent succeeded.",
            )?,
            target_duration: Family::register(
                &registry,
                "commitmeter_target_scrape_duration_seconds",
                "Duration of the last scrape of the agent.",
            )?,
            target_gpus: Family::register(
                &registry,
                "commitmeter_target_gpus",
                "GPUs the agent reported at its last successful scrape (after the model filter).",
            )?,
            ledger,
            teams,
            rejected,
            sealed_through,
            since,
            store_errors,
            pending,
            scrape_connections,
            write_ok,
            target_errors,
            targets_problems,
            reload_ok,
            reload_time,
            restart_required,
            registry,
            book: None,
        })
    }

    /// Adds the shared book's series (`[storage] postgres`).
    pub fn with_book(mut self, shard: crate::contract::ShardSpec) -> prometheus::Result<Self> {
        self.book = Some(BookMetrics::register(&self.registry, shard)?);
        Ok(self)
    }

    /// Static series of a contract.
    pub fn describe(&self, c: &Contract) {
        let contract = ContractLabels { contract: &c.id };
        self.info.with(&ContractInfoLabels::of(c)).set(1.0);
        self.target_utilization
            .with(&contract)
            .set(c.target_utilization);
        self.price
            .with(&PriceLabels {
                contract: &c.id,
                currency: &c.currency,
            })
            .set(c.price_per_gpu_hour / 3600.0);
        self.usage_fallback.with(&contract).set(0.0);
        // Exported from the start (0), so an alert on their increase has a baseline.
        for why in crate::ledger::Reject::ALL {
            self.rejected.with(&RejectedLabels {
                contract: &c.id,
                reason: why.as_str(),
            });
        }
    }

    pub fn set_period(&self, c: &Contract, start_ms: i64, end_ms: i64, t: &Totals, f: &Figures) {
        let id = c.id.as_str();
        let contract = ContractLabels { contract: id };
        for kind in Kind::ALL {
            self.period
                .with(&ContractKindLabels { contract: id, kind })
                .set(t[kind] as f64 / 1000.0);
        }
        self.period_start
            .with(&contract)
            .set(start_ms as f64 / 1000.0);
        self.period_end.with(&contract).set(end_ms as f64 / 1000.0);
        let opt = |g: &Gauges<ContractLabels>, v: Option<f64>| match v {
            Some(v) if v.is_finite() => g.with(&contract).set(v),
            _ => {
                g.remove(&contract);
            }
        };
        opt(&self.utilization, f.utilization);
        opt(&self.idle_budget_remaining, f.idle_budget_remaining);
        opt(&self.projected_utilization, f.projected_utilization);
        opt(&self.required_utilization, f.required_utilization);
        for kind in Kind::ALL {
            if let Some(v) = f.cost(kind) {
                self.cost
                    .with(&CostLabels {
                        contract: id,
                        currency: &c.currency,
                        kind,
                    })
                    .set(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The team series as exposed: seconds from integer GPU-ms, one row per team with
    /// time, the period gauge by kind, the contract's allocated; they pass `promtool check
    /// metrics` (checked alone: `commitmeter_ledger_pending_minutes`, older, draws a unit
    /// lint of its own).
    #[test]
    fn the_team_series_render_from_gpu_ms_and_pass_promtool() {
        let m = AggregatorMetrics::new().unwrap();
        let rows = vec![
            ("ml".to_string(), 90_500, 30_000),
            ("unassigned".to_string(), 30_000, 0),
        ];
        m.teams.set_all_time("acme", 120_500, rows.clone());
        m.teams.set_period("acme", rows);
        let body = prometheus::TextEncoder::new()
            .encode_to_string(&m.teams.collect())
            .unwrap();
        for line in [
            "commitmeter_contract_allocated_gpu_seconds_total{contract=\"acme\"} 120.5",
            "commitmeter_team_allocated_gpu_seconds_total{contract=\"acme\",team=\"ml\"} 90.5",
            "commitmeter_team_used_gpu_seconds_total{contract=\"acme\",team=\"unassigned\"} 0",
            "commitmeter_team_period_gpu_seconds{contract=\"acme\",team=\"ml\",kind=\"used\"} 30",
            "# TYPE commitmeter_team_period_gpu_seconds gauge",
        ] {
            assert!(body.contains(line), "{line}\n{body}");
        }
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool not found: install Debian's `prometheus` package (see .ci/run)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && report.trim().is_empty(),
            "promtool: {report}\n{body}"
        );
    }
}
