//! A fake Proxmox VE API server for the backend's tests: real HTTPS (a
//! self-signed certificate made at test time), PVE's error envelope and
//! reason phrases, async tasks with UPIDs (the first status poll answers
//! `no such task`), `lock: clone` on new VMs, a `/cluster/nextid` that
//! reserves nothing, exec-status readable once, version profiles 7/8/9.
//! Every request is checked against tests/fixtures/pve-schema-subset.json
//! (derived from PVE's official schema); violations are answered with PVE's
//! 400 and recorded. Guest commands run for real: `chroot` into a per-VM
//! busybox root. See shared/reference/proxmox/fake-server-recommendations.md.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentlab::proxmox_api::form::parse_pairs;
use serde_json::{json, Value};

pub const TOKEN: &str = "root@pam!agentlab=11111111-2222-3333-4444-555555555555";
pub const NODE: &str = "pve1";
pub const SCHEMA: &str = include_str!("../fixtures/pve-schema-subset.json");

pub struct Vm {
    pub node: String,
    pub name: String,
    pub template: bool,
    pub config: BTreeMap<String, String>,
    pub running: bool,
    pub lock: Option<(String, Instant)>,
    pub snapshots: Vec<String>,
    pub root: PathBuf,
    pub agent_up_at: Option<Instant>,
    pub execs: HashMap<i64, Arc<Mutex<Option<Value>>>>,
    pub firewall: bool,
    pub rules: Vec<String>,
}

struct Task {
    done_at: Instant,
    exit: String,
    polled: bool,
}

pub struct State {
    pub major: u32,
    /// libpve-http-server-perl < 5.2.0: the message only in the reason phrase.
    pub legacy_errors: bool,
    pub auth_delay: Duration,
    pub task_time: Duration,
    /// How long `lock: clone` stays after the clone task ended.
    pub clone_lock_linger: Duration,
    pub agent_delay: Duration,
    pub vms: BTreeMap<u32, Vm>,
    tasks: HashMap<String, Task>,
    pub groups: Vec<String>,
    /// One-shot failures: (method, path fragment, code, reason).
    pub inject: VecDeque<(String, String, u16, String)>,
    /// One-shot task outcomes by task type (`qmstart` → `WARNINGS: 1`).
    pub task_exit: HashMap<String, String>,
    pub violations: Vec<String>,
    pub requests: Vec<String>,
    pub clones_seen: Vec<u32>,
    next_pid: u32,
    dir: PathBuf,
}

pub struct FakePve {
    pub port: u16,
    pub fingerprint: String,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    dir: PathBuf,
}

impl Drop for FakePve {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn busybox_root(dir: &std::path::Path) -> PathBuf {
    let root = dir.to_path_buf();
    for d in ["bin", "tmp", "root", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let ok = Command::new("chroot")
        .arg(&root)
        .args(["/bin/busybox", "--install", "-s", "/bin"])
        .status()
        .unwrap();
    assert!(ok.success(), "busybox --install in the fake guest root");
    root
}

impl FakePve {
    /// A server for PVE `major` (7, 8 or 9) with template 9000 (agent on)
    /// and VM 9001 (not a template) on node pve1.
    pub fn start(tag: &str, major: u32) -> FakePve {
        let dir = std::env::temp_dir().join(format!("fakepve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::generate_simple_self_signed(vec!["fake-pve.invalid".into()]).unwrap();
        let cert_der = key.cert.der().to_vec();
        let fp = agentlab::proxmox_api::tls::fingerprint_of(&cert_der).to_string();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![key.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.key_pair.serialize_der().into()),
        )
        .unwrap();
        let cfg = Arc::new(cfg);
        let mut vms = BTreeMap::new();
        for (id, template) in [(9000u32, true), (9001, false)] {
            let mut config = BTreeMap::new();
            config.insert("name".into(), format!("tpl-{id}"));
            config.insert("memory".into(), "1024".into());
            config.insert("cores".into(), "1".into());
            config.insert("agent".into(), "1".into());
            config.insert(
                "net0".into(),
                "virtio=BC:24:11:00:00:01,bridge=vmbr0".into(),
            );
            config.insert(
                "ide2".into(),
                "local-lvm:vm-9000-cloudinit,media=cdrom".into(),
            );
            vms.insert(
                id,
                Vm {
                    node: NODE.into(),
                    name: format!("tpl-{id}"),
                    template,
                    config,
                    running: false,
                    lock: None,
                    snapshots: Vec::new(),
                    root: PathBuf::new(),
                    agent_up_at: None,
                    execs: HashMap::new(),
                    firewall: false,
                    rules: Vec::new(),
                },
            );
        }
        let state = Arc::new(Mutex::new(State {
            major,
            legacy_errors: major < 9,
            auth_delay: Duration::from_secs(3),
            task_time: Duration::from_millis(300),
            clone_lock_linger: Duration::ZERO,
            agent_delay: Duration::from_millis(500),
            vms,
            tasks: HashMap::new(),
            groups: vec!["agent_nat_default".into(), "agent_nat_off".into()],
            inject: VecDeque::new(),
            task_exit: HashMap::new(),
            violations: Vec::new(),
            requests: Vec::new(),
            clones_seen: Vec::new(),
            next_pid: 0x1000,
            dir: dir.clone(),
        }));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, cfg) = (st.clone(), cfg.clone());
                std::thread::spawn(move || serve(conn, cfg, st));
            }
        });
        FakePve {
            port,
            fingerprint: fp,
            state,
            stop,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/api2/json", self.port)
    }

