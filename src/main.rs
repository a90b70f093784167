use anyhow::Context;
use clap::Parser;

use commitmeter::aggregator::store;
use commitmeter::cli::{Cli, Command, LedgerCommand};
use commitmeter::{agent, aggregator, check, demo, logging};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("commitmeter: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    logging::init(&cli.log_level, cli.log_format)?;
    match cli.command {
        Command::Agent(args) => {
            // Config mistakes end the process here, before a socket or NVML is touched.
            let prepared = agent::prepare(args)?;
            runtime()?.block_on(agent::run(prepared, shutdown_signal()))?;
        }
        Command::Aggregator(args) => {
            let mut prepared = aggregator::prepare(
                &args.config_file,
                &args.listen_address,
                args.storage_path,
                args.web_config_file.as_deref(),
            )?;
            prepared.storage = store::StoreOptions {
                role: store::Role::Aggregator,
                create_new: args.storage.create_new,
                discard_future: args.storage.discard_future_minutes,
                host_checkpoint_interval: args.storage.host_checkpoint_interval,
            };
            let clock = std::sync::Arc::new(aggregator::SystemClock);
            runtime()?.block_on(aggregator::run(prepared, clock, shutdown_signal()))?;
        }
        Command::Demo(args) => {
            let opts = demo::DemoOptions {
                listen_address: args.listen_address,
                speed: args.speed,
                story: args.story,
                data_dir: args.data_dir,
            };
            runtime()?.block_on(demo::run(opts, shutdown_signal()))?;
        }
        Command::Ledger(LedgerCommand::Backup(args)) => {
            let done = store::backup(&args.storage_path, &args.output, args.timeout)?;
            println!("{done}");
        }
        Command::CheckConfig(args) => {
            for file in &args.files {
                println!("{}", check::check_file(file)?);
            }
        }
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
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
