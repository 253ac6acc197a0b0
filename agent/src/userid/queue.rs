//! A firewall's pending updates: bounded, and coalesced so that only the latest state of each
//! address (and of each user's tags) waits to be sent.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

use super::xml::Op;

/// What an update is about: later updates for the same key replace earlier ones.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// An address's mapping (login, logout).
    Ip(IpAddr),
    /// A user's tags (register, unregister).
    User(String),
}

fn key(op: &Op) -> Key {
    match op {
        Op::Login { ip, .. } | Op::Logout { ip, .. } => Key::Ip(*ip),
        Op::Tag { user, .. } | Op::Untag { user, .. } => Key::User(user.clone()),
    }
}

/// Updates waiting for one firewall, oldest first.
#[derive(Debug)]
pub struct Pending {
    order: VecDeque<Key>,
    ops: HashMap<Key, Op>,
    capacity: usize,
}

impl Pending {
    /// An empty queue holding at most `capacity` updates.
    pub fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            ops: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Updates waiting.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Adds `op`, replacing a waiting update about the same address or user (it keeps its
    /// place). Returns how many updates were dropped to make room (the oldest go first).
    pub fn push(&mut self, op: Op) -> usize {
        let k = key(&op);
        if let Some(slot) = self.ops.get_mut(&k) {
            *slot = op;
            return 0;
        }
        let mut dropped = 0;
        while self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.ops.remove(&old);
                dropped += 1;
            }
        }
        self.order.push_back(k.clone());
        self.ops.insert(k, op);
        dropped
    }

    /// Takes up to `n` updates, oldest first.
    pub fn take(&mut self, n: usize) -> Vec<Op> {
        let mut out = Vec::with_capacity(n.min(self.order.len()));
        while out.len() < n {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if let Some(op) = self.ops.remove(&k) {
                out.push(op);
            }
        }
        out
    }

    /// Puts back updates whose sending failed, ahead of the rest, unless a newer update about
    /// the same address or user arrived meanwhile. Returns how many had to be dropped for room.
    pub fn requeue(&mut self, ops: Vec<Op>) -> usize {
        let mut dropped = 0;
        for op in ops.into_iter().rev() {
            let k = key(&op);
            if self.ops.contains_key(&k) {
                continue;
            }
            if self.order.len() >= self.capacity {
                // The failed update is the oldest of all: it is the one to go.
                dropped += 1;
                continue;
            }
            self.order.push_front(k.clone());
            self.ops.insert(k, op);
        }
        dropped
    }
}