    /// config.yaml keys pointing agentlab at this server.
    pub fn config_yaml(&self) -> String {
        format!(
            "backend: proxmox\nproxmox_api_url: {}\nproxmox_api_token: '{TOKEN}'\nproxmox_tls_fingerprint: '{}'\n",
            self.url(),
            self.fingerprint
        )
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }
}

fn serve(tcp: TcpStream, cfg: Arc<rustls::ServerConfig>, st: Arc<Mutex<State>>) {
    tcp.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let Ok(conn) = rustls::ServerConnection::new(cfg) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut r = BufReader::new(&mut tls);
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    drop(r);
    let auth = headers.get("authorization").cloned().unwrap_or_default();
    let (code, reason, value) = handle(
        &st,
        &method,
        &target,
        &auth,
        &String::from_utf8_lossy(&body),
    );
    let legacy = st.lock().unwrap().legacy_errors;
    let text = match (code, value) {
        (200, v) => json!({ "data": v }).to_string(),
        (c, _) if c >= 595 => String::new(),
        (_, errs) => {
            let mut b = json!({"data": null});
            if !errs.is_null() {
                b["errors"] = errs;
            }
            if !legacy {
                b["message"] = json!(format!("{reason}\n"));
            }
            b.to_string()
        }
    };
    let status_line = reason.lines().next().unwrap_or("").to_string();
    let head = format!(
        "HTTP/1.1 {code} {status_line}\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    let _ = tls.write_all(head.as_bytes());
    let _ = tls.write_all(text.as_bytes());
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

type Reply = (u16, String, Value);

fn ok(v: Value) -> Reply {
    (200, "OK".into(), v)
}

fn err(code: u16, msg: impl Into<String>) -> Reply {
    (code, msg.into(), Value::Null)
}

fn param_err(name: &str, why: &str) -> Reply {
    (
        400,
        "Parameter verification failed.".into(),
        json!({ name: why }),
    )
}

fn handle(st: &Arc<Mutex<State>>, method: &str, target: &str, auth: &str, body: &str) -> Reply {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = path.strip_prefix("/api2/json").unwrap_or(path);
    let delay = st.lock().unwrap().auth_delay;
    if auth != format!("PVEAPIToken={TOKEN}") {
        std::thread::sleep(delay);
        return err(401, "Authentication failed!");
    }
    if matches!(method, "GET" | "DELETE") && !body.is_empty() {
        return err(501, "Unexpected content for method");
    }
    let mut params: Vec<(String, String)> = parse_pairs(body);
    // Query parameters override body keys (HS extract_params).
    for (k, v) in parse_pairs(query) {
        params.retain(|(pk, _)| pk != &k);
        params.push((k, v));
    }
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(|s| agentlab::proxmox_api::form::percent_decode(s, false))
        .collect();
    let mut s = st.lock().unwrap();
    s.requests.push(format!("{method} {path}"));
    if let Some(i) = s
        .inject
        .iter()
        .position(|(m, p, _, _)| m == method && path.contains(p.as_str()))
    {
        let (_, _, code, reason) = s.inject.remove(i).unwrap();
        return err(code, reason);
    }
    let Some((endpoint, path_params)) = match_schema(method, &segs) else {
        return err(501, format!("Method '{method} {path}' not implemented"));
    };
    let mut all = path_params.clone();
    all.extend(params.iter().cloned());
    if let Err((name, why)) = validate(&endpoint, &all) {
        s.violations.push(format!("{endpoint}: {name}: {why}"));
        return param_err(&name, &why);
    }
    let p: HashMap<String, Vec<String>> = all.iter().fold(HashMap::new(), |mut m, (k, v)| {
        m.entry(k.clone()).or_default().push(v.clone());
        m
    });
    route(&mut s, method, &endpoint, &p)
}

fn match_schema(method: &str, segs: &[String]) -> Option<(String, Vec<(String, String)>)> {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    for key in schema.as_object().unwrap().keys() {
        let (m, path) = key.split_once(' ').unwrap();
        if m != method {
            continue;
        }
        let t: Vec<&str> = path.trim_matches('/').split('/').collect();
        if t.len() != segs.len() {
            continue;
        }
        let mut pp = Vec::new();
        let fits = t.iter().zip(segs).all(|(a, b)| {
            if let Some(name) = a.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
                pp.push((name.to_string(), b.clone()));
                true
            } else {
                a == b
            }
        });
        if fits {
            return Some((key.clone(), pp));
        }
    }
    None
}

/// PVE's checks from the schema fixture: unknown keys, required keys,
/// integer/boolean/enum/maxLength, repeated keys only for arrays.
pub fn validate(endpoint: &str, params: &[(String, String)]) -> Result<(), (String, String)> {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let props = &schema[endpoint];
    let lookup = |k: &str| -> Option<&Value> {
        props.get(k).or_else(|| {
            props.get(format!(
                "{}[n]",
                k.trim_end_matches(|c: char| c.is_ascii_digit())
            ))
        })
    };
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (k, v) in params {
        let Some(p) = lookup(k) else {
            return Err((k.clone(), "property is not defined in schema and the schema does not allow additional properties".into()));
        };
        *seen.entry(k.as_str()).or_default() += 1;
        let ty = p["type"].as_str().unwrap_or("string");
        let num = |x: &Value| {
            x.as_i64()
                .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
        };
        match ty {
            "boolean" if v != "0" && v != "1" => {
                return Err((
                    k.clone(),
                    format!("type check ('boolean') failed - got '{v}'"),
                ))
            }
            "integer" => {
                let Ok(n) = v.parse::<i64>() else {
                    return Err((
                        k.clone(),
                        format!("type check ('integer') failed - got '{v}'"),
                    ));
                };
                if num(&p["minimum"]).is_some_and(|m| n < m)
                    || num(&p["maximum"]).is_some_and(|m| n > m)
                {
                    return Err((
                        k.clone(),
                        format!(
                            "value must have a value between the minimum and maximum - got {n}"
                        ),
                    ));
                }
            }
            _ => {}
        }
        if let Some(e) = p["enum"].as_array() {
            if !e.iter().any(|x| x.as_str() == Some(v)) {
                return Err((
                    k.clone(),
                    format!("value '{v}' does not have a value in the enumeration"),
                ));
            }
        }
        if num(&p["maxLength"]).is_some_and(|m| v.chars().count() as i64 > m) {
            return Err((k.clone(), "value may only be shorter".into()));
        }
        if ty != "array" && seen[k.as_str()] > 1 {
            return Err((k.clone(), format!("type check ('{ty}') failed - got ARRAY")));
        }
    }
    for (name, p) in props.as_object().unwrap() {
        if p["optional"].as_i64() == Some(0)
            && !name.contains("[n]")
            && !seen.contains_key(name.as_str())
        {
            return Err((
                name.clone(),
                "property is missing and it is not optional".into(),
            ));
        }
    }
    Ok(())
}

fn one<'a>(p: &'a HashMap<String, Vec<String>>, k: &str) -> Option<&'a str> {
    p.get(k).and_then(|v| v.first()).map(String::as_str)
}

