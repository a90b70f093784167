//! `commitmeter demo`: the whole pipeline on one machine with no GPU. A simulated
//! fleet serves agent expositions (through the agent's own metrics code) on
//! simulated time; the real aggregator scrapes it into a real SQLite ledger on the
//! same simulated clock. Only the source of time and of counters is simulated.

pub mod sim;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::StatusCode;

use crate::agent::metrics::{
    AgentMetrics, GaugeKind, GpuInfoLabels, GpuSeries, GpuXidLabels, OwnerLabels,
};
use crate::aggregator;
use crate::aggregator::store::{Role, Store, StoreOptions};
use crate::clock::{self, Clock};
use crate::http;
use sim::{Fleet, Story};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Aggregator(#[from] aggregator::AggregatorError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("demo data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub struct DemoOptions {
    pub listen_address: String,
    pub speed: f64,
    pub story: Story,
    pub data_dir: Option<PathBuf>,
}

/// Simulated time: `start_ms` plus `speed` times the real time elapsed, until frozen.
pub struct SimClock {
    start_ms: i64,
    real_start: Instant,
    speed: f64,
    /// The simulated time it stands at once frozen; [`NOT_FROZEN`] until then.
    frozen_ms: AtomicI64,
}

const NOT_FROZEN: i64 = i64::MIN;

impl SimClock {
    fn new(start_ms: i64, speed: f64) -> Self {
        Self {
            start_ms,
            real_start: clock::monotonic_now(),
            speed,
            frozen_ms: AtomicI64::new(NOT_FROZEN),
        }
    }

