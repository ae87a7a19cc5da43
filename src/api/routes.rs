//! The `/v1` routes: an HTTP request in, a manager call, a reply out.
//!
//! Handlers run on worker threads (they may wait on a VM); the server loop
//! never calls them itself. A handler answers either with a whole response
//! or with a stream: history first, then live items from the bus until the
//! client goes away (`?follow=1`). `docs/api.md` documents every route.

use std::sync::mpsc::Receiver;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use super::http::{Request, Response};
use super::types::{
    BuildImageRequest, ConsoleInput, CreateRequest, ErrorBody, ExposeRequest, ForceRequest,
    PruneRequest, RenewRequest, RevertRequest, StartRequest,
};
use crate::daemon::bus::{BusItem, Filter};
use crate::daemon::manager::{Manager, OpError};
use crate::image::default_guest::GuestAgent;
use crate::time::parse_duration;

/// Most events a non-streaming history request returns.
const MAX_LIMIT: usize = 10_000;

/// What a handler produced.
pub enum Reply {
    Whole(Response),
    /// NDJSON: `history` lines now, then every matching bus item.
    Stream {
        history: Vec<Value>,
        live: Receiver<BusItem>,
        /// Skip live events at or below this id (already in `history`).
        after_event: u64,
    },
}

pub fn handle(m: &Arc<Manager>, req: &Request, socket: &str) -> Reply {
    match route(m, req, socket) {
        Ok(r) => r,
        Err(e) => Reply::Whole(error(e.status(), &e.to_string())),
    }
}

fn error(status: u16, msg: &str) -> Response {
    Response::json(
        status,
        &json!(ErrorBody {
            error: msg.to_string()
        }),
    )
}

fn ok<T: Serialize>(status: u16, v: &T) -> Result<Reply, OpError> {
    let value =
        serde_json::to_value(v).map_err(|e| OpError::Host(format!("cannot encode reply: {e}")))?;
    Ok(Reply::Whole(Response::json(status, &value)))
}

/// An empty body means "all defaults"; anything else must parse exactly.
fn body<T: DeserializeOwned + Default>(req: &Request) -> Result<T, OpError> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| OpError::BadRequest(format!("invalid request body: {e}")))
}

fn flag(req: &Request, name: &str) -> bool {
    matches!(req.query_param(name), Some("1" | "true" | "yes" | ""))
}

fn number(req: &Request, name: &str, default: usize) -> Result<usize, OpError> {
    match req.query_param(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            OpError::BadRequest(format!("query parameter {name}={v:?} is not a number"))
        }),
    }
}

fn route(m: &Arc<Manager>, req: &Request, socket: &str) -> Result<Reply, OpError> {
    let seg = req.path_segments();
    let method = req.method.as_str();
    match (method, seg.as_slice()) {
        ("GET", ["healthz"]) => ok(200, &json!({"ok": true})),
        ("GET", ["v1", "status"]) => ok(200, &m.status(socket)?),
        ("GET", ["v1", "profiles"]) => ok(200, &json!({"profiles": m.profiles()?.list()})),
        ("GET", ["v1", "images"]) => ok(200, &json!({"images": m.backend().images()})),
        ("POST", ["v1", "images", "default", "build"]) => {
            let r: BuildImageRequest = body(req)?;
            let agent = if r.qemu_ga {
                GuestAgent::QemuGa
            } else {
                GuestAgent::Agentlab
            };
            let lines = m.build_default_image(agent, r.force)?;
            let images = m.backend().images();
            ok(
                200,
                &json!({"built": true, "progress": lines, "images": images}),
            )
        }
        ("GET", ["v1", "events"]) => events(m, req, None),
        ("GET", ["v1", "sandboxes"]) => ok(200, &json!({"sandboxes": m.list(flag(req, "all"))?})),
        ("POST", ["v1", "sandboxes"]) => ok(201, &m.create(body::<CreateRequest>(req)?)?),
        ("GET", ["v1", "net"]) => ok(200, &m.network()?.show()),
        ("GET", ["v1", "net", "check"]) => ok(200, &json!({"findings": m.network()?.check()})),
        ("GET", ["v1", "exposures"]) => ok(200, &json!({"exposures": m.network()?.exposures()?})),
        ("DELETE", ["v1", "exposures", name]) => ok(200, &m.network()?.unexpose(name)?),
        ("POST", ["v1", "sandboxes", "prune"]) => {
            ok(200, &m.prune(body::<PruneRequest>(req)?.dry_run)?)
        }
        (_, ["v1", "sandboxes", id, rest @ ..]) => match sandbox_route(m, req, method, id, rest)? {
            Some(reply) => Ok(reply),
            None => not_routed(req, &seg),
        },
        _ => not_routed(req, &seg),
    }
}

