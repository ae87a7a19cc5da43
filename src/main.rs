//! The `agentlab` binary: parse arguments and dispatch. Nothing else lives here.

fn main() -> std::process::ExitCode {
    agentlab::cli::main()
}
