//! The aggregator's series. Names are a public contract: dashboards and alert rules
//! read them. Counters move only when minutes seal, so they never go back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{CounterVec, GaugeVec, IntCounterVec, IntGauge, Opts, Registry};

use crate::contract::Contract;
use crate::ledger::totals::Figures;
use crate::ledger::{Kind, Totals};

/// The names of the ledger kinds, in the order of their series (see [`Kind`]).
pub const KINDS: [&str; Kind::COUNT] = Kind::NAMES;

/// The all-time ledger counters (the seven kinds, and late GPU-seconds), rendered from the
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
                    vec!["contract".into()],
                    Default::default(),
                )
            })
            .collect::<Result<_, _>>()?;
        let late = Desc::new(
            "commitmeter_ledger_late_gpu_seconds_total".into(),
            "GPU-seconds that arrived for already sealed minutes and were not counted.".into(),
            vec!["contract".into(), "kind".into()],
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

fn counter_family(desc: &Desc, samples: Vec<(Vec<(&str, &str)>, i64)>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(desc.fq_name.clone());
    family.set_help(desc.help.clone());
    family.set_field_type(MetricType::COUNTER);
    family.set_metric(
        samples
            .into_iter()
            .map(|(labels, ms)| {
                let pairs = labels
                    .into_iter()
                    .map(|(k, v)| {
                        let mut p = proto::LabelPair::default();
                        p.set_name(k.to_string());
                        p.set_value(v.to_string());
                        p
                    })
                    .collect();
                let mut m = proto::Metric::from_label(pairs);
                let mut c = proto::Counter::default();
                c.set_value(ms as f64 / 1000.0);
                m.set_counter(c);
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
                    .map(|(id, (t, _))| (vec![("contract", id.as_str())], t[kind]))
                    .collect();
                counter_family(desc, samples)
            })
            .collect();
        let late = values
            .iter()
            .flat_map(|(id, (_, (d, u)))| {
                [
                    (vec![("contract", id.as_str()), ("kind", "delivered")], *d),
                    (vec![("contract", id.as_str()), ("kind", "used")], *u),
                ]
            })
            .collect();
        out.push(counter_family(&self.late, late));
        out
    }
}

pub struct AggregatorMetrics {
    pub registry: Registry,
    pub ledger: LedgerCounters,
    pub period: GaugeVec,
    pub info: GaugeVec,
    pub committed_gpus: GaugeVec,
    pub target_utilization: GaugeVec,
    pub period_start: GaugeVec,
    pub period_end: GaugeVec,
    pub utilization: GaugeVec,
    pub idle_budget_remaining: GaugeVec,
    pub projected_utilization: GaugeVec,
    pub required_utilization: GaugeVec,
    pub cost: GaugeVec,
    pub price: GaugeVec,
    pub tier_reachable: GaugeVec,
    pub rejected: CounterVec,
    pub sealed_through: IntGauge,
    pub since: IntGauge,
    pub store_errors: IntCounterVec,
    pub pending: IntGauge,
    pub write_ok: IntGauge,
    pub target_up: GaugeVec,
    pub target_duration: GaugeVec,
    pub target_gpus: GaugeVec,
    pub target_errors: IntCounterVec,
    pub targets_problems: IntGauge,
    pub reload_ok: IntGauge,
    pub reload_time: IntGauge,
    pub restart_required: IntGauge,
}

impl AggregatorMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let gauge =
            |name: &str, help: &str, labels: &[&str]| -> Result<GaugeVec, prometheus::Error> {
                let g = GaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
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
        let rejected = CounterVec::new(
            Opts::new(
                "commitmeter_ledger_rejected_gpu_seconds_total",
                "GPU-seconds of agent readings not credited because they were physically impossible (booked unreported), by reason.",
            ),
            &["contract", "reason"],
        )?;
        registry.register(Box::new(rejected.clone()))?;
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
        let store_errors = IntCounterVec::new(
            Opts::new(
                "commitmeter_ledger_store_errors_total",
                "Failed writes to the ledger database.",
            ),
            &["operation"],
        )?;
        registry.register(Box::new(store_errors.clone()))?;
        // Exported from the start: a failed write is an increase, not a new series.
        store_errors.with_label_values(&["commit"]);
        let pending = IntGauge::new(
            "commitmeter_ledger_pending_minutes",
            "Sealed contract-minutes waiting in memory to be written to the ledger database (not yet in the counters).",
        )?;
        registry.register(Box::new(pending.clone()))?;
        let write_ok = IntGauge::new(
            "commitmeter_ledger_last_write_successful",
            "1 if the last write of the ledger database succeeded; 0 while it cannot be written (the aggregator is then not ready).",
        )?;
        registry.register(Box::new(write_ok.clone()))?;
        let target_errors = IntCounterVec::new(
            Opts::new(
                "commitmeter_target_scrape_errors_total",
                "Failed scrapes of an agent, by reason.",
            ),
            &["target", "reason"],
        )?;
        registry.register(Box::new(target_errors.clone()))?;
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
            period: gauge(
                "commitmeter_contract_period_gpu_seconds",
                "Month-to-date GPU-seconds of the current billing period, by kind (sealed minutes).",
                &["contract", "kind"],
            )?,
            info: gauge(
                "commitmeter_contract_info",
                "A contract and its terms.",
                &["contract", "provider", "currency", "usage_signal", "timezone"],
            )?,
            committed_gpus: gauge(
                "commitmeter_contract_committed_gpus",
                "GPUs committed right now (the ramp step in force).",
                &["contract"],
            )?,
            target_utilization: gauge(
                "commitmeter_contract_target_utilization_ratio",
                "Utilization the contract owner aims for; 1 minus this is the idle budget.",
                &["contract"],
            )?,
            period_start: gauge(
                "commitmeter_contract_period_start_timestamp_seconds",
                "Start of the current billing period.",
                &["contract"],
            )?,
            period_end: gauge(
                "commitmeter_contract_period_end_timestamp_seconds",
                "End of the current billing period.",
                &["contract"],
            )?,
            utilization: gauge(
                "commitmeter_contract_utilization_ratio",
                "Month-to-date used (within commitment) / committed GPU-seconds.",
                &["contract"],
            )?,
            idle_budget_remaining: gauge(
                "commitmeter_contract_idle_budget_remaining_ratio",
                "Share of the period's idle budget not yet spent (negative once overspent).",
                &["contract"],
            )?,
            projected_utilization: gauge(
                "commitmeter_contract_projected_utilization_ratio",
                "Period-end utilization if the last 24 h pace of use continues.",
                &["contract"],
            )?,
            required_utilization: gauge(
                "commitmeter_contract_required_utilization_ratio",
                "Utilization needed over the rest of the period to reach the target.",
                &["contract"],
            )?,
            cost: gauge(
                "commitmeter_contract_period_cost",
                "Month-to-date cost in the contract's currency, by kind.",
                &["contract", "currency", "kind"],
            )?,
            price: gauge(
                "commitmeter_contract_price_per_gpu_second",
                "Price of one committed GPU-second in the contract's currency (× 3600 per GPU-hour).",
                &["contract", "currency"],
            )?,
            tier_reachable: gauge(
                "commitmeter_contract_burn_rate_tier_reachable",
                "1 if the underuse burn-rate tier can fire for this contract's target and period, 0 if its threshold is above 100 % idle.",
                &["contract", "tier"],
            )?,
            target_up: gauge(
                "commitmeter_target_up",
                "1 if the last scrape of the agent succeeded.",
                &["target", "contract"],
            )?,
            target_duration: gauge(
                "commitmeter_target_scrape_duration_seconds",
                "Duration of the last scrape of the agent.",
                &["target"],
            )?,
            target_gpus: gauge(
                "commitmeter_target_gpus",
                "GPUs the agent reported at its last successful scrape (after the model filter).",
                &["target"],
            )?,
            ledger,
            rejected,
            sealed_through,
            since,
            store_errors,
            pending,
            write_ok,
            target_errors,
            targets_problems,
            reload_ok,
            reload_time,
            restart_required,
            registry,
        })
    }

    /// Static series of a contract.
    pub fn describe(&self, c: &Contract) {
        self.info
            .with_label_values(&[
                &c.id,
                &c.provider,
                &c.currency,
                c.usage_signal.as_str(),
                &c.timezone_name,
            ])
            .set(1.0);
        self.target_utilization
            .with_label_values(&[&c.id])
            .set(c.target_utilization);
        self.price
            .with_label_values(&[&c.id, &c.currency])
            .set(c.price_per_gpu_hour / 3600.0);
        // Exported from the start (0), so an alert on their increase has a baseline.
        for why in crate::ledger::Reject::ALL {
            self.rejected.with_label_values(&[&c.id, why.as_str()]);
        }
    }

    pub fn set_period(&self, c: &Contract, start_ms: i64, end_ms: i64, t: &Totals, f: &Figures) {
        let id = c.id.as_str();
        for kind in Kind::ALL {
            self.period
                .with_label_values(&[id, kind.name()])
                .set(t[kind] as f64 / 1000.0);
        }
        self.period_start
            .with_label_values(&[id])
            .set(start_ms as f64 / 1000.0);
        self.period_end
            .with_label_values(&[id])
            .set(end_ms as f64 / 1000.0);
        let opt = |g: &GaugeVec, v: Option<f64>| match v {
            Some(v) if v.is_finite() => g.with_label_values(&[id]).set(v),
            _ => {
                let _ = g.remove_label_values(&[id]);
            }
        };
        opt(&self.utilization, f.utilization);
        opt(&self.idle_budget_remaining, f.idle_budget_remaining);
        opt(&self.projected_utilization, f.projected_utilization);
        opt(&self.required_utilization, f.required_utilization);
        for kind in Kind::ALL {
            if let Some(v) = f.cost(kind) {
                self.cost
                    .with_label_values(&[id, &c.currency, kind.name()])
                    .set(v);
            }
        }
    }
}