impl State {
    fn task(&mut self, kind: &str, id: u32, exit: Option<String>) -> Value {
        self.next_pid += 1;
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let upid = format!(
            "UPID:{NODE}:{:08X}:{:08X}:{:08X}:{kind}:{id}:root@pam!agentlab:",
            self.next_pid,
            self.next_pid * 7,
            start
        );
        let exit = exit
            .or_else(|| self.task_exit.remove(kind))
            .unwrap_or_else(|| "OK".into());
        self.tasks.insert(
            upid.clone(),
            Task {
                done_at: Instant::now() + self.task_time,
                exit,
                polled: false,
            },
        );
        json!(upid)
    }

    fn vm(&mut self, p: &HashMap<String, Vec<String>>) -> Result<(u32, &mut Vm), Reply> {
        let id: u32 = one(p, "vmid").unwrap_or("0").parse().unwrap_or(0);
        let node = one(p, "node").unwrap_or("");
        if node != NODE {
            return Err(err(500, format!("no such cluster node '{node}'")));
        }
        match self.vms.get_mut(&id) {
            Some(vm) => Ok((id, vm)),
            None => Err(err(
                500,
                format!("Configuration file 'nodes/{node}/qemu-server/{id}.conf' does not exist"),
            )),
        }
    }
}

fn locked(vm: &Vm) -> Option<Reply> {
    match &vm.lock {
        Some((l, until)) if Instant::now() < *until => {
            Some(err(500, format!("VM is locked ({l})")))
        }
        _ => None,
    }
}

