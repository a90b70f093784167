//! `commitmeter statement`: reads the contracts and the ledger, builds each statement with the
//! pure [`crate::statement`] and renders it. The only I/O around the model.

use anyhow::{anyhow, bail, Context};

use crate::aggregator::store;
use crate::cli::{StatementArgs, StatementFormat};
use crate::contract::Contract;
use crate::statement::{self, focus, gaps, render, LedgerInfo, Statement};

/// The format of `--evidence`, from its file's extension.
enum Evidence {
    Csv,
    Json,
}

/// The statements asked for, rendered (without `--format`, as
/// [`StatementFormat::default_for`] says for where standard output goes); errors are one line
/// naming the input.
pub fn run(args: &StatementArgs, stdout_is_terminal: bool) -> anyhow::Result<String> {
    let config = crate::contract::load(&args.config_file)?;
    let file = args.config_file.display();
    if config.storage.postgres.is_some() {
        // The local directory holds this shard's hosts only, never sealed minutes: a
        // statement from it would read as nothing delivered.
        bail!(
            "{file}: storage.postgres: the minutes are sealed in the shared book, not in \
             --storage.path; ask any aggregator of the book over HTTP \
             (GET /statements/<contract>/<YYYY-MM>.csv, .json or .focus.csv)"
        );
    }
    let contracts: Vec<&Contract> = match &args.contract {
        Some(id) => {
            let c = config
                .contracts
                .iter()
                .find(|c| &c.id == id)
                .ok_or_else(|| {
                    anyhow!(
                        "--contract {id:?}: no such contract in {file} (its contracts: {})",
                        config
                            .contracts
                            .iter()
                            .map(|c| c.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
            vec![c]
        }
        None => config.contracts.iter().collect(),
    };
    if contracts.is_empty() {
        bail!("{file}: no [[contracts]] to make a statement of");
    }
    let month = args
        .period
        .as_deref()
        .map(|p| statement::parse_period(p).map_err(|e| anyhow!("--period {e}")))
        .transpose()?;
    let evidence = args
        .evidence
        .as_deref()
        .map(|path| match path.extension().and_then(|e| e.to_str()) {
            Some("csv") => Ok((path, Evidence::Csv)),
            Some("json") => Ok((path, Evidence::Json)),
            _ => Err(anyhow!(
                "--evidence {}: expected a .csv or .json file",
                path.display()
            )),
        })
        .transpose()?;
    let now = crate::clock::wall_now_ms();
    let mut statements: Vec<Statement> = Vec::new();
    let mut gap_rows: Vec<gaps::Row> = Vec::new();
    for c in contracts {
        let period = match month {
            Some((y, m)) => {
                let p = c.billing_period_of_month(y, m).ok_or_else(|| {
                    anyhow!("--period {y:04}-{m:02}: out of the calendar's range")
                })?;
                if p.0 > now {
                    bail!(
                        "--period {y:04}-{m:02}: the billing period is in the future (contract {:?}'s starts {}; the current one began {})",
                        c.id,
                        c.local_time(p.0),
                        c.local_time(c.billing_period(now).0)
                    );
                }
                p
            }
            None => c.billing_period(now),
        };
        let (from, to) = statement::minutes_to_read(period, now);
        let read = store::read_minutes(&args.storage_path, &c.id, from, to, args.timeout)?;
        let info = LedgerInfo {
            since_minute: read.since_minute,
            sealed_through_minute: read.sealed_through_minute,
            late: statement::late_by_minute(&read.late),
        };
        // An open gap counts up to the first minute not yet sealed, as the minutes do.
        let until = statement::gaps_until(&info, now);
        gap_rows.extend(gaps::rows(&c.id, &read.gaps, period.0, period.1, until));
        statements.push(statement::build(
            c,
            period,
            &read.minutes,
            &read.gaps,
            &info,
            now,
        ));
    }
    if let Some((path, format)) = evidence {
        let out = match format {
            Evidence::Csv => gaps::csv(&gap_rows).context("cannot write the evidence CSV")?,
            Evidence::Json => gaps::json(&gap_rows),
        };
        std::fs::write(path, out)
            .with_context(|| format!("--evidence {}: cannot write", path.display()))?;
    }
    let format = args
        .format
        .unwrap_or(StatementFormat::default_for(stdout_is_terminal));
    Ok(match format {
        StatementFormat::Text => statements
            .iter()
            .map(render::text)
            .collect::<Vec<_>>()
            .join("\n"),
        StatementFormat::Csv => {
            let mut out = String::new();
            for (i, s) in statements.iter().enumerate() {
                let csv = render::csv(s).context("cannot write CSV")?;
                // One header for all contracts: every statement's rows carry its contract.
                let body = if i == 0 {
                    csv.as_str()
                } else {
                    csv.split_once('\n').map_or("", |(_, rest)| rest)
                };
                out.push_str(body);
            }
            out
        }
        StatementFormat::Focus => focus::csv(&statements).context("cannot write FOCUS CSV")?,
        StatementFormat::Json if statements.len() == 1 => render::json(&statements[0]),
        StatementFormat::Json => {
            let docs: Vec<String> = statements.iter().map(render::json).collect();
            format!("[\n{}]\n", docs.join(",\n"))
        }
    })
}
