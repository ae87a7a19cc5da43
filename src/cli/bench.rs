//! `agentlab bench`: figures, not assertions. (Filled in below.)
use argh::FromArgs;

use super::{CliError, Global};

#[derive(FromArgs)]
/// Measure boot time against bare QEMU, overlay creation and daemon memory.
#[argh(subcommand, name = "bench")]
pub struct BenchCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

pub fn run(_g: &Global, _c: BenchCmd) -> Result<(), CliError> {
    Err(CliError::User("bench: being written".into()))
}
