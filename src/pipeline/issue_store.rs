//! The issue store: the latest view of every pipeline issue and one FIFO
//! queue per stage. The poller refreshes it; a stage hands an issue to the
//! next queue the moment its label is swapped, so stages never wait for the
//! next poll. An issue is in at most one queue or in flight at a time.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::agent::Stage;
use crate::forge::Issue;

/// Queue depths and in-flight counts per stage, for `STATUS=` and events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Depths {
    /// Queued issues per stage.
    pub queued: BTreeMap<Stage, usize>,
    /// Issues being worked on per stage.
    pub in_flight: BTreeMap<Stage, usize>,
}

impl Depths {
    /// Nothing queued and nothing in flight.
    pub fn is_empty(&self) -> bool {
        self.queued.values().all(|n| *n == 0) && self.in_flight.values().all(|n| *n == 0)
    }
}

#[derive(Debug, Default)]
struct Inner {
    issues: HashMap<u64, Issue>,
    queues: HashMap<Stage, VecDeque<u64>>,
    queued: HashSet<u64>,
    in_flight: HashMap<u64, Stage>,
}

/// The issue store of one repository.
#[derive(Debug, Default)]
pub struct IssueStore {
    inner: Mutex<Inner>,
    wakers: HashMap<Stage, Notify>,
    version: watch::Sender<u64>,
}

