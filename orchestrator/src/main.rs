//! `nexus`: one binary for the whole platform (see `nexus --help`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = nexus_orchestrator::cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nexus")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(nexus_orchestrator::cli::main(cli));
    // Components that ignored the drain deadline must not keep the process alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}
