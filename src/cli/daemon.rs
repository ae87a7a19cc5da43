//! `agentlab daemon`: run the daemon in the foreground, or `--install` a
//! systemd unit for it.

use std::path::{Path, PathBuf};
use std::process::Command;

use argh::FromArgs;

use super::connect::load_config;
use super::{output, CliError, Global};

#[derive(FromArgs)]
/// Run agentlabd in the foreground (the CLI starts it on demand otherwise).
#[argh(
    subcommand,
    name = "daemon",
    example = "agentlab daemon --install",
    note = "Sandboxes keep running when the daemon stops; the next daemon adopts them. \
The installed unit uses KillMode=process for that reason.",
    error_code(1, "the configuration is invalid"),
    error_code(2, "the daemon could not start or failed")
)]
pub struct DaemonCmd {
    /// write a systemd unit for agentlabd, enable and start it
    #[argh(switch)]
    install: bool,
    /// where to write the unit (default /etc/systemd/system)
    #[argh(option, default = "PathBuf::from(\"/etc/systemd/system\")")]
    unit_dir: PathBuf,
    /// with --install: write the unit but do not run systemctl
    #[argh(switch)]
    no_enable: bool,
    /// with --install: print what was done as JSON
    #[argh(switch)]
    json: bool,
}

pub fn run(g: &Global, c: DaemonCmd) -> Result<(), CliError> {
    let mut cfg = load_config(g)?;
    if let Some(s) = g
        .socket
        .clone()
        .or_else(|| std::env::var_os("AGENTLAB_SOCKET").map(PathBuf::from))
    {
        cfg.socket_path = s;
    }
    if c.install {
        return install(g, &c.unit_dir, c.no_enable, c.json);
    }
    crate::log::init_from_env();
    crate::daemon::run(cfg).map_err(|e| {
        let msg = crate::log::error_chain(&e);
        crate::error!("agentlabd: {msg}");
        CliError::Host(msg)
    })
}

fn unit_text(exe: &Path, g: &Global) -> String {
    let mut cmdline = exe.display().to_string();
    if let Some(c) = &g.config {
        cmdline.push_str(&format!(" --config {}", c.display()));
    }
    if let Some(d) = &g.state_dir {
        cmdline.push_str(&format!(" --state-dir {}", d.display()));
    }
    if let Some(s) = &g.socket {
        cmdline.push_str(&format!(" --socket {}", s.display()));
    }
    format!(
        "[Unit]\n\
Description=agentlab sandbox daemon\n\
Documentation=https://github.com/agentlab/agentlab\n\
After=network-online.target\n\
Wants=network-online.target\n\
\n\
[Service]\n\
Type=simple\n\
ExecStart={cmdline} daemon\n\
Restart=on-failure\n\
RestartSec=2\n\
# Sandboxes (QEMU processes) must outlive a daemon restart: stop only the daemon.\n\
KillMode=process\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n"
    )
}

fn install(g: &Global, unit_dir: &Path, no_enable: bool, json: bool) -> Result<(), CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Host(format!("cannot find my own binary: {e}")))?;
    let path = unit_dir.join("agentlabd.service");
    std::fs::create_dir_all(unit_dir)
        .and_then(|()| std::fs::write(&path, unit_text(&exe, g)))
        .map_err(|e| CliError::Host(format!("cannot write {}: {e}", path.display())))?;
    let report = |enabled: bool| -> Result<(), CliError> {
        if json {
            output::print_json(&serde_json::json!({ "unit": path, "enabled": enabled }))
        } else if enabled {
            output::line(&format!(
                "wrote {}; agentlabd.service enabled and started",
                path.display()
            ))
        } else {
            output::line(&format!("wrote {}", path.display()))
        }
    };
    if no_enable {
        return report(false);
    }
    for args in [
        &["daemon-reload"][..],
        &["enable", "--now", "agentlabd.service"][..],
    ] {
        let st = Command::new("systemctl").args(args).status().map_err(|e| {
            CliError::Host(format!(
                "cannot run systemctl ({e}); the unit is at {}, enable it by hand",
                path.display()
            ))
        })?;
        if !st.success() {
            return Err(CliError::Host(format!(
                "systemctl {} failed ({st})",
                args.join(" ")
            )));
        }
    }
    report(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_keeps_sandboxes_alive_across_restarts() {
        let g = Global {
            config: Some("/etc/agentlab/config.yaml".into()),
            state_dir: None,
            socket: None,
            timeout: None,
        };
        let text = unit_text(Path::new("/usr/local/bin/agentlab"), &g);
        assert!(text.contains("KillMode=process"));
        assert!(text.contains(
            "ExecStart=/usr/local/bin/agentlab --config /etc/agentlab/config.yaml daemon"
        ));
    }
}
