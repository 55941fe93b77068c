//! A linearizability checker for a register per key, over a recorded
//! history of writes and reads with their invocation and response times.
//!
//! The search is Wing and Gong's, with Lowe's memoisation of the states
//! already explored (the set of operations linearized so far and the
//! register's value), run for each key on its own (a register per key is
//! linearizable exactly when each key's history is). An operation may be
//! linearized next only if it was invoked before the earliest response
//! among the operations not linearized yet.
//!
//! A write whose outcome is unknown (a timeout, a broken connection, an
//! `UNAVAILABLE` answer) has no response time: it may take effect at any
//! point after its invocation, or never. The search therefore need not
//! linearize it at all, and it never holds back another operation. Reads that
//! failed and writes that were definitely refused are not recorded.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::Instant;

/// What an operation did to its key's register.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Set the value.
    Write(String),
    /// Saw this value (`None`: the key did not exist).
    Read(Option<String>),
}

/// One completed or unknown-outcome operation.
#[derive(Clone, Debug)]
pub struct Event {
    pub client: usize,
    pub key: String,
    pub op: Op,
    /// Nanoseconds since the history began, when the call was made.
    pub call: u64,
    /// When the answer came; `None` when the outcome is unknown.
    pub ret: Option<u64>,
}

/// A history being recorded by concurrent clients of one process.
pub struct History {
    start: Instant,
    events: Mutex<Vec<Event>>,
}

impl Default for History {
    fn default() -> Self {
        History {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }
}

impl History {
    /// The time of a call, taken just before it is sent.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Records an operation that completed with `op` (taken at response time).
    pub fn ok(&self, client: usize, key: &str, op: Op, call: u64) {
        let ret = Some(self.now());
        self.push(Event {
            client,
            key: key.to_string(),
            op,
            call,
            ret,
        });
    }

    /// Records a write whose outcome is not known.
    pub fn unknown(&self, client: usize, key: &str, value: String, call: u64) {
        self.push(Event {
            client,
            key: key.to_string(),
            op: Op::Write(value),
            call,
            ret: None,
        });
    }

