//! `agentlab agent --install`: make the agent a systemd service in an
//! ordinary distribution's guest, the way Debian's `qemu-guest-agent`
//! package does it: a udev rule tags the virtio-serial port so systemd
//! knows its device unit and starts the service when the port appears, and
//! the service is bound to that device, so it stops when the port goes.
//!
//! Both agents cannot hold the one port, so the unit conflicts with
//! `qemu-guest-agent.service`: starting ours stops theirs.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::guest::agent::PORT_NAME;

pub const UNIT_NAME: &str = "agentlab-agent.service";
/// After Debian's `60-qemu-guest-agent.rules`: the later rule's
/// `SYSTEMD_WANTS` wins, so the port wants our service, not theirs.
pub const RULE_NAME: &str = "61-agentlab-agent.rules";

/// systemd's name for the port's device unit: `/dev/virtio-ports/<name>`
/// escaped (`-` in a path component becomes `\x2d`, `/` becomes `-`).
fn device_unit() -> String {
    format!(
        "dev-virtio\\x2dports-{}.device",
        PORT_NAME.replace('-', "\\x2d")
    )
}

pub fn unit_text(exe: &Path) -> String {
    let dev = device_unit();
    format!(
        "[Unit]\n\
Description=agentlab guest agent (answers the QEMU guest-agent protocol)\n\
Documentation=https://github.com/agentlab/agentlab\n\
BindsTo={dev}\n\
After={dev}\n\
Conflicts=qemu-guest-agent.service\n\
IgnoreOnIsolate=yes\n\
\n\
[Service]\n\
ExecStart={exe} agent --device /dev/virtio-ports/{PORT_NAME}\n\
Restart=always\n\
RestartSec=1\n\
\n\
[Install]\n\
WantedBy={dev}\n",
        exe = exe.display()
    )
}

pub fn udev_rule_text() -> String {
    format!(
        "# Written by `agentlab agent --install`: start the agentlab guest agent\n\
# when QEMU's guest-agent port appears.\n\
SUBSYSTEM==\"virtio-ports\", ATTR{{name}}==\"{PORT_NAME}\", \
TAG+=\"systemd\", ENV{{SYSTEMD_WANTS}}=\"{UNIT_NAME}\"\n"
    )
}

/// Where `--install` writes, and whether it then asks systemd and udev to act.
pub struct InstallPlan {
    pub exe: PathBuf,
    pub unit_dir: PathBuf,
    pub udev_dir: PathBuf,
    pub enable: bool,
}

/// Writes the unit and the udev rule; with `enable`, reloads both and
/// starts the service if the port is already there. Returns what it wrote.
pub fn install(plan: &InstallPlan) -> io::Result<Vec<PathBuf>> {
    let unit = plan.unit_dir.join(UNIT_NAME);
    let rule = plan.udev_dir.join(RULE_NAME);
    for (path, text) in [(&unit, unit_text(&plan.exe)), (&rule, udev_rule_text())] {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, text)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    }
    if plan.enable {
        run(&["systemctl", "daemon-reload"])?;
        run(&["udevadm", "control", "--reload-rules"])?;
        run(&["systemctl", "enable", UNIT_NAME])?;
        // Re-announce the port so the new rule applies to it now, not at
        // the next boot; the rule's SYSTEMD_WANTS then starts the service.
        run(&[
            "udevadm",
            "trigger",
            "--subsystem-match=virtio-ports",
            "--action=add",
        ])?;
        if Path::new("/dev/virtio-ports").join(PORT_NAME).exists() {
            run(&["systemctl", "restart", UNIT_NAME])?;
        }
    }
    Ok(vec![unit, rule])
}

fn run(argv: &[&str]) -> io::Result<()> {
    let st = Command::new(argv[0])
        .args(&argv[1..])
        .status()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {}: {e}", argv[0])))?;
    if st.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{} failed ({st})",
            argv.join(" ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_binds_to_the_escaped_port_device() {
        let text = unit_text(Path::new("/usr/local/bin/agentlab"));
        // systemd-escape --path /dev/virtio-ports/org.qemu.guest_agent.0
        assert!(text.contains("BindsTo=dev-virtio\\x2dports-org.qemu.guest_agent.0.device\n"));
        assert!(text.contains("WantedBy=dev-virtio\\x2dports-org.qemu.guest_agent.0.device\n"));
        assert!(text.contains(
            "ExecStart=/usr/local/bin/agentlab agent --device /dev/virtio-ports/org.qemu.guest_agent.0\n"
        ));
        assert!(text.contains("Conflicts=qemu-guest-agent.service\n"));
    }

    #[test]
    fn udev_rule_tags_only_the_agent_port() {
        let rule = udev_rule_text();
        let line = rule.lines().find(|l| !l.starts_with('#')).unwrap();
        assert_eq!(
            line,
            "SUBSYSTEM==\"virtio-ports\", ATTR{name}==\"org.qemu.guest_agent.0\", \
TAG+=\"systemd\", ENV{SYSTEMD_WANTS}=\"agentlab-agent.service\""
        );
    }

    #[test]
    fn install_without_enable_writes_both_files() {
        let dir = std::env::temp_dir().join(format!("agentlab-install-{}", std::process::id()));
        let plan = InstallPlan {
            exe: "/opt/agentlab".into(),
            unit_dir: dir.join("systemd"),
            udev_dir: dir.join("udev"),
            enable: false,
        };
        let wrote = install(&plan).unwrap();
        assert_eq!(wrote.len(), 2);
        let unit = std::fs::read_to_string(dir.join("systemd").join(UNIT_NAME)).unwrap();
        assert!(unit.contains("ExecStart=/opt/agentlab agent"));
        assert!(dir.join("udev").join(RULE_NAME).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
