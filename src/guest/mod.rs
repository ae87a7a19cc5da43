//! TEMPORARY stand-in; the in-guest duties merge from the guest branch.
pub fn main(_args: &[String]) -> std::process::ExitCode {
    std::process::ExitCode::from(2)
}
