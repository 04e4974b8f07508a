//! The `hydraflow` binary: parse the command line, run the command, map the
//! result to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = hydraflow::cli::Cli::parse();
    match hydraflow::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("hydraflow: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `: `, once each: library errors often
/// name their cause in their own message already, so a cause whose text ends
/// the line so far is not repeated.
fn error_chain(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
