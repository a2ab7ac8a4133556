//! gantry's pipeline model (DESIGN.md §4–6): validated names, time-sortable run
//! ids, the run record with its steps and statuses, `gantry.toml`, and the typed
//! [`RunStore`] with compare-and-swap updates, indexes, event claims and the
//! append-only audit trail.

pub mod config;
pub mod error;
pub mod exposure;
pub mod findings;
pub mod governance;
pub mod ids;
pub mod messages;
pub mod names;
pub mod run;
pub mod runs;

pub use config::{AppConfig, Config};
pub use error::PipelineError;
pub use messages::{Alert, Severity, StepRequest};
pub use names::{AppName, CommitSha, Digest, NameError, RunId};
pub use run::{
    Image, Notification, NotificationOutcome, Retrigger, RollbackOf, Run, RunStatus,
    SecurityAlertRef, Source, SourceKind, Step, StepStatus, TraceContext,
};
pub use runs::{AuditEntry, ClaimSource, RunStore};
