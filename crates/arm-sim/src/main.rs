//! `arm-sim` entry point: parse flags (exit 64 when invalid), run, print the report.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = match arm_sim::Args::try_parse() {
        Ok(args) => args,
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return std::process::ExitCode::SUCCESS;
        }
        Err(err) => {
            let text = err.to_string();
            let first = text.lines().next().unwrap_or("").trim_start_matches("error: ");
            eprintln!("invalid configuration: {first}");
            std::process::exit(64);
        }
    };
    if let Err(reason) = args.validate() {
        eprintln!("invalid configuration: {reason}");
        std::process::exit(64);
    }
    let json = args.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("arm-sim: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(arm_sim::run(args)) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                print!("{}", arm_sim::render(&report));
            }
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("arm-sim: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
