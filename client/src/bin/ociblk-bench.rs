// SPDX-License-Identifier: Apache-2.0

//! `ociblk-bench`: load generator for vhost-user-blk backends. See `ociblk-bench --help`.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Parser;
use ociblk_client::bench::args::{Cli, Command};
use ociblk_client::bench::{dump, job, pread};

/// Prints the report; a closed stdout is an error, not a panic.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing the report to stdout")
}

/// Prints `report` as one line of JSON with `json`, else as its `text`.
fn emit_report<R: serde::Serialize>(
    report: &R,
    json: bool,
    text: impl FnOnce(&R) -> String,
) -> anyhow::Result<()> {
    if json {
        emit(&format!("{}\n", serde_json::to_string(report)?))
    } else {
        emit(&text(report))
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Run(args) => {
            let report = job::run(args).with_context(|| {
                format!(
                    "{} benchmark against {}",
                    args.rw.name(),
                    args.connect.socket.display()
                )
            })?;
            emit_report(&report, args.json, |r| r.text())?;
            if report.errors > 0 {
                bail!(
                    "{} requests failed; first: {}",
                    report.errors,
                    report.first_error.as_deref().unwrap_or("unknown")
                );
            }
        }
        Command::Pread(args) => {
            let report =
                pread::run(args).with_context(|| format!("pread of {}", args.file.display()))?;
            emit_report(&report, args.json, |r| r.text())?;
        }
        Command::Dump(args) => {
            let report = dump::run(args)
                .with_context(|| format!("dumping {}", args.connect.socket.display()))?;
            emit_report(&report, args.json, |r| r.text())?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ociblk-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