fn route(s: &mut State, method: &str, endpoint: &str, p: &HashMap<String, Vec<String>>) -> Reply {
    let ep = endpoint.split_once(' ').unwrap().1;
    match (method, ep) {
        ("GET", "/version") => ok(json!({"version": format!("{}.2.4", s.major), "release": format!("{}.2", s.major), "repoid": "abcdef", "extra": {"new": "field"}})),
        ("GET", "/nodes") => ok(json!([{"node": NODE, "status": "online", "ssl_fingerprint": "x"}])),
        ("GET", "/access/permissions") => {
            let privs: Value = ["VM.Clone","VM.Allocate","VM.Config.Options","VM.Config.CPU","VM.Config.Memory","VM.Config.Network","VM.PowerMgmt","VM.Snapshot","VM.Snapshot.Rollback","VM.Audit","VM.Monitor","VM.GuestAgent.Unrestricted","VM.GuestAgent.FileRead","VM.GuestAgent.FileWrite"].iter().map(|k| (k.to_string(), json!(1))).collect::<serde_json::Map<_,_>>().into();
            ok(json!({"/vms": privs}))
        }
        ("GET", "/cluster/firewall/groups") => ok(s.groups.iter().map(|g| json!({"group": g, "digest": "d"})).collect()),
        ("GET", "/cluster/resources") => ok(s.vms.iter().map(|(id, vm)| json!({
            "id": format!("qemu/{id}"), "type": "qemu", "vmid": id, "node": vm.node, "name": vm.name,
            "template": u8::from(vm.template), "status": if vm.running {"running"} else {"stopped"},
            "tags": vm.config.get("tags"), "maxmem": 1073741824u64,
        })).collect()),
        ("GET", "/cluster/nextid") => {
            if let Some(want) = one(p, "vmid").and_then(|v| v.parse::<u32>().ok()) {
                if s.vms.contains_key(&want) {
                    return param_err("vmid", &format!("VM {want} already exists"));
                }
                return ok(json!(want.to_string()));
            }
            let free = (100..).find(|id| !s.vms.contains_key(id)).unwrap();
            ok(json!(free.to_string()))
        }
        ("GET", "/nodes/{node}/tasks/{upid}/status") => {
            let upid = one(p, "upid").unwrap_or("");
            let Some(t) = s.tasks.get_mut(upid) else { return param_err("upid", "no such task") };
            if !t.polled {
                t.polled = true;
                return param_err("upid", "no such task");
            }
            if Instant::now() < t.done_at {
                return ok(json!({"status": "running", "upid": upid, "node": NODE, "pid": 1, "pstart": 2, "starttime": 3, "type": "x", "id": "1", "user": "root@pam", "tokenid": "agentlab"}));
            }
            ok(json!({"status": "stopped", "exitstatus": t.exit, "upid": upid, "node": NODE}))
        }
        ("GET", "/nodes/{node}/tasks/{upid}/log") => {
            let upid = one(p, "upid").unwrap_or("");
            let Some(t) = s.tasks.get(upid) else { return param_err("upid", "no such task") };
            let last = match t.exit.as_str() { "OK" => "TASK OK".to_string(), w if w.starts_with("WARNINGS") => format!("TASK {w}"), e => format!("TASK ERROR: {e}") };
            ok(json!([{"n": 1, "t": "starting"}, {"n": 2, "t": last}]))
        }
        _ => vm_route(s, method, ep, p),
    }
}

