//! The failure taxonomy and the failure policy, in one place and pure.
//!
//! Every way a stage can fail is one [`Failure`]:
//! - *attempt*: the agent's work failed (a bad answer, no commit, a red
//!   quality command, a timeout); counts toward `max_issue_attempts`;
//! - *later*: a passing fault outside the issue (forge 5xx, network, rate
//!   limit, model API overloaded); tried again after a delay, nothing counted;
//! - *storage*: HydraFlow's own files cannot be written (disk full, data
//!   directory read-only); never the agent's fault: the pipeline pauses
//!   until a probe write succeeds;
//! - *pause*: wrong for every issue (authentication, usage limit, an agent
//!   that cannot run); the pipeline waits and resumes by itself;
//! - *escalate*: a human must decide;
//! - *gone*: the issue left (closed, deleted).
//!
//! [`decide`] turns a failure and the issue's record into a [`Decision`];
//! the thin layer in `task` carries it out. It never escalates an issue
//! that already waits for a human (unless a command of theirs is being
//! applied), and never lets attempts pass the limit.

use std::time::{Duration, SystemTime};

use crate::store::state::{IssueRecord, Phase};

/// Why a stage could not go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The agent's work failed: counts an attempt.
    Attempt(String),
    /// A passing fault outside the issue: try again after `after`.
    Later {
        /// What failed.
        cause: String,
        /// How long to wait.
        after: Duration,
    },
    /// HydraFlow's own files could not be written.
    Storage(String),
    /// Wrong for every issue: pause the pipeline.
    Pause(PauseCause),
    /// Straight to a human.
    Escalate(String),
    /// The issue left the pipeline.
    Gone(String),
}

impl Failure {
    /// The class name used in events and logs.
    pub fn class(&self) -> &'static str {
        match self {
            Failure::Attempt(_) => "attempt",
            Failure::Later { .. } => "later",
            Failure::Storage(_) => "storage",
            Failure::Pause(_) => "pause",
            Failure::Escalate(_) => "escalate",
            Failure::Gone(_) => "gone",
        }
    }

    /// What happened, in words.
    pub fn cause(&self) -> &str {
        match self {
            Failure::Attempt(c)
            | Failure::Later { cause: c, .. }
            | Failure::Storage(c)
            | Failure::Escalate(c)
            | Failure::Gone(c) => c,
            Failure::Pause(p) => &p.reason,
        }
    }
}

/// What a pause waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PauseKind {
    /// The forge refused the credentials; a forge call is the probe.
    ForgeAuth,
    /// The forge's rate limit; resumes at the reset time.
    RateLimit,
    /// The agent could not authenticate; the next agent call is the probe.
    AgentAuth,
    /// An agent usage or credit limit; resumes at the reset time.
    UsageLimit,
    /// The agent program cannot run (missing, refused to start).
    AgentUnavailable,
    /// The data directory takes no writes; a state write is the probe.
    Storage,
    /// The day's agent budget is spent; resumes the next day.
    Budget,
}

/// Why the pipeline pauses, and until when if that is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseCause {
    /// For `STATUS=`, the journal and the dashboard.
    pub reason: String,
    /// What ends it.
    pub kind: PauseKind,
    /// A known end (a usage limit's reset time); `None` = probe with backoff.
    pub until: Option<SystemTime>,
}

impl PauseCause {
    /// A pause of `kind` without a known end.
    pub fn new(kind: PauseKind, reason: impl Into<String>) -> PauseCause {
        PauseCause {
            reason: reason.into(),
            kind,
            until: None,
        }
    }

    /// The first wait before the probe (or the end), and the longest wait
    /// the backoff between failed probes grows to.
    pub fn waits(&self) -> (Duration, Duration) {
        match self.kind {
            PauseKind::Storage => (Duration::from_secs(1), Duration::from_secs(30)),
            PauseKind::ForgeAuth => (Duration::from_secs(60), Duration::from_secs(1800)),
            PauseKind::AgentAuth => (Duration::from_secs(60), Duration::from_secs(1800)),
            PauseKind::AgentUnavailable => (Duration::from_secs(60), Duration::from_secs(1800)),
            PauseKind::RateLimit | PauseKind::UsageLimit | PauseKind::Budget => {
                (Duration::from_secs(3600), Duration::from_secs(24 * 3600))
            }
        }
    }
}

/// What the failure means for the issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Count an attempt (`attempts` is the new count) and run the stage
    /// again after `after`.
    Retry {
        /// Attempts after this one.
        attempts: u32,
        /// Delay before the retry.
        after: Duration,
    },
    /// Run the stage again after `after`; nothing counted.
    Later {
        /// Delay.
        after: Duration,
    },
    /// Pause the whole pipeline; the issue runs again once it resumes.
    Pause(PauseCause),
    /// Send the issue to a human with `cause`; `attempts` is the count to record.
    Escalate {
        /// Why, for the comment and the record.
        cause: String,
        /// Attempts to record.
        attempts: u32,
    },
    /// Leave the issue alone (it left the pipeline, or a human has it already).
    Drop,
}

