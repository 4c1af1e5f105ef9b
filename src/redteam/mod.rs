//! The red team: attacking the raw and defended pipelines and measuring what the
//! defenses are worth.
//!
//! Owns: the oracles (raw model, defended pipeline, a server over HTTP), the
//! `pandaguard attack` and `pandaguard evaluate` commands, the report and its charts.
//! Must not import: `http`/axum (it talks to a server as any client does, through
//! `api` types). Used by the CLI, never by the server.

pub mod attack;
pub mod charts;
pub mod evaluate;
pub mod oracle;
pub mod whitebox;

use std::path::PathBuf;

use crate::attack::{AttackError, OracleError};
use crate::imaging::{DecodeError, ResizeError};
use crate::model::{LabelsError, LoadError};
use crate::params::ParamError;

/// Why a red-team command stopped. Overload, a refused query and bad input stay
/// distinguishable all the way up.
#[derive(Debug, thiserror::Error)]
pub enum RedTeamError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Decode { path: PathBuf, source: DecodeError },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Labels(#[from] LabelsError),
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(transparent)]
    Attack(#[from] AttackError),
    #[error(transparent)]
    Oracle(#[from] OracleError),
    #[error(transparent)]
    Resize(#[from] ResizeError),
    /// The command's options or inputs are not usable (a bad label file, an unknown class).
    #[error("{0}")]
    Invalid(String),
}

impl RedTeamError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| RedTeamError::Io { path, source }
    }
}
