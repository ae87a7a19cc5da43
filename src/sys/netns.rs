//! Running code inside a named network namespace (the `/run/netns/<name>`
//! files `ip netns add` makes). Namespaces are per thread: only the calling
//! thread moves, and threads it spawns while inside start there too.
//! Sockets keep the namespace they were created in wherever they are used.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

/// Runs `f` with the calling thread in the network namespace `name`, then
/// moves the thread back.
pub fn in_netns<T>(name: &str, f: impl FnOnce() -> T) -> io::Result<T> {
    in_netns_at(&Path::new("/run/netns").join(name), f)
}

/// As [`in_netns`], with the namespace named by a file (`/proc/<pid>/ns/net`).
pub fn in_netns_at<T>(path: &Path, f: impl FnOnce() -> T) -> io::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    let target = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    setns(&target, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    let out = f();
    // Staying in the wrong namespace would silently misdirect every later
    // socket this thread opens; that is worse than stopping.
    setns(&home, CloneFlags::CLONE_NEWNET)
        .expect("cannot return to the original network namespace");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_named_in_the_error() {
        let e = in_netns("agentlab-no-such-ns", || ()).unwrap_err();
        assert!(e.to_string().contains("agentlab-no-such-ns"), "{e}");
    }
}
