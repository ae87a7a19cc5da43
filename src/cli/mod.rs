//! (being written)
pub fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("guest") {
        return crate::guest::main(&args[1..]);
    }
    std::process::ExitCode::SUCCESS
}