impl IssueStore {
    /// An empty store.
    pub fn new() -> IssueStore {
        IssueStore {
            inner: Mutex::new(Inner::default()),
            wakers: Stage::ALL.into_iter().map(|s| (s, Notify::new())).collect(),
            version: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Wakes on every change of the queues or of an issue (for the status line).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Remember the latest view of `issue` (labels, title, …).
    pub fn upsert(&self, issue: Issue) {
        self.lock().issues.insert(issue.number, issue);
        self.changed();
    }

    /// The latest view of an issue.
    pub fn get(&self, number: u64) -> Option<Issue> {
        self.lock().issues.get(&number).cloned()
    }

    /// Forget an issue (closed, deleted, out of the pipeline) unless it is in flight.
    pub fn forget(&self, number: u64) {
        let mut inner = self.lock();
        if inner.in_flight.contains_key(&number) {
            return;
        }
        inner.issues.remove(&number);
        if inner.queued.remove(&number) {
            for q in inner.queues.values_mut() {
                q.retain(|n| *n != number);
            }
        }
        drop(inner);
        self.changed();
    }

    /// Append `issue` to `stage`'s queue unless it is already queued or in
    /// flight; wakes the stage. Returns whether it was queued.
    pub fn enqueue(&self, issue: Issue, stage: Stage) -> bool {
        let number = issue.number;
        {
            let mut inner = self.lock();
            inner.issues.insert(number, issue);
            if inner.queued.contains(&number) || inner.in_flight.contains_key(&number) {
                return false;
            }
            inner.queued.insert(number);
            inner.queues.entry(stage).or_default().push_back(number);
        }
        self.changed();
        if let Some(w) = self.wakers.get(&stage) {
            w.notify_one();
        }
        true
    }

    /// Take the oldest queued issue of `stage` and mark it in flight.
    pub fn take(&self, stage: Stage) -> Option<Issue> {
        let mut inner = self.lock();
        let number = inner.queues.get_mut(&stage)?.pop_front()?;
        inner.queued.remove(&number);
        inner.in_flight.insert(number, stage);
        let issue = inner.issues.get(&number).cloned();
        drop(inner);
        self.changed();
        issue
    }

    /// The issue left its stage task (finished, failed or handed off).
    pub fn finish(&self, number: u64) {
        self.lock().in_flight.remove(&number);
        self.changed();
    }

    /// Hand an in-flight issue to `stage`'s queue at once (after its label
    /// swap), in one step so the issue is never seen neither queued nor in flight.
    pub fn hand_off(&self, issue: Issue, stage: Stage) {
        let number = issue.number;
        {
            let mut inner = self.lock();
            inner.in_flight.remove(&number);
            inner.issues.insert(number, issue);
            if inner.queued.insert(number) {
                inner.queues.entry(stage).or_default().push_back(number);
            }
        }
        self.changed();
        if let Some(w) = self.wakers.get(&stage) {
            w.notify_one();
        }
    }

    /// Wait until `stage` may have work (woken by enqueue or [`IssueStore::wake_all`]).
    pub async fn notified(&self, stage: Stage) {
        if let Some(w) = self.wakers.get(&stage) {
            w.notified().await;
        }
    }

    /// Wake every stage loop (on stop or resume).
    pub fn wake_all(&self) {
        for w in self.wakers.values() {
            w.notify_one();
        }
    }

    /// Whether the issue is queued or in flight.
    pub fn is_busy(&self, number: u64) -> bool {
        let inner = self.lock();
        inner.queued.contains(&number) || inner.in_flight.contains_key(&number)
    }

    /// The issues in flight with their stages.
    pub fn in_flight(&self) -> Vec<(u64, Stage)> {
        self.lock()
            .in_flight
            .iter()
            .map(|(n, s)| (*n, *s))
            .collect()
    }

    /// Queue depths and in-flight counts.
    pub fn depths(&self) -> Depths {
        let inner = self.lock();
        let mut d = Depths::default();
        for stage in Stage::ALL {
            d.queued
                .insert(stage, inner.queues.get(&stage).map_or(0, VecDeque::len));
            d.in_flight.insert(
                stage,
                inner.in_flight.values().filter(|s| **s == stage).count(),
            );
        }
        d
    }

    /// The queued issue numbers per stage, in order.
    pub fn queues(&self) -> BTreeMap<Stage, Vec<u64>> {
        let inner = self.lock();
        Stage::ALL
            .into_iter()
            .map(|s| {
                (
                    s,
                    inner
                        .queues
                        .get(&s)
                        .map(|q| q.iter().copied().collect())
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Every issue the store knows.
    pub fn all(&self) -> Vec<Issue> {
        let mut v: Vec<Issue> = self.lock().issues.values().cloned().collect();
        v.sort_by_key(|i| i.number);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forge::IssueState;

    fn issue(n: u64) -> Issue {
        Issue {
            number: n,
            title: format!("issue {n}"),
            body: String::new(),
            labels: vec![],
            author: "me".into(),
            state: IssueState::Open,
            url: None,
        }
    }

    #[test]
    fn fifo_per_stage_and_no_duplicates() {
        let store = IssueStore::new();
        assert!(store.enqueue(issue(1), Stage::Triage));
        assert!(store.enqueue(issue(2), Stage::Triage));
        assert!(!store.enqueue(issue(1), Stage::Plan), "already queued");
        assert_eq!(store.take(Stage::Triage).unwrap().number, 1);
        assert!(!store.enqueue(issue(1), Stage::Triage), "in flight");
        store.hand_off(issue(1), Stage::Plan);
        assert_eq!(store.take(Stage::Plan).unwrap().number, 1);
        assert_eq!(store.take(Stage::Triage).unwrap().number, 2);
        assert!(store.take(Stage::Triage).is_none());
        let d = store.depths();
        assert_eq!(d.in_flight[&Stage::Plan], 1);
        store.finish(1);
        store.finish(2);
        assert!(store.depths().is_empty());
    }

    #[test]
    fn forget_removes_from_queues_but_not_in_flight() {
        let store = IssueStore::new();
        store.enqueue(issue(1), Stage::Review);
        store.enqueue(issue(2), Stage::Review);
        store.forget(1);
        assert_eq!(store.queues()[&Stage::Review], vec![2]);
        store.take(Stage::Review);
        store.forget(2);
        assert!(store.get(2).is_some());
    }
}
