//! Labels as the state machine (docs/design/pipeline.md): which stage an issue is in, and the
//! swap that moves it (add the new label first, then remove every other
//! pipeline label; removing an absent label is success).

use crate::agent::Stage;
use crate::config::Labels;
use crate::forge::{Forge, ForgeResult, LabelSpec};

/// Where an issue's labels route it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Into a stage queue.
    Stage(Stage),
    /// Waiting for a human: queued for the HITL loop only when a command is pending.
    WaitingForHuman,
    /// A correction was being applied (`hydraflow-hitl-active`): resume HITL.
    HitlActive,
    /// Not for the pipeline (`human-required`, `hydraflow-fixed`, no pipeline label).
    Ignore,
}

/// The label names of one configuration, with routing and swaps.
#[derive(Debug, Clone)]
pub struct LabelSet {
    labels: Labels,
}

impl LabelSet {
    /// Wrap the configured names.
    pub fn new(labels: &Labels) -> LabelSet {
        LabelSet {
            labels: labels.clone(),
        }
    }

    /// The configured names.
    pub fn names(&self) -> &Labels {
        &self.labels
    }

    /// Every pipeline label (stages, HITL, fixed), the ones a swap clears.
    pub fn pipeline(&self) -> Vec<String> {
        let mut labels = self.listed();
        labels.push(self.labels.fixed.clone());
        labels
    }

    /// The labels the poller lists issues by (every stage and HITL label).
    pub fn listed(&self) -> Vec<String> {
        let l = &self.labels;
        [
            &l.find,
            &l.plan,
            &l.ready,
            &l.review,
            &l.hitl,
            &l.hitl_active,
        ]
        .map(String::clone)
        .to_vec()
    }

    /// The label of a stage.
    pub fn of_stage(&self, stage: Stage) -> &str {
        let l = &self.labels;
        match stage {
            Stage::Triage => &l.find,
            Stage::Plan => &l.plan,
            Stage::Implement => &l.ready,
            Stage::Review => &l.review,
            Stage::Hitl => &l.hitl,
        }
    }

    /// Route an issue by its labels: the highest stage wins
    /// (find < plan < ready < review < hitl); `human-required` and
    /// `hydraflow-fixed` keep it out.
    pub fn route(&self, labels: &[String]) -> Route {
        let has = |name: &str| labels.iter().any(|l| l == name);
        let l = &self.labels;
        if has(&l.human_required) || has(&l.fixed) {
            Route::Ignore
        } else if has(&l.hitl_active) {
            Route::HitlActive
        } else if has(&l.hitl) {
            Route::WaitingForHuman
        } else if has(&l.review) {
            Route::Stage(Stage::Review)
        } else if has(&l.ready) {
            Route::Stage(Stage::Implement)
        } else if has(&l.plan) {
            Route::Stage(Stage::Plan)
        } else if has(&l.find) {
            Route::Stage(Stage::Triage)
        } else {
            Route::Ignore
        }
    }

    /// The pipeline label an issue carries that routes it (its origin when escalated).
    pub fn current(&self, labels: &[String]) -> Option<String> {
        match self.route(labels) {
            Route::Stage(s) => Some(self.of_stage(s).to_owned()),
            Route::WaitingForHuman | Route::HitlActive => Some(self.labels.hitl.clone()),
            Route::Ignore => None,
        }
    }

    /// The stage a pipeline label belongs to.
    pub fn stage_of_label(&self, label: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| self.of_stage(*s) == label)
    }

    /// Move an issue to `new`: add `new` first (it must succeed), then remove
    /// every other pipeline label present in `current` (absent ones are
    /// skipped; the forge treats removing an absent label as success anyway).
    ///
    /// # Errors
    /// The forge's error; when adding fails nothing was removed.
    pub async fn swap(
        &self,
        forge: &dyn Forge,
        number: u64,
        current: &[String],
        new: &str,
    ) -> ForgeResult<Vec<String>> {
        forge.add_label(number, new).await?;
        let mut labels: Vec<String> = current.to_vec();
        if !labels.iter().any(|l| l == new) {
            labels.push(new.to_owned());
        }
        for old in self.pipeline() {
            if old != new && current.contains(&old) {
                forge.remove_label(number, &old).await?;
                labels.retain(|l| *l != old);
            }
        }
        Ok(labels)
    }

    /// The labels `ensure_labels` creates, with colours and descriptions.
    pub fn specs(&self) -> Vec<LabelSpec> {
        let l = &self.labels;
        let spec = |name: &str, color: &str, description: &str| LabelSpec {
            name: name.to_owned(),
            color: color.to_owned(),
            description: description.to_owned(),
        };
        vec![
            spec(&l.find, "1d76db", "HydraFlow: triage queue"),
            spec(&l.plan, "5319e7", "HydraFlow: planning"),
            spec(&l.ready, "0e8a16", "HydraFlow: ready to implement"),
            spec(&l.review, "fbca04", "HydraFlow: pull request under review"),
            spec(&l.hitl, "d93f0b", "HydraFlow: waiting for a human"),
            spec(
                &l.hitl_active,
                "e99695",
                "HydraFlow: applying a human correction",
            ),
            spec(&l.fixed, "0e8a16", "HydraFlow: merged"),
            spec(
                &l.in_progress,
                "c2e0c6",
                "HydraFlow: an agent is working on it",
            ),
            spec(
                &l.parked,
                "bfdadc",
                "HydraFlow: triage needs more information",
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(labels: &[&str], expected: Route) {
        let set = LabelSet::new(&Labels::default());
        let labels: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(set.route(&labels), expected, "{labels:?}");
    }

    #[test]
    fn routing_by_highest_label() {
        check(&["hydraflow-find"], Route::Stage(Stage::Triage));
        check(&["hydraflow-plan"], Route::Stage(Stage::Plan));
        check(&["hydraflow-ready"], Route::Stage(Stage::Implement));
        check(&["hydraflow-review"], Route::Stage(Stage::Review));
        check(&["hydraflow-hitl"], Route::WaitingForHuman);
        check(&["hydraflow-hitl-active"], Route::HitlActive);
        check(
            &["hydraflow-find", "hydraflow-plan"],
            Route::Stage(Stage::Plan),
        );
        check(
            &["hydraflow-review", "hydraflow-ready", "bug"],
            Route::Stage(Stage::Review),
        );
        check(
            &["hydraflow-hitl", "hydraflow-review"],
            Route::WaitingForHuman,
        );
        check(&["hydraflow-find", "human-required"], Route::Ignore);
        check(&["hydraflow-fixed", "hydraflow-review"], Route::Ignore);
        check(&["hydraflow-parked"], Route::Ignore);
        check(&["bug"], Route::Ignore);
        check(&[], Route::Ignore);
        check(
            &["hydraflow-find", "hydraflow-in-progress"],
            Route::Stage(Stage::Triage),
        );
    }

    #[test]
    fn stage_labels_round_trip() {
        let set = LabelSet::new(&Labels::default());
        for stage in Stage::ALL {
            assert_eq!(set.stage_of_label(set.of_stage(stage)), Some(stage));
        }
        assert_eq!(
            set.current(&["hydraflow-ready".into()]).as_deref(),
            Some("hydraflow-ready")
        );
    }
}
