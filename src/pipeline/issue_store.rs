//! The issue store: the latest view of every pipeline issue and one FIFO
//! queue per stage. The poller refreshes it; a stage hands an issue to the
//! next queue the moment its label is swapped, so stages never wait for the
//! next poll. An issue is in at most one queue, in flight, or waiting for a
//! delayed retry at a time: a retry keeps only the issue's number and stage,
//! and the issue is read again (record and forge) when it runs.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::agent::Stage;
use crate::forge::Issue;

/// Queue depths and in-flight counts per stage, for `STATUS=` and events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Depths {
    /// Queued issues per stage.
    pub queued: BTreeMap<Stage, usize>,
    /// Issues being worked on per stage.
    pub in_flight: BTreeMap<Stage, usize>,
    /// Issues waiting for a delayed retry (backoff, CI still running).
    pub delayed: usize,
}

impl Depths {
    /// Nothing queued, in flight or waiting for a retry.
    pub fn is_empty(&self) -> bool {
        self.queued.values().all(|n| *n == 0)
            && self.in_flight.values().all(|n| *n == 0)
            && self.delayed == 0
    }
}

#[derive(Debug, Default)]
struct Inner {
    issues: HashMap<u64, Issue>,
    queues: HashMap<Stage, VecDeque<u64>>,
    queued: HashSet<u64>,
    in_flight: HashMap<u64, Stage>,
    /// Issues waiting for a retry: the stage and when it is due.
    delayed: HashMap<u64, (Stage, Instant)>,
    /// The store version at which each issue last left a stage or the store.
    settled: HashMap<u64, u64>,
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
        let version = *self.version.borrow() + 1;
        inner.settled.insert(number, version);
        inner.issues.remove(&number);
        inner.delayed.remove(&number);
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
            if inner.queued.contains(&number)
                || inner.in_flight.contains_key(&number)
                || inner.delayed.contains_key(&number)
            {
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
        {
            let mut inner = self.lock();
            inner.in_flight.remove(&number);
            let version = *self.version.borrow() + 1;
            inner.settled.insert(number, version);
        }
        self.changed();
    }

    /// The current version: every change of the store increases it.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Whether the issue left a stage (or the store) after `version`: a view
    /// of it listed before then is stale and must not route it again.
    pub fn settled_since(&self, number: u64, version: u64) -> bool {
        self.lock()
            .settled
            .get(&number)
            .is_some_and(|v| *v > version)
    }

    /// Hand an in-flight issue to `stage`'s queue at once (after its label
    /// swap), in one step so the issue is never seen neither queued nor in flight.
    pub fn hand_off(&self, issue: Issue, stage: Stage) {
        let number = issue.number;
        {
            let mut inner = self.lock();
            inner.in_flight.remove(&number);
            let version = *self.version.borrow() + 1;
            inner.settled.insert(number, version);
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

    /// Whether the issue is queued, in flight or waiting for a retry.
    pub fn is_busy(&self, number: u64) -> bool {
        let inner = self.lock();
        inner.queued.contains(&number)
            || inner.in_flight.contains_key(&number)
            || inner.delayed.contains_key(&number)
    }

    /// The in-flight issue leaves its stage task to be retried in `stage`
    /// at `due`: until then neither the poller nor a stale copy queues it.
    pub fn delay(&self, number: u64, stage: Stage, due: Instant) {
        {
            let mut inner = self.lock();
            inner.in_flight.remove(&number);
            let version = *self.version.borrow() + 1;
            inner.settled.insert(number, version);
            if !inner.queued.contains(&number) {
                inner.delayed.insert(number, (stage, due));
            }
        }
        self.changed();
    }

    /// When the earliest delayed retry is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.lock().delayed.values().map(|(_, due)| *due).min()
    }

    /// Take the retries due at `now` (all of them with `None`), earliest
    /// first: they are no longer delayed, and the caller queues what is
    /// still to be done.
    pub fn take_due(&self, now: Option<Instant>) -> Vec<(u64, Stage)> {
        let mut due: Vec<(Instant, u64, Stage)> = {
            let mut inner = self.lock();
            let numbers: Vec<u64> = inner
                .delayed
                .iter()
                .filter(|(_, (_, at))| now.is_none_or(|now| *at <= now))
                .map(|(n, _)| *n)
                .collect();
            numbers
                .into_iter()
                .filter_map(|n| inner.delayed.remove(&n).map(|(s, at)| (at, n, s)))
                .collect()
        };
        if !due.is_empty() {
            self.changed();
        }
        due.sort();
        due.into_iter().map(|(_, n, s)| (n, s)).collect()
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
        d.delayed = inner.delayed.len();
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
    fn a_listing_older_than_a_hand_off_is_stale() {
        let store = IssueStore::new();
        store.enqueue(issue(1), Stage::Implement);
        store.take(Stage::Implement);
        let listed_at = store.version();
        assert!(!store.settled_since(1, listed_at));
        store.hand_off(issue(1), Stage::Review);
        assert!(store.settled_since(1, listed_at));
        store.take(Stage::Review);
        let later = store.version();
        store.finish(1);
        assert!(store.settled_since(1, later));
        assert!(!store.settled_since(2, 0));
    }

    #[test]
    fn a_delayed_issue_is_not_queued_again_until_due() {
        let store = IssueStore::new();
        store.enqueue(issue(1), Stage::Implement);
        store.take(Stage::Implement);
        let now = Instant::now();
        store.delay(
            1,
            Stage::Implement,
            now + std::time::Duration::from_secs(60),
        );
        assert!(store.is_busy(1));
        assert!(
            !store.enqueue(issue(1), Stage::Implement),
            "the poller cannot queue it"
        );
        assert!(!store.depths().is_empty());
        assert_eq!(store.take_due(Some(now)), vec![]);
        assert_eq!(store.take_due(None), vec![(1, Stage::Implement)]);
        assert!(!store.is_busy(1));
        assert!(store.depths().is_empty());
        assert!(store.enqueue(issue(1), Stage::Implement));
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
