//! The `jumpgate` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = jumpgate::cli::Cli::parse();
    jumpgate::cli::main(cli)
}
