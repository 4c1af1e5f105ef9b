//! The red team: attacking the raw and defended pipelines and measuring what the
//! defenses are worth.

pub mod attack;
pub mod charts;
pub mod evaluate;
pub mod oracle;