/// The settings the policy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// `max_issue_attempts` (at least 1).
    pub max_attempts: u32,
    /// The longest delay between attempts (`poll_interval`).
    pub max_retry_delay: Duration,
}

/// The failure policy: pure, one line per case.
pub fn decide(failure: &Failure, record: &IssueRecord, policy: &Policy) -> Decision {
    if matches!(
        record.phase,
        Phase::WaitingForHuman { pending: None, .. } | Phase::Done { .. }
    ) && !matches!(failure, Failure::Storage(_) | Failure::Pause(_))
    {
        // Escalated or finished meanwhile: nothing more to count or say
        // (a human's command being applied still counts its attempts).
        return Decision::Drop;
    }
    let max = policy.max_attempts.max(1);
    match failure {
        Failure::Attempt(cause) => {
            let attempts = record.attempts.saturating_add(1).min(max);
            if attempts >= max {
                Decision::Escalate {
                    cause: format!("{cause} (after {attempts} attempts)"),
                    attempts,
                }
            } else {
                Decision::Retry {
                    attempts,
                    after: retry_delay(attempts, policy.max_retry_delay),
                }
            }
        }
        Failure::Later { after, .. } => Decision::Later { after: *after },
        Failure::Storage(reason) => Decision::Pause(PauseCause::new(
            PauseKind::Storage,
            format!("the data directory takes no writes: {reason}"),
        )),
        Failure::Pause(cause) => Decision::Pause(cause.clone()),
        Failure::Escalate(cause) => Decision::Escalate {
            cause: cause.clone(),
            attempts: record.attempts.min(max),
        },
        Failure::Gone(_) => Decision::Drop,
    }
}

/// The delay before attempt `attempts + 1`: 2 s, 4 s, 8 s, … up to `max`.
pub fn retry_delay(attempts: u32, max: Duration) -> Duration {
    crate::backoff::nth(Duration::from_secs(2), max, attempts.saturating_sub(1))
}

/// The `n`-th wait (from 0) of a pause's probe backoff.
pub fn probe_delay(cause: &PauseCause, failures: u32) -> Duration {
    let (first, max) = cause.waits();
    crate::backoff::nth(first, max, failures)
}

/// How long a passing forge failure (5xx, network) waits before the stage
/// runs again (the forge has already retried inside the call).
pub const TRANSIENT_RETRY: Duration = Duration::from_secs(15);

/// Whether an error text is the operating system saying the disk is full
/// or read-only (`ENOSPC`, `EDQUOT`, `EROFS` as `strerror` words them; git2
/// passes only the text on).
pub fn is_storage_text(text: &str) -> bool {
    const WORDS: [&str; 3] = [
        "No space left on device",
        "Read-only file system",
        "Disk quota exceeded",
    ];
    WORDS.iter().any(|w| text.contains(w))
}

/// Whether an I/O error is a full or read-only disk.
pub fn is_storage_io(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull
            | std::io::ErrorKind::ReadOnlyFilesystem
            | std::io::ErrorKind::QuotaExceeded
    ) || is_storage_text(&e.to_string())
}

impl From<crate::forge::ForgeError> for Failure {
    fn from(e: crate::forge::ForgeError) -> Failure {
        use crate::forge::ForgeError;
        match e {
            ForgeError::Auth(m) => Failure::Pause(PauseCause::new(
                PauseKind::ForgeAuth,
                format!("forge authentication failed: {m}"),
            )),
            ForgeError::RateLimited { retry_after } => Failure::Later {
                cause: "forge rate limit reached".into(),
                after: retry_after,
            },
            ForgeError::Transient(m) => Failure::Later {
                cause: format!("forge temporarily failed: {m}"),
                after: TRANSIENT_RETRY,
            },
            ForgeError::NotFound(m) => Failure::Gone(format!("not found on the forge: {m}")),
            ForgeError::Local(m) if is_storage_text(&m) => Failure::Storage(m),
            e @ (ForgeError::MergeConflict(_) | ForgeError::Rejected(_) | ForgeError::Local(_)) => {
                Failure::Attempt(e.to_string())
            }
        }
    }
}

