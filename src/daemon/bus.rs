//! Live fan-out of what happens: every recorded event and every console line
//! goes to the subscribers whose filter matches (a `--follow` stream, a
//! `sandbox new --wait`). Publishing never blocks: items go into a per-
//! subscriber channel and the API loop is woken to drain it. A subscriber
//! whose connection is gone is dropped on the next publish.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::model::Event;
use crate::time::Timestamp;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum BusItem {
    /// A recorded event (it is also in the store).
    Event(Event),
    /// A line of a guest's serial console.
    Console {
        vmid: u32,
        ts: Timestamp,
        line: String,
    },
}

impl BusItem {
    pub fn vmid(&self) -> Option<u32> {
        match self {
            BusItem::Event(e) => e.vmid,
            BusItem::Console { vmid, .. } => Some(*vmid),
        }
    }
}

/// Which items a subscriber wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    pub vmid: Option<u32>,
    pub console: bool,
}

impl Filter {
    pub fn matches(&self, item: &BusItem) -> bool {
        let kind_ok = self.console || matches!(item, BusItem::Event(_));
        let vmid_ok = self.vmid.is_none() || item.vmid() == self.vmid;
        kind_ok && vmid_ok
    }
}

type Wake = Arc<dyn Fn() + Send + Sync>;

struct Subscriber {
    filter: Filter,
    tx: Sender<BusItem>,
}

#[derive(Clone, Default)]
pub struct Bus {
    subs: Arc<Mutex<Vec<Subscriber>>>,
    wake: Arc<Mutex<Option<Wake>>>,
}

impl Bus {
    /// Sets what to call after publishing (the API loop's waker).
    pub fn set_waker(&self, wake: Wake) {
        *self.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake);
    }

    pub fn subscribe(&self, filter: Filter) -> Receiver<BusItem> {
        let (tx, rx) = mpsc::channel();
        self.subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Subscriber { filter, tx });
        rx
    }

    pub fn publish(&self, item: BusItem) {
        let mut delivered = false;
        {
            let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
            subs.retain(|s| {
                if !s.filter.matches(&item) {
                    return true;
                }
                delivered = true;
                s.tx.send(item.clone()).is_ok()
            });
        }
        if delivered {
            if let Some(w) = self.wake.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                w();
            }
        }
    }

    pub fn subscriber_count(&self) -> usize {
        self.subs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(vmid: u32) -> BusItem {
        BusItem::Console {
            vmid,
            ts: Timestamp(0),
            line: "x".into(),
        }
    }

    #[test]
    fn vmid_filter_drops_other_sandboxes() {
        let bus = Bus::default();
        let rx = bus.subscribe(Filter {
            vmid: Some(1000),
            console: true,
        });
        bus.publish(console(1001));
        bus.publish(console(1000));
        assert_eq!(rx.try_recv().unwrap().vmid(), Some(1000));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn event_only_filter_skips_console_lines() {
        let bus = Bus::default();
        let rx = bus.subscribe(Filter {
            vmid: None,
            console: false,
        });
        bus.publish(console(1000));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn closed_subscribers_are_dropped() {
        let bus = Bus::default();
        let rx = bus.subscribe(Filter {
            vmid: None,
            console: true,
        });
        drop(rx);
        bus.publish(console(1000));
        assert_eq!(bus.subscriber_count(), 0);
    }

    #[test]
    fn publishing_wakes_the_loop() {
        let bus = Bus::default();
        let woken = Arc::new(Mutex::new(0));
        let w = woken.clone();
        bus.set_waker(Arc::new(move || *w.lock().unwrap() += 1));
        let _rx = bus.subscribe(Filter {
            vmid: None,
            console: true,
        });
        bus.publish(console(1));
        assert_eq!(*woken.lock().unwrap(), 1);
    }
}
