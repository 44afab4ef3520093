use std::process::ExitCode;

use clap::Parser;
use ociblk::cli::{Cli, Command};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OCIBLK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Inspect(args) => ociblk::cli::inspect::run(args),
        Command::Export(args) => ociblk::cli::export::run(args),
        Command::Serve(args) => ociblk::cli::serve::run(args),
        Command::Overlay(args) => ociblk::cli::overlay::run(args),
        Command::Verify(args) => ociblk::cli::verify::run(args),
        Command::Launch(args) => ociblk::cli::launch::run(args),
        Command::QemuCommand(args) => ociblk::cli::qemu_command::run(args),
        Command::Pull(args) => ociblk::cli::pull::run(args),
        Command::Cache(args) => ociblk::cli::cache::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ociblk: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