fn vm_route(s: &mut State, method: &str, ep: &str, p: &HashMap<String, Vec<String>>) -> Reply {
    let (major, agent_delay) = (s.major, s.agent_delay);
    let (id, vm) = match s.vm(p) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let rest = ep.strip_prefix("/nodes/{node}/qemu/{vmid}").unwrap_or("");
    match (method, rest) {
        ("POST", "/clone") => {
            let newid: u32 = one(p, "newid").unwrap().parse().unwrap();
            if s.vms.contains_key(&newid) {
                return err(
                    500,
                    format!("unable to create VM {newid}: config file already exists"),
                );
            }
            let tpl = &s.vms[&id];
            let mut config = tpl.config.clone();
            config.insert(
                "net0".into(),
                format!(
                    "virtio=BC:24:11:{:02X}:{:02X}:{:02X},bridge=vmbr0",
                    newid >> 16 & 255,
                    newid >> 8 & 255,
                    newid & 255
                ),
            );
            let name = one(p, "name").unwrap_or("copy").to_string();
            config.insert("name".into(), name.clone());
            let dir = s.dir.join(format!("vm-{newid}"));
            let root = busybox_root(&dir);
            let linger = s.task_time + s.clone_lock_linger;
            s.vms.insert(
                newid,
                Vm {
                    node: NODE.into(),
                    name,
                    template: false,
                    config,
                    running: false,
                    lock: Some(("clone".into(), Instant::now() + linger)),
                    snapshots: Vec::new(),
                    root,
                    agent_up_at: None,
                    execs: HashMap::new(),
                    firewall: false,
                    rules: Vec::new(),
                },
            );
            s.clones_seen.push(newid);
            ok(s.task("qmclone", id, None))
        }
        ("GET", "/config") => {
            let mut c: serde_json::Map<String, Value> = vm
                .config
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            if major < 8 {
                c.insert(
                    "memory".into(),
                    json!(vm.config["memory"].parse::<i64>().unwrap_or(0)),
                );
            }
            c.insert(
                "cores".into(),
                json!(vm.config["cores"].parse::<i64>().unwrap_or(1)),
            );
            c.insert("digest".into(), json!("0123456789abcdef"));
            ok(Value::Object(c))
        }
        ("POST", "/config") => {
            if let Some(r) = locked(vm) {
                return r;
            }
            for (k, v) in p {
                if k != "node" && k != "vmid" {
                    vm.config.insert(k.clone(), v[0].clone());
                }
            }
            if let Some(n) = one(p, "name") {
                vm.name = n.to_string();
            }
            ok(s.task("qmconfig", id, None))
        }
        ("PUT", "/firewall/options") => {
            vm.firewall = one(p, "enable") == Some("1");
            ok(Value::Null)
        }
        ("POST", "/firewall/rules") => {
            vm.rules.push(format!(
                "{} {}",
                one(p, "type").unwrap_or(""),
                one(p, "action").unwrap_or("")
            ));
            ok(Value::Null)
        }
        ("GET", "/status/current") => ok(json!({
            "status": if vm.running {"running"} else {"stopped"}, "name": vm.name, "vmid": id,
            "lock": vm.lock.as_ref().filter(|(_, u)| Instant::now() < *u).map(|(l, _)| l.clone()),
            "agent": 1, "uptime": 5, "ha": {"managed": 0},
        })),
        ("POST", "/status/start") => {
            if let Some(r) = locked(vm) {
                return r;
            }
            let exit = if vm.template {
                Some("you can't start a vm if it's a template".to_string())
            } else if vm.running {
                Some(format!("VM {id} already running"))
            } else {
                None
            };
            if exit.is_none() {
                vm.running = true;
                vm.agent_up_at = Some(Instant::now() + agent_delay);
            }
            ok(s.task("qmstart", id, exit))
        }
        ("POST", "/status/stop") | ("POST", "/status/shutdown") => {
            if let Some(r) = locked(vm) {
                return r;
            }
            vm.running = false;
            vm.agent_up_at = None;
            ok(s.task(
                if rest.ends_with("stop") {
                    "qmstop"
                } else {
                    "qmshutdown"
                },
                id,
                None,
            ))
        }
        ("DELETE", "") => {
            if vm.running {
                return err(500, format!("VM {id} is running - destroy failed"));
            }
            if let Some(r) = locked(vm) {
                return r;
            }
            let root = vm.root.clone();
            s.vms.remove(&id);
            if root.starts_with(&s.dir) {
                let _ = std::fs::remove_dir_all(root);
            }
            ok(s.task("qmdestroy", id, None))
        }
        ("GET", "/snapshot") => {
            let mut l: Vec<Value> = vm
                .snapshots
                .iter()
                .map(|n| json!({"name": n, "description": "", "snaptime": 1, "vmstate": 0}))
                .collect();
            l.push(json!({"name": "current", "running": u8::from(vm.running), "digest": "x"}));
            ok(Value::Array(l))
        }
        ("POST", "/snapshot") => {
            let name = one(p, "snapname").unwrap_or("").to_string();
            if vm.snapshots.contains(&name) {
                return ok(s.task(
                    "qmsnapshot",
                    id,
                    Some(format!("snapshot name '{name}' already used")),
                ));
            }
            vm.snapshots.push(name);
            // The guest root's state at the snapshot: a copy.
            let snap = vm.root.with_extension("clean");
            let _ = Command::new("cp")
                .arg("-a")
                .arg(&vm.root)
                .arg(&snap)
                .status();
            ok(s.task("qmsnapshot", id, None))
        }
        ("POST", "/snapshot/{snapname}/rollback") => {
            if !vm
                .snapshots
                .iter()
                .any(|n| Some(n.as_str()) == one(p, "snapname"))
            {
                return err(500, "snapshot 'x' does not exist");
            }
            vm.running = false;
            let snap = vm.root.with_extension("clean");
            let _ = std::fs::remove_dir_all(&vm.root);
            let _ = Command::new("cp")
                .arg("-a")
                .arg(&snap)
                .arg(&vm.root)
                .status();
            ok(s.task("qmrollback", id, None))
        }
        (_, r) if r.starts_with("/agent/") => agent_route(vm, id, major, method, r, p),
        _ => err(501, format!("Method '{method} {ep}' not implemented")),
    }
}