/// `/v1/sandboxes/{id}/…`; None when no route matches.
fn sandbox_route(
    m: &Arc<Manager>,
    req: &Request,
    method: &str,
    id: &str,
    rest: &[&str],
) -> Result<Option<Reply>, OpError> {
    let reply = match (method, rest) {
        ("GET", []) => ok(200, &m.find(id)?)?,
        ("DELETE", []) => ok(200, &m.destroy(id, flag(req, "force"))?)?,
        ("POST", ["start"]) => ok(200, &m.start(id, body::<StartRequest>(req)?.wait)?)?,
        ("POST", ["stop"]) => ok(200, &m.stop(id, body::<ForceRequest>(req)?.force)?)?,
        ("POST", ["destroy"]) => ok(200, &m.destroy(id, body::<ForceRequest>(req)?.force)?)?,
        ("POST", ["revert"]) => {
            let r: RevertRequest = body(req)?;
            ok(200, &m.revert(id, r.force, r.restart, r.wait)?)?
        }
        ("POST", ["lease", "renew"]) => {
            let r: RenewRequest = body(req)?;
            let ttl = match (r.ttl, r.ttl_minutes) {
                (Some(t), None) => {
                    parse_duration(&t).map_err(|e| OpError::BadRequest(format!("ttl: {e}")))?
                }
                (None, Some(mins)) => std::time::Duration::from_secs(mins.saturating_mul(60)),
                _ => {
                    return Err(OpError::BadRequest(
                        "give exactly one of ttl or ttl_minutes".into(),
                    ))
                }
            };
            ok(200, &m.renew(id, ttl)?)?
        }
        ("POST", ["expose"]) => ok(201, &m.expose(id, body::<ExposeRequest>(req)?)?)?,
        ("POST", ["console"]) => {
            let r: ConsoleInput = body(req)?;
            m.console_input(id, &r.data)?;
            ok(200, &json!({"written": r.data.len()}))?
        }
        ("GET", ["events"]) => events(m, req, Some(id))?,
        ("GET", ["logs"]) => logs(m, req, id)?,
        _ => return Ok(None),
    };
    Ok(Some(reply))
}

/// 405 when the path exists for another method, else 404.
fn not_routed(req: &Request, seg: &[&str]) -> Result<Reply, OpError> {
    let method = &req.method;
    if known_path(seg) {
        Err(OpError::MethodNotAllowed(format!(
            "method {method} is not allowed on {}",
            req.path
        )))
    } else {
        Err(OpError::NotFound(format!(
            "no such route: {method} {}",
            req.path
        )))
    }
}

/// Paths that exist for some method (so a wrong method is a 405, not a 404).
fn known_path(seg: &[&str]) -> bool {
    matches!(
        seg,
        ["healthz"]
            | [
                "v1",
                "status" | "profiles" | "images" | "sandboxes" | "events" | "net" | "exposures"
            ]
            | ["v1", "net", "check"]
            | ["v1", "exposures", _]
            | ["v1", "sandboxes", _]
            | [
                "v1",
                "sandboxes",
                _,
                "start" | "stop" | "destroy" | "revert" | "events" | "logs" | "console" | "expose"
            ]
    )
}

/// `?tail=N` (last N), `?after=ID` (newer than ID), `?limit=N`, `?follow=1`.
fn events(m: &Arc<Manager>, req: &Request, id: Option<&str>) -> Result<Reply, OpError> {
    let vmid = id.map(|i| m.find(i)).transpose()?.map(|s| s.vmid);
    let limit = number(req, "limit", 1000)?.min(MAX_LIMIT);
    let follow = flag(req, "follow");
    // Subscribe before reading history so nothing falls between the two.
    let live = follow.then(|| {
        m.bus().subscribe(Filter {
            vmid,
            console: false,
        })
    });
    let store = m.store();
    let history = match (req.query_param("tail"), req.query_param("after"), vmid) {
        (Some(_), Some(_), _) => {
            return Err(OpError::BadRequest(
                "tail and after exclude each other".into(),
            ))
        }
        (_, Some(_), Some(v)) => store.events_for(v, number(req, "after", 0)? as u64, limit)?,
        (_, Some(_), None) => store.events_after(number(req, "after", 0)? as u64, limit)?,
        (_, None, Some(v)) => store.tail_for(v, number(req, "tail", 50)?.min(limit))?,
        (_, None, None) => store.tail(number(req, "tail", 50)?.min(limit))?,
    };
    let after_event = history.last().map(|e| e.id).unwrap_or(0);
    match live {
        Some(live) => Ok(Reply::Stream {
            history: history
                .iter()
                .map(|e| json!(BusItem::Event(e.clone())))
                .collect(),
            live,
            after_event,
        }),
        None => ok(200, &json!({"events": history})),
    }
}

/// A sandbox's events and console lines, merged in time order.
fn logs(m: &Arc<Manager>, req: &Request, id: &str) -> Result<Reply, OpError> {
    let sb = m.find(id)?;
    let tail = number(req, "tail", 200)?.min(MAX_LIMIT);
    let follow = flag(req, "follow");
    let live = follow.then(|| {
        m.bus().subscribe(Filter {
            vmid: Some(sb.vmid),
            console: true,
        })
    });
    let events = m.store().tail_for(sb.vmid, tail)?;
    let console = m.backend().console_tail(sb.vmid, tail);
    let mut items: Vec<BusItem> = events.iter().cloned().map(BusItem::Event).collect();
    items.extend(console.into_iter().map(|(ts, line)| BusItem::Console {
        vmid: sb.vmid,
        ts,
        line,
    }));
    items.sort_by_key(|i| match i {
        BusItem::Event(e) => e.ts,
        BusItem::Console { ts, .. } => *ts,
    });
    let skip = items.len().saturating_sub(tail);
    let history: Vec<Value> = items[skip..].iter().map(|i| json!(i)).collect();
    let after_event = events.last().map(|e| e.id).unwrap_or(0);
    match live {
        Some(live) => Ok(Reply::Stream {
            history,
            live,
            after_event,
        }),
        None => ok(200, &json!({"vmid": sb.vmid, "entries": history})),
    }
}
