//! What happens to a query the detector matched (`attack_detection.action`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// No fingerprints, no store, nothing added to the answer.
    #[default]
    Off,
    /// Answer as usual, with `query_attack: {detected, matches, window}` added.
    Flag,
    /// Answer 429 `query_attack_detected` with `Retry-After`, and refuse the client
    /// for `cooldown_seconds` (before its image is even decoded).
    Refuse,
    /// Answer with labels only: every probability, confidence and score is left out,
    /// so a score-based attack gets nothing to climb.
    Degrade,
}

/// The decision for one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Answer normally (not detected, or `flag`: the report is added either way).
    Answer,
    Refuse {
        retry_after: Duration,
    },
    Degrade,
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub action: Action,
    pub cooldown: Duration,
}

impl Policy {
    pub fn decide(&self, detected: bool) -> Decision {
        match (self.action, detected) {
            (Action::Refuse, true) => Decision::Refuse { retry_after: self.cooldown },
            (Action::Degrade, true) => Decision::Degrade,
            _ => Decision::Answer,
        }
    }

    /// Whether the answer carries the `query_attack` report.
    pub fn reports(&self) -> bool {
        self.action == Action::Flag
    }

    /// Whether a client in cooldown is refused before its image is decoded.
    pub fn refuses(&self) -> bool {
        self.action == Action::Refuse
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_detection_changes_the_answer() {
        let cooldown = Duration::from_secs(60);
        for action in [Action::Off, Action::Flag, Action::Refuse, Action::Degrade] {
            assert_eq!(Policy { action, cooldown }.decide(false), Decision::Answer, "{action:?}");
        }
        assert_eq!(Policy { action: Action::Flag, cooldown }.decide(true), Decision::Answer);
        assert_eq!(
            Policy { action: Action::Refuse, cooldown }.decide(true),
            Decision::Refuse { retry_after: cooldown }
        );
        assert_eq!(Policy { action: Action::Degrade, cooldown }.decide(true), Decision::Degrade);
    }
}