fn agent_route(
    vm: &mut Vm,
    id: u32,
    major: u32,
    method: &str,
    rest: &str,
    p: &HashMap<String, Vec<String>>,
) -> Reply {
    if vm
        .config
        .get("agent")
        .is_none_or(|a| a.starts_with('0') || a.contains("enabled=0"))
    {
        return err(500, "No QEMU guest agent configured");
    }
    if !vm.running {
        return err(500, format!("VM {id} is not running"));
    }
    if vm.agent_up_at.is_none_or(|t| Instant::now() < t) {
        return err(500, "QEMU guest agent is not running");
    }
    match (method, rest) {
        ("POST", "/agent/ping") => ok(json!({"result": {}})),
        ("GET", "/agent/network-get-interfaces") => {
            let mac =
                agentlab::backend::proxmox::pve::mac_of(&vm.config["net0"]).unwrap_or_default();
            ok(json!({"result": [
                {"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}]},
                {"name": "docker0", "hardware-address": "02:42:00:00:00:01"},
                {"name": "eth0", "hardware-address": mac, "ip-addresses": [{"ip-address": "10.0.0.5", "ip-address-type": "ipv4", "prefix": 24}, {"ip-address": "fe80::1", "ip-address-type": "ipv6", "prefix": 64}]},
            ]}))
        }
        ("POST", "/agent/exec") => {
            let mut argv: Vec<String> = p.get("command").cloned().unwrap_or_default();
            if major < 8 {
                argv = argv
                    .concat()
                    .split([' ', ',', ';'])
                    .filter(|w| !w.is_empty())
                    .map(String::from)
                    .collect();
            }
            let prog = argv.first().cloned().unwrap_or_default();
            let found = if prog.contains('/') {
                vm.root.join(prog.trim_start_matches('/')).exists()
            } else {
                vm.root.join("bin").join(&prog).exists()
            };
            if !found {
                return err(500, format!("Agent error: Failed to execute child process \u{201c}{prog}\u{201d} (No such file or directory)"));
            }
            static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1000);
            let pid = NEXT.fetch_add(1, Ordering::SeqCst);
            let slot = Arc::new(Mutex::new(None));
            vm.execs.insert(pid, slot.clone());
            let (root, input) = (vm.root.clone(), one(p, "input-data").map(String::from));
            std::thread::spawn(move || {
                let mut c = Command::new("/usr/sbin/chroot")
                    .arg(&root)
                    .args(&argv)
                    .env_clear()
                    .env("PATH", "/bin")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut stdin = c.stdin.take().unwrap();
                let _ = stdin.write_all(input.unwrap_or_default().as_bytes());
                drop(stdin);
                let out = c.wait_with_output().unwrap();
                let mut v = json!({"exited": 1, "out-data": String::from_utf8_lossy(&out.stdout), "err-data": String::from_utf8_lossy(&out.stderr)});
                match out.status.code() {
                    Some(c) => v["exitcode"] = json!(c),
                    None => v["signal"] = json!(9),
                }
                *slot.lock().unwrap() = Some(v);
            });
            ok(json!({"pid": pid}))
        }
        ("GET", "/agent/exec-status") => {
            let pid: i64 = one(p, "pid").unwrap().parse().unwrap();
            let Some(slot) = vm.execs.get(&pid).cloned() else {
                return err(500, "Agent error: Invalid parameter 'pid'");
            };
            let done = slot.lock().unwrap().clone();
            match done {
                None => ok(json!({"exited": 0})),
                // qemu-ga forgets a process once it reported its exit.
                Some(v) => {
                    vm.execs.remove(&pid);
                    ok(v)
                }
            }
        }
        ("GET", "/agent/file-read") => {
            let f = vm
                .root
                .join(one(p, "file").unwrap().trim_start_matches('/'));
            match std::fs::read(&f) {
                Ok(b) => ok(
                    json!({"content": b.iter().map(|&c| c as char).collect::<String>(), "bytes-read": b.len()}),
                ),
                Err(e) => err(
                    500,
                    format!("Agent error: Failed to open file '{}': {e}", f.display()),
                ),
            }
        }
        ("POST", "/agent/file-write") => {
            let f = vm
                .root
                .join(one(p, "file").unwrap().trim_start_matches('/'));
            let content = one(p, "content").unwrap();
            if content.len() > 61440 {
                return param_err("content", "value may only be 61440 characters long");
            }
            let data = if one(p, "encode") == Some("0") {
                agentlab::qga::b64::decode(content).unwrap()
            } else {
                content.as_bytes().to_vec()
            };
            match std::fs::write(&f, data) {
                Ok(()) => ok(Value::Null),
                Err(e) => err(500, format!("Agent error: {e}")),
            }
        }
        _ => err(501, format!("Method '{method} {rest}' not implemented")),
    }
}
