//! The `lowrank` command: parse, dispatch, report errors.

mod commands;
mod process;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    process::configure();
    let cli = commands::Cli::parse();
    match lowrank::threads::run(|| commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = commands::hint(&e) {
                eprintln!("---> HINT: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}