    fn push(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Why a history is not linearizable: the key, and the operations still
/// unplaced at the deepest point the search reached.
#[derive(Debug)]
pub struct Violation {
    pub key: String,
    pub linearized: usize,
    pub stuck: Vec<Event>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "key {:?} is not linearizable: after {} operations no next one fits; the earliest unplaced ones:",
            self.key, self.linearized
        )?;
        for e in &self.stuck {
            let ret = e
                .ret
                .map_or("unknown".to_string(), |r| format!("{:.3}s", r as f64 / 1e9));
            writeln!(
                f,
                "  client {} {:?} called {:.3}s returned {ret}",
                e.client,
                e.op,
                e.call as f64 / 1e9
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// Checks every key's history, each starting from "no value".
pub fn check(events: &[Event]) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        by_key.entry(&e.key).or_default().push(e);
    }
    for (key, ops) in by_key {
        check_key(key, &ops)?;
    }
    Ok(())
}

/// One key's operations, with values interned as small numbers.
struct KeyOp {
    call: u64,
    /// `u64::MAX` for an unknown outcome.
    ret: u64,
    write: bool,
    /// The value written or read; 0 is "no value".
    value: u32,
}

fn check_key(key: &str, events: &[&Event]) -> Result<(), Violation> {
    // An unknown-outcome write whose value no read saw changes nothing if it
    // is left out (it may not have happened), and placing it could only
    // leave a value nobody read: drop it, or the search tries each subset of
    // such writes in each order. Values are unique per write, as the drills
    // make them.
    let read: HashSet<&str> = events
        .iter()
        .filter_map(|e| match &e.op {
            Op::Read(Some(v)) => Some(v.as_str()),
            _ => None,
        })
        .collect();
    let mut events: Vec<&Event> = events
        .iter()
        .copied()
        .filter(|e| match (&e.op, e.ret) {
            (Op::Write(v), None) => read.contains(v.as_str()),
            _ => true,
        })
        .collect();
    events.sort_by_key(|e| e.call);
    let mut values: HashMap<String, u32> = HashMap::new();
    let mut intern = |v: Option<&String>| -> u32 {
        match v {
            None => 0,
            Some(s) => {
                let next = values.len() as u32 + 1;
                *values.entry(s.clone()).or_insert(next)
            }
        }
    };
    let ops: Vec<KeyOp> = events
        .iter()
        .map(|e| {
            let (write, value) = match &e.op {
                Op::Write(v) => (true, intern(Some(v))),
                Op::Read(v) => (false, intern(v.as_ref())),
            };
            KeyOp {
                call: e.call,
                ret: e.ret.unwrap_or(u64::MAX),
                write,
                value,
            }
        })
        .collect();
    let n = ops.len();
    let mut placed = vec![false; n];
    let mut bits = vec![0u64; n.div_ceil(64)];
    let mut to_place = ops.iter().filter(|o| o.ret != u64::MAX).count();
    if to_place == 0 {
        return Ok(());
    }
    let mut state = 0u32;
    let mut seen: HashSet<(Vec<u64>, u32)> = HashSet::new();

    // The operations that may go next: invoked before the earliest response
    // of those not placed yet.
    let candidates = |placed: &[bool]| -> Vec<usize> {
        let horizon = (0..n)
            .filter(|i| !placed[*i])
            .map(|i| ops[i].ret)
            .min()
            .unwrap_or(u64::MAX);
        (0..n)
            .filter(|i| !placed[*i] && ops[*i].call <= horizon)
            .collect()
    };

    struct Frame {
        cands: Vec<usize>,
        next: usize,
        /// The operation placed from this frame, and the value before it.
        chosen: Option<(usize, u32)>,
    }
    let mut stack = vec![Frame {
        cands: candidates(&placed),
        next: 0,
        chosen: None,
    }];
    let (mut deepest, mut deepest_placed) = (0usize, placed.clone());
    while let Some(top) = stack.last_mut() {
        if let Some((i, before)) = top.chosen.take() {
            placed[i] = false;
            bits[i / 64] &= !(1 << (i % 64));
            state = before;
            if ops[i].ret != u64::MAX {
                to_place += 1;
            }
        }
        if top.next == top.cands.len() {
            stack.pop();
            continue;
        }
        let i = top.cands[top.next];
        top.next += 1;
        let after = if ops[i].write {
            ops[i].value
        } else if ops[i].value == state {
            state
        } else {
            continue;
        };
        bits[i / 64] |= 1 << (i % 64);
        if !seen.insert((bits.clone(), after)) {
            bits[i / 64] &= !(1 << (i % 64));
            continue;
        }
        placed[i] = true;
        top.chosen = Some((i, state));
        state = after;
        if ops[i].ret != u64::MAX {
            to_place -= 1;
            if to_place == 0 {
                return Ok(());
            }
        }
        if stack.len() > deepest {
            deepest = stack.len();
            deepest_placed = placed.clone();
        }
        let cands = candidates(&placed);
        stack.push(Frame {
            cands,
            next: 0,
            chosen: None,
        });
    }
    let stuck = (0..n)
        .filter(|i| !deepest_placed[*i])
        .take(8)
        .map(|i| events[i].clone())
        .collect();
    Err(Violation {
        key: key.to_string(),
        linearized: deepest,
        stuck,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(client: usize, v: &str, call: u64, ret: Option<u64>) -> Event {
        Event {
            client,
            key: "k".into(),
            op: Op::Write(v.into()),
            call,
            ret,
        }
    }

    fn r(client: usize, v: Option<&str>, call: u64, ret: u64) -> Event {
        Event {
            client,
            key: "k".into(),
            op: Op::Read(v.map(str::to_string)),
            call,
            ret: Some(ret),
        }
    }

    #[test]
    fn sequential_history_passes() {
        let h = [
            r(0, None, 0, 1),
            w(0, "a", 2, Some(3)),
            r(1, Some("a"), 4, 5),
            w(1, "b", 6, Some(7)),
            r(0, Some("b"), 8, 9),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn overlapping_operations_may_go_either_way() {
        // Two concurrent writes; readers overlapping both see them in
        // either order, as long as one order explains every read.
        let h = [
            w(0, "a", 0, Some(10)),
            w(1, "b", 1, Some(11)),
            r(2, Some("b"), 2, 5),
            r(3, Some("a"), 6, 12),
        ];
        check(&h).unwrap();
    }

    #[test]
    fn a_stale_read_is_rejected() {
        // "a" then "b" were acknowledged one after the other; a read that
        // starts after both and sees "a" went back in time.
        let h = [
            w(0, "a", 0, Some(1)),
            w(0, "b", 2, Some(3)),
            r(1, Some("a"), 4, 5),
        ];
        let v = check(&h).unwrap_err();
        assert_eq!(v.key, "k");
        assert!(v.to_string().contains("not linearizable"), "{v}");
    }

    #[test]
    fn a_lost_acknowledged_write_is_rejected() {
        let h = [w(0, "a", 0, Some(1)), r(1, None, 2, 3)];
        check(&h).unwrap_err();
    }

    #[test]
    fn a_value_nobody_wrote_is_rejected() {
        let h = [w(0, "a", 0, Some(1)), r(1, Some("z"), 2, 3)];
        check(&h).unwrap_err();
    }

    #[test]
    fn reads_must_agree_on_one_order() {
        // Both writes overlap both reads, but the two readers disagree on
        // the order, one after the other: no single order fits.
        let h = [
            w(0, "a", 0, Some(100)),
            w(1, "b", 0, Some(100)),
            r(2, Some("a"), 10, 20),
            r(2, Some("b"), 30, 40),
            r(3, Some("b"), 50, 60),
            r(3, Some("a"), 70, 80),
        ];
        check(&h).unwrap_err();
    }

    #[test]
    fn an_unknown_write_may_or_may_not_take_effect() {
        // Never seen: fine.
        check(&[
            w(0, "a", 0, Some(1)),
            w(1, "x", 2, None),
            r(2, Some("a"), 5, 6),
        ])
        .unwrap();
        // Seen later, long after it was sent: fine.
        check(&[
            w(0, "a", 0, Some(1)),
            w(1, "x", 2, None),
            r(2, Some("a"), 5, 6),
            r(2, Some("x"), 50, 60),
        ])
        .unwrap();
        // Seen, and then the old value again: not fine.
        check(&[
            w(0, "a", 0, Some(1)),
            w(1, "x", 2, None),
            r(2, Some("x"), 5, 6),
            r(2, Some("a"), 50, 60),
        ])
        .unwrap_err();
        // Seen before it was sent: not fine.
        check(&[w(1, "x", 20, None), r(2, Some("x"), 5, 6)]).unwrap_err();
    }

    #[test]
    fn many_unread_unknown_writes_cost_nothing() {
        // A node that answers nothing for a while: thousands of writes with
        // unknown outcomes among a few known ones.
        let mut h = vec![w(0, "a", 0, Some(1))];
        for i in 0..5000u64 {
            h.push(w(1 + (i % 8) as usize, &format!("x{i}"), 2 + i, None));
        }
        h.push(r(9, Some("a"), 10_000, 10_001));
        h.push(w(0, "b", 10_002, Some(10_003)));
        h.push(r(9, Some("x4999"), 10_004, 10_005));
        check(&h).unwrap();
        // ...and a read that goes back before an unknown write it saw still fails.
        h.push(r(9, Some("b"), 10_006, 10_007));
        check(&h).unwrap_err();
    }

    #[test]
    fn keys_are_independent() {
        let mut other = w(0, "a", 0, Some(1));
        other.key = "j".into();
        check(&[other, r(1, None, 2, 3)]).unwrap();
    }

    #[test]
    fn a_long_concurrent_history_is_checked_quickly() {
        // Four clients, each write overlapping its neighbours, reads of the
        // latest acknowledged value: linearizable, and large enough that an
        // unmemoised search would not finish.
        let mut h = Vec::new();
        for i in 0..400u64 {
            let t = i * 10;
            h.push(w((i % 4) as usize, &format!("v{i}"), t, Some(t + 25)));
            if i > 3 {
                h.push(r(9, Some(&format!("v{}", i - 3)), t + 1, t + 2));
            }
            if i % 7 == 0 {
                h.push(w(8, &format!("lost{i}"), t, None));
            }
        }
        check(&h).unwrap();
    }
}
