//! `agentlab image list|build-default`: base images and the default guest.

use argh::FromArgs;
use serde_json::json;

use super::connect::client;
use super::{output, CliError, Global};
use crate::image::default_guest::GuestAgent;

#[derive(FromArgs)]
/// Base images: list them, or build the default guest.
#[argh(
    subcommand,
    name = "image",
    error_code(1, "the request was wrong"),
    error_code(2, "the daemon or the host failed (e.g. a package is missing)")
)]
pub struct ImageCmd {
    #[argh(subcommand)]
    cmd: ImageSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum ImageSub {
    List(ImageList),
    BuildDefault(BuildDefault),
}

#[derive(FromArgs)]
/// List base images and whether each is usable.
#[argh(subcommand, name = "list")]
struct ImageList {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Build the default guest (host kernel + busybox + agentlab) into the images dir.
#[argh(
    subcommand,
    name = "build-default",
    example = "agentlab image build-default --qemu-ga",
    note = "Needs linux-image-cloud-amd64 (or any kernel with virtio modules), busybox-static and e2fsprogs. \
`sandbox new` builds it on first use by itself. --qemu-ga builds the variant `default-qemu-ga`, whose guest \
answers through Debian's stock qemu-ga (apt-get install qemu-guest-agent) rather than agentlab's agent: \
profiles select it with `image: default-qemu-ga`; exec output then arrives at the end, stdin is read up \
front and there is no -t."
)]
struct BuildDefault {
    /// rebuild even if it exists (refused while sandboxes use it)
    #[argh(switch)]
    force: bool,
    /// build `default-qemu-ga`: the same guest running the host's stock qemu-ga as its agent
    #[argh(switch)]
    qemu_ga: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

pub fn run(g: &Global, c: ImageCmd) -> Result<(), CliError> {
    match c.cmd {
        ImageSub::List(c) => {
            let r = client(g)?.get("/v1/images")?;
            if c.json {
                return output::print_json(&r);
            }
            let rows: Vec<Vec<String>> = r["images"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|i| {
                    vec![
                        i["name"].as_str().unwrap_or("").to_string(),
                        i["format"].as_str().unwrap_or("-").to_string(),
                        i["virtual_size"]
                            .as_u64()
                            .map(output::bytes)
                            .unwrap_or_else(|| "-".into()),
                        i["boot"].as_str().unwrap_or("").to_string(),
                        i["problem"]
                            .as_str()
                            .map(|p| format!("UNUSABLE: {p}"))
                            .unwrap_or_else(|| i["path"].as_str().unwrap_or("").to_string()),
                    ]
                })
                .collect();
            output::table(&["NAME", "FORMAT", "SIZE", "BOOT", "PATH"], &rows)
        }
        ImageSub::BuildDefault(c) => {
            let name = if c.qemu_ga {
                GuestAgent::QemuGa.image_name()
            } else {
                GuestAgent::Agentlab.image_name()
            };
            output::progress(&format!("building the {name} guest image…"), false);
            let r = client(g)?.post(
                "/v1/images/default/build",
                &json!({ "force": c.force, "qemu_ga": c.qemu_ga }),
            )?;
            if c.json {
                return output::print_json(&r);
            }
            for l in r["progress"].as_array().cloned().unwrap_or_default() {
                output::line(l.as_str().unwrap_or(""))?;
            }
            output::line(&format!("{name} guest image ready"))
        }
    }
}