impl From<crate::git::GitError> for Failure {
    fn from(e: crate::git::GitError) -> Failure {
        use crate::git::GitError;
        let storage = match &e {
            GitError::Io { cause: source, .. } => is_storage_io(source),
            other => is_storage_text(&other.to_string()),
        };
        if storage {
            Failure::Storage(format!("git: {e}"))
        } else {
            Failure::Attempt(format!("git: {e}"))
        }
    }
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Failure {
        Failure::Storage(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Stage;
    use crate::store::state::{HitlRecord, Outcome};

    const POLICY: Policy = Policy {
        max_attempts: 3,
        max_retry_delay: Duration::from_secs(30),
    };

    fn record(attempts: u32, phase: Phase) -> IssueRecord {
        IssueRecord {
            attempts,
            phase,
            ..IssueRecord::default()
        }
    }

    fn claimed() -> Phase {
        Phase::Claimed {
            stage: Stage::Implement,
        }
    }

    fn waiting() -> Phase {
        Phase::WaitingForHuman {
            hitl: HitlRecord {
                origin: "hydraflow-ready".into(),
                stage: Stage::Implement,
                cause: "c".into(),
                escalated_at: chrono::DateTime::UNIX_EPOCH,
            },
            pending: None,
        }
    }

    fn check(failure: Failure, attempts: u32, phase: Phase, expected: Decision) {
        let got = decide(&failure, &record(attempts, phase), &POLICY);
        assert_eq!(got, expected, "{failure:?} with {attempts} attempts");
    }

    fn attempt() -> Failure {
        Failure::Attempt("agent exited with code 1".into())
    }

    #[test]
    fn the_policy() {
        let retry = |attempts, secs| Decision::Retry {
            attempts,
            after: Duration::from_secs(secs),
        };
        let escalate = |cause: &str, attempts| Decision::Escalate {
            cause: cause.into(),
            attempts,
        };
        check(attempt(), 0, claimed(), retry(1, 2));
        check(attempt(), 1, claimed(), retry(2, 4));
        check(
            attempt(),
            2,
            claimed(),
            escalate("agent exited with code 1 (after 3 attempts)", 3),
        );
        // A count already at (or past) the limit never grows.
        check(
            attempt(),
            3,
            claimed(),
            escalate("agent exited with code 1 (after 3 attempts)", 3),
        );
        check(
            attempt(),
            u32::MAX,
            claimed(),
            escalate("agent exited with code 1 (after 3 attempts)", 3),
        );
        check(
            Failure::Later {
                cause: "forge 502".into(),
                after: Duration::from_secs(5),
            },
            2,
            claimed(),
            Decision::Later {
                after: Duration::from_secs(5),
            },
        );
        check(
            Failure::Storage("No space left on device".into()),
            2,
            claimed(),
            Decision::Pause(PauseCause::new(
                PauseKind::Storage,
                "the data directory takes no writes: No space left on device",
            )),
        );
        check(
            Failure::Escalate("no diff".into()),
            1,
            claimed(),
            escalate("no diff", 1),
        );
        check(Failure::Gone("closed".into()), 1, claimed(), Decision::Drop);
        // Nothing counted or escalated twice for an issue a human has.
        check(attempt(), 2, waiting(), Decision::Drop);
        check(Failure::Escalate("x".into()), 0, waiting(), Decision::Drop);
        check(
            attempt(),
            0,
            Phase::Done {
                outcome: Outcome::Merged,
            },
            Decision::Drop,
        );
        // But a full disk still pauses.
        check(
            Failure::Storage("ro".into()),
            0,
            waiting(),
            Decision::Pause(PauseCause::new(
                PauseKind::Storage,
                "the data directory takes no writes: ro",
            )),
        );
    }

    #[test]
    fn forge_and_git_errors_have_their_class() {
        use crate::forge::ForgeError;
        let class = |e: ForgeError| Failure::from(e).class();
        assert_eq!(class(ForgeError::Auth("401".into())), "pause");
        assert_eq!(class(ForgeError::Transient("502".into())), "later");
        assert_eq!(
            class(ForgeError::RateLimited {
                retry_after: Duration::from_secs(9)
            }),
            "later"
        );
        assert_eq!(class(ForgeError::NotFound("issue #3".into())), "gone");
        assert_eq!(class(ForgeError::Rejected("422".into())), "attempt");
        assert_eq!(
            class(ForgeError::Local(
                "cannot write x: No space left on device (os error 28)".into()
            )),
            "storage"
        );
        let io = std::io::Error::from_raw_os_error(30); // EROFS
        let git = crate::git::GitError::Io {
            context: "cannot create /wt".into(),
            cause: io,
        };
        assert_eq!(Failure::from(git).class(), "storage");
    }

    #[test]
    fn delays_double_up_to_their_cap() {
        let secs = |d: Duration| d.as_secs();
        let retries: Vec<u64> = (1..=6)
            .map(|a| secs(retry_delay(a, Duration::from_secs(30))))
            .collect();
        assert_eq!(retries, [2, 4, 8, 16, 30, 30]);
        let storage = PauseCause::new(PauseKind::Storage, "x");
        let probes: Vec<u64> = (0..7).map(|n| secs(probe_delay(&storage, n))).collect();
        assert_eq!(probes, [1, 2, 4, 8, 16, 30, 30]);
        let auth = PauseCause::new(PauseKind::ForgeAuth, "x");
        assert_eq!(secs(probe_delay(&auth, 0)), 60);
        assert_eq!(secs(probe_delay(&auth, 20)), 1800);
    }
}
