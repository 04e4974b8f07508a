//! The `hydraflow` binary: parse the command line, run the command, map the
//! result to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = hydraflow::cli::Cli::parse();
    match hydraflow::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            // The error and its causes joined by ": ", each once: no error type
            // repeats its source in its message (the tidy test checks).
            eprintln!("hydraflow: {err:#}");
            ExitCode::FAILURE
        }
    }
}
