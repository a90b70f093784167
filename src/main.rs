use anyhow::Context;
use clap::Parser;

use commitmeter::aggregator::store;
use commitmeter::cli::{Cli, Command, LedgerCommand};
use commitmeter::{agent, aggregator, check, demo, logging};

/// mimalloc for the aggregator and the demo, the system allocator otherwise (see `alloc`).
#[global_allocator]
static ALLOCATOR: commitmeter::alloc::RoleAllocator = commitmeter::alloc::RoleAllocator;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("commitmeter: {}", chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", like anyhow's `{:#}`, but a cause whose text the
/// previous message already contains is left out: most of our errors print their source
/// themselves, and "No such file or directory (os error 2)" twice helps nobody.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut prev = String::new();
    for cause in e.chain() {
        let m = cause.to_string();
        if !prev.contains(&m) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&m);
        }
        prev = m;
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    logging::init(&cli.log_level, cli.log_format)?;
    let allocator = if commitmeter::alloc::using_mimalloc() {
        "mimalloc"
    } else {
        "system"
    };
    tracing::debug!(allocator, "allocator chosen");
    match cli.command {
        Command::Agent(args) => {
            // Config mistakes end the process here, before a socket or NVML is touched.
            let prepared = agent::prepare(args)?;
            run_to_end(agent::run(prepared, shutdown_signal()))?;
        }
        Command::Aggregator(args) => {
            // Config mistakes end the process here, before the ledger or a socket is touched.
            let prepared = aggregator::prepare(args)?;
            let clock = std::sync::Arc::new(commitmeter::clock::SystemClock);
            run_to_end(aggregator::run(prepared, clock, shutdown_signal()))?;
        }
        Command::Demo(args) => {
            let opts = demo::DemoOptions {
                listen_address: args.listen_address,
                speed: args.speed,
                story: args.story,
                data_dir: args.data_dir,
            };
            run_to_end(demo::run(opts, shutdown_signal()))?;
        }
        Command::Ledger(LedgerCommand::Backup(args)) => {
            let done = store::backup(&args.storage_path, &args.output, args.timeout)?;
            println!("{done}");
        }
        Command::Statement(args) => {
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
            print!("{}", commitmeter::statement_cmd::run(&args, terminal)?);
        }
        Command::CheckConfig(args) => {
            for file in &args.files {
                let checked = check::check_file(file, args.kind)?;
                println!("{}", checked.summary);
                for line in &checked.details {
                    println!("{line}");
                }
                for w in &checked.warnings {
                    eprintln!("commitmeter: warning: {w}");
                }
            }
        }
    }
    Ok(())
}

/// Runs a role on a multi-threaded runtime: serving, scraping and rendering proceed
/// side by side, so one slow client, target or page cannot stall the rest. At the end,
/// blocking work that is still stuck (a hung disk, a FIFO) is abandoned after a few
/// seconds instead of holding the process.
fn run_to_end<T, E>(role: impl std::future::Future<Output = Result<T, E>>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(role);
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    Ok(result?)
}

/// Completes on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