    /// Stops simulated time where it is now; it stays there (a second call changes nothing).
    fn freeze(&self) {
        let now = self.now_ms();
        let _ =
            self.frozen_ms
                .compare_exchange(NOT_FROZEN, now, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        match self.frozen_ms.load(Ordering::Acquire) {
            NOT_FROZEN => {
                self.start_ms
                    + (clock::elapsed(self.real_start).as_secs_f64() * 1000.0 * self.speed) as i64
            }
            frozen => frozen,
        }
    }

    fn scale(&self, real: std::time::Duration) -> i64 {
        (real.as_secs_f64() * 1000.0 * self.speed) as i64
    }
}

/// One simulated host's agent series, kept so updates never look labels up.
struct HostSeries {
    metrics: AgentMetrics,
    gpus: Vec<GpuSeries>,
}

struct Sim {
    fleet: Mutex<Fleet>,
    hosts: Vec<HostSeries>,
    clock: Arc<SimClock>,
    /// Per host, how many times its exposition was read.
    reads: Vec<AtomicU64>,
}

/// How long a stop waits for the aggregator to read every host at the frozen time.
const STOP_WAIT: Duration = Duration::from_secs(10);

impl Sim {
    /// At a stop, before the aggregator's last seal: freezes simulated time, then waits
    /// (at most [`STOP_WAIT`]) until a scrape round that read every host at the frozen time
    /// has been booked. Every host read twice since the freeze proves it: either a round
    /// read them all after the freeze and the next one has begun, or some host's second
    /// read is two rounds on, and rounds start only once the one before is booked.
    ///
    /// Without it, the last seal would run at the simulated time of the stop, up to one
    /// scrape interval plus the stop's own real time past the last readings (at `--speed
    /// 2400`, one real second is 40 simulated minutes, far beyond the 5-minute grace), and
    /// the minutes sealed after the readings would be unreported.
    async fn freeze_and_settle(&self) {
        self.clock.freeze();
        let base: Vec<u64> = self
            .reads
            .iter()
            .map(|r| r.load(Ordering::Acquire))
            .collect();
        let deadline = clock::monotonic_now() + STOP_WAIT;
        while self
            .reads
            .iter()
            .zip(&base)
            .any(|(r, b)| r.load(Ordering::Acquire) < b + 2)
        {
            if clock::monotonic_now() >= deadline {
                tracing::warn!(
                    "stopping before every simulated host was read at the frozen time; the last minutes may be unreported"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exposition of host `i` at the current simulated time, or None if it is down.
    fn render(
        &self,
        i: usize,
    ) -> Option<hyper::Response<http_body_util::Full<hyper::body::Bytes>>> {
        self.reads.get(i)?.fetch_add(1, Ordering::AcqRel);
        let mut fleet = self.fleet.lock().expect("fleet lock");
        fleet.advance(self.clock.now_ms());
        let host = fleet.hosts.get(i)?;
        let series = &self.hosts[i];
        if !host.reachable {
            return Some(http::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "host down\n",
            ));
        }
        let m = &series.metrics;
        let raise = |c: &prometheus::Counter, to: f64| {
            if to > c.get() {
                c.inc_by(to - c.get());
            }
        };
        // The counters below are the fleet's at `t_ms`: the round they belong to, watched
        // since the simulation started.
        m.last_round.set(fleet.t_ms as f64 / 1000.0);
        raise(&m.sampled, (fleet.t_ms - fleet.start_ms) as f64 / 1000.0);
        for (g, s) in host.gpus.iter().zip(&series.gpus) {
            raise(&s.observed, g.observed_s);
            raise(&s.busy, g.busy_s);
            raise(&m.allocated.with(&s.labels()), g.allocated_s);
            raise(&m.allocated_busy.with(&s.labels()), g.allocated_busy_s);
            // Only GPUs with GPM have activity series, created when the GPU was adopted.
            if g.gpm {
                raise(&m.sm_active.with(&s.labels()), g.sm_active_s);
                raise(&m.tensor_active.with(&s.labels()), g.tensor_active_s);
                raise(
                    &m.allocated_sm_active.with(&s.labels()),
                    g.allocated_sm_active_s,
                );
            }
            raise(&m.energy.with(&s.labels()), g.energy_j);
            // The host's job is the GPU's only owner: its share is the GPU's allocated time.
            let owner = demo_owner(i);
            let ol = OwnerLabels::of(s, &owner);
            raise(&m.owner_allocated.with(&ol), g.allocated_s);
            raise(&m.owner_busy.with(&ol), g.allocated_busy_s);
            if g.gpm {
                raise(&m.owner_sm_active.with(&ol), g.allocated_sm_active_s);
            }
            if g.up && g.allocated {
                m.owner_info.with(&ol).set(1.0);
            } else {
                m.owner_info.remove(&ol);
            }
            for &(code, n) in &g.xids {
                let c = m.xid.with(&GpuXidLabels {
                    gpu: &s.gpu,
                    uuid: &s.uuid,
                    xid: &code.to_string(),
                });
                raise(&c, n as f64);
            }
            s.up.set(if g.up { 1.0 } else { 0.0 });
            let on = |v: f64| g.up.then_some(v);
            m.set_gauge(GaugeKind::Utilization, s, on(g.utilization));
            m.set_gauge(GaugeKind::MemoryTotal, s, on(85_899_345_920.0));
            m.set_gauge(
                GaugeKind::MemoryUsed,
                s,
                // A job holds memory whether or not it computes.
                on(if g.allocated {
                    85_899_345_920.0 * (0.3 + 0.6 * g.utilization)
                } else {
                    0.0
                }),
            );
            m.set_gauge(GaugeKind::Power, s, on(g.power_w));
            m.set_gauge(GaugeKind::PowerLimit, s, on(700.0));
            m.set_gauge(
                GaugeKind::Temperature,
                s,
                on(35.0 + 40.0 * g.power_w / 700.0),
            );
            m.set_gauge(GaugeKind::SmClock, s, on(1.98e9));
            m.set_gauge(
                GaugeKind::Processes,
                s,
                on(if g.allocated { 1.0 } else { 0.0 }),
            );
        }
        Some(http::metrics(&m.registry))
    }
}

/// The Slurm accounts of the demo's jobs, host by host in turn, and the `[[teams]]` that
/// claim them: `ops-scratch` is no team's, so its hosts' time is `unassigned`.
const DEMO_ACCOUNTS: [(&str, &str); 5] = [
    ("vision", "alice"),
    ("llm-pretrain", "bob"),
    ("llm-finetune", "bob"),
    ("research", "carol"),
    ("ops-scratch", "dave"),
];
const DEMO_TEAMS: &str = "[[teams]]\nname = \"vision\"\nslurm_account = \"vision\"\n\n\
                          [[teams]]\nname = \"llm\"\nslurm_account = \"llm-.*\"\n\n\
                          [[teams]]\nname = \"research\"\nslurm_account = \"research\"\nuser = \"carol\"\n";

/// The job holding host `i`'s GPUs whenever they are allocated: one Slurm job per host.
fn demo_owner(i: usize) -> crate::owner::Owner {
    let (account, user) = DEMO_ACCOUNTS[i % DEMO_ACCOUNTS.len()];
    crate::owner::Owner {
        kind: crate::owner::OwnerKind::SlurmJob,
        id: (70_000 + i).to_string(),
        user: user.into(),
        account: account.into(),
        ..crate::owner::Owner::default()
    }
}

/// The first instant of the simulation: the 2nd of this month at 00:00 UTC, so every
/// contract's local billing period (New York, Los Angeles, Berlin) has begun.
fn sim_start() -> i64 {
    let utc = jiff::tz::TimeZone::UTC;
    let now = clock::wall_now();
    let today = utc.to_datetime(now).date();
    today
        .first_of_month()
        .tomorrow()
        .ok()
        .and_then(|d| utc.to_timestamp(d.at(0, 0, 0, 0)).ok())
        .map_or_else(|| now.as_millisecond(), |t| t.as_millisecond())
}

/// The demo's `scrape_interval` and `scrape_timeout`, in real seconds.
const SCRAPE_INTERVAL_S: u64 = 1;
const SCRAPE_TIMEOUT_S: u64 = 1;

/// The demo's `grace` in simulated seconds: the aggregator's own rule (at least
/// `scrape_interval + scrape_timeout`, or a minute seals before the scrape that covers it
/// arrives and is booked unreported) applied on the simulated clock, and at least 5
/// minutes. At `--speed 2400` a round's 2 real seconds are 80 simulated minutes: a 5-minute
/// grace sealed minutes after the readings of hosts read early in a round, unreported.
fn demo_grace_s(speed: f64) -> u64 {
    ((speed * (SCRAPE_INTERVAL_S + SCRAPE_TIMEOUT_S) as f64).ceil() as u64).max(300)
}

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

pub async fn run(
    opts: DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DemoError> {
    let listen = http::parse_listen_address(&opts.listen_address)?;
    let (data_dir, temporary) = match &opts.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("commitmeter-demo-{}", std::process::id())),
            true,
        ),
    };
    let io = |source| DemoError::Io {
        path: data_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&data_dir).map_err(io)?;
    // Before writing anything there: refuse a directory another commitmeter holds, or a
    // ledger that is not a demo's (a production ledger's checkpoints must never be
    // overwritten by a simulated fleet).
    let storage = StoreOptions {
        role: Role::Demo,
        ..StoreOptions::default()
    };
    drop(Store::open_with(&data_dir, &storage).map_err(aggregator::AggregatorError::from)?);

    let start_ms = sim_start();
    let clock = Arc::new(SimClock::new(start_ms, opts.speed));
    let fleet = Fleet::new(opts.story, start_ms);
    let contracts = fleet.contracts();

    // The simulated agents, each with the agent's own metrics code.
    let mut hosts = Vec::new();
    for h in &fleet.hosts {
        let labels = vec![
            ("provider".to_string(), h.provider.to_string()),
            ("cluster".to_string(), h.cluster.to_string()),
        ];
        let metrics = AgentMetrics::new(&labels)?;
        metrics.nvml_up.set(1);
        // Each simulated agent runs from the start of the simulation.
        let started = prometheus::Gauge::new(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
        )?;
        started.set(start_ms as f64 / 1000.0);
        metrics.registry.register(Box::new(started))?;
        let gpus = h
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let s = metrics.gpu(i as u32, &g.uuid);
                metrics
                    .gpu_info
                    .with(&GpuInfoLabels {
                        gpu: &s.gpu,
                        uuid: &g.uuid,
                        model: g.model,
                        pci_bus_id: &format!("00000000:{:02X}:00.0", 0x17 + i),
                        busy_source: "samples",
                        activity_source: if g.gpm { "gpm" } else { "none" },
                    })
                    .set(1.0);
                // As the agent does: a GPU with GPM gets its activity series at 0 when
                // adopted; one without never has them.
                let l = s.labels();
                metrics.allocated_busy.with(&l);
                if g.gpm {
                    metrics.sm_active.with(&l);
                    metrics.tensor_active.with(&l);
                    metrics.allocated_sm_active.with(&l);
                }
                s
            })
            .collect();
        hosts.push(HostSeries { metrics, gpus });
    }
    let sim = Arc::new(Sim {
        reads: hosts.iter().map(|_| AtomicU64::new(0)).collect(),
        fleet: Mutex::new(fleet),
        hosts,
        clock: clock.clone(),
    });
    let agents_listener = http::bind(std::net::SocketAddr::new(listen.ip(), 0)).await?;
    let agents_addr = agents_listener.local_addr().map_err(io)?;
    let reach_ip = if listen.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        listen.ip().to_string()
    };
    let agents_target = format!("{reach_ip}:{}", agents_addr.port());

    // file_sd for the aggregator (and for a Prometheus, if you point one at it).
    let fleet_now = sim.fleet.lock().expect("fleet lock").hosts.clone();
    let groups: Vec<String> = fleet_now
        .iter()
        .enumerate()
        .map(|(i, h)| {
            format!(
                r#"{{"targets":["{agents_target}"],"labels":{{"instance":"{}:9473","provider":"{}","cluster":"{}","__metrics_path__":"/agent/{i}/metrics"}}}}"#,
                h.name, h.provider, h.cluster
            )
        })
        .collect();
    let sd_path = data_dir.join("agents.json");
    std::fs::write(&sd_path, format!("[\n{}\n]\n", groups.join(",\n"))).map_err(io)?;

    let mut toml = format!(
        "# Written by `commitmeter demo`. Durations: scrape_interval is real time,\n\
         # grace is simulated time (the ledger's clock): at least scrape_interval +\n\
         # scrape_timeout of real time, as the aggregator requires, at x{}.\n\
         [aggregator]\nscrape_interval = \"{SCRAPE_INTERVAL_S}s\"\nscrape_timeout = \"{SCRAPE_TIMEOUT_S}s\"\ngrace = \"{}s\"\n\n",
        opts.speed,
        demo_grace_s(opts.speed)
    );
    let _ = writeln!(
        toml,
        "[[file_sd]]\nfiles = [{:?}]\n",
        sd_path.display().to_string()
    );
    for c in &contracts {
        let ramp: Vec<String> = c
            .ramp
            .iter()
            .map(|(h, gpus)| {
                format!(
                    "{{ from = \"{}\", gpus = {gpus} }}",
                    rfc3339(start_ms + h * 3_600_000)
                )
            })
            .collect();
        let _ = writeln!(
            toml,
            "[[contracts]]\nid = \"{}\"\nprovider = \"{}\"\nprice_per_gpu_hour = {}\ncurrency = \"USD\"\ntarget_utilization = {}\ntimezone = \"{}\"\nusage_signal = \"{}\"\nstart = \"{}\"\nselector = '{{provider=\"{}\", cluster=\"{}\"}}'\nramp = [ {} ]\n",
            c.id,
            c.provider,
            c.price_per_gpu_hour,
            c.target,
            c.timezone,
            c.usage_signal,
            rfc3339(start_ms),
            c.provider,
            c.cluster,
            ramp.join(", ")
        );
    }
    toml.push_str(DEMO_TEAMS);
    let config_path = data_dir.join("aggregator.toml");
    std::fs::write(&config_path, toml).map_err(io)?;
    // The same validation as production: a mistake here is a bug in the demo.
    let args = crate::cli::AggregatorArgs {
        config_file: config_path,
        listen_address: opts.listen_address.clone(),
        web_config_file: None,
        storage_path: data_dir.clone(),
        storage: crate::cli::StorageArgs {
            create_new: false,
            discard_future_minutes: false,
            host_checkpoint_interval: storage.host_checkpoint_interval,
        },
        postgres_exit_if_unreachable: false,
    };
    let mut prepared = aggregator::prepare(args)?;
    // The demo's own ledger role, checked above.
    prepared.storage = storage;
    let listener = http::bind(listen).await?;
    let bound = listener.local_addr().map_err(io)?;
    let shown = if bound.ip().is_unspecified() {
        format!("127.0.0.1:{}", bound.port())
    } else {
        bound.to_string()
    };

    let agents_sim = sim.clone();
    let agents_handler = http::handler(move |path: String| {
        let sim = agents_sim.clone();
        async move {
            let rest = path.strip_prefix("/agent/")?;
            let (i, tail) = rest.split_once('/')?;
            if tail != "metrics" {
                return None;
            }
            sim.render(i.parse().ok()?)
        }
    });
    let (stop_agents, agents_stopped) = tokio::sync::oneshot::channel::<()>();
    let agents = tokio::spawn(http::serve(agents_listener, agents_handler, async {
        let _ = agents_stopped.await;
    }));

    println!(
        "commitmeter demo: {} simulated hosts ({} GPUs), {} contracts, story {:?}, simulated time x{} from {}\n\
         \x20 status page:       http://{shown}/\n\
         \x20 contract metrics:  http://{shown}/metrics\n\
         \x20 simulated agents:  http://{agents_target}/agent/0/metrics … (file_sd: {})\n\
         \x20 ledger:            {}\n\
         Ctrl-C to stop.",
        fleet_now.len(),
        fleet_now.iter().map(|h| h.gpus.len()).sum::<usize>(),
        contracts.len(),
        opts.story,
        opts.speed,
        rfc3339(start_ms),
        sd_path.display(),
        data_dir.join("ledger.sqlite3").display(),
    );
    // A stop freezes simulated time and lets the aggregator read every host at it before
    // its last seal and write; only then do the simulated agents stop.
    let settle = sim.clone();
    let stopping = async move {
        shutdown.await;
        settle.freeze_and_settle().await;
    };
    let result = aggregator::serve(prepared, listener, clock, stopping).await;
    let _ = stop_agents.send(());
    let _ = agents.await;
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result.map_err(DemoError::from)
}
