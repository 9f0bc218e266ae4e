//! `zy`: the Zhengyun ops CLI. Thin: parse, run, map the outcome to an exit code.

use clap::Parser;
use zy_cli::{Cli, ExitCode};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zy: cannot start: {e}");
            return std::process::ExitCode::from(ExitCode::Failure as u8);
        }
    };
    match rt.block_on(zy_cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zy: {}", e.message);
            std::process::ExitCode::from(e.code as u8)
        }
    }
}
