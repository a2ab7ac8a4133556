//! The one error type of the crate.

use std::fmt;

/// A place in a file: `file:line` when the line is known, else the file alone.
///
/// Errors print it first so an operator can jump straight to the offending
/// line of the YAML file they wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The file as given (a path, or `policies/<name>/template.yaml` for built-ins).
    pub file: String,
    /// 1-based line in that file, when known.
    pub line: Option<u32>,
}

impl Place {
    pub(crate) fn file(file: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            line: None,
        }
    }

    pub(crate) fn at(file: impl Into<String>, line: Option<u32>) -> Self {
        Self {
            file: file.into(),
            line,
        }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.file),
            None => f.write_str(&self.file),
        }
    }
}

/// Why loading, evaluating or testing policies failed.
///
/// Every variant is named after the operation that failed and names the file
/// (and line, where the parser knows it). Policy problems are configuration
/// problems: none of them gets better by retrying.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file or folder could not be read.
    #[error("reading {path} failed: {source}")]
    ReadFile {
        /// The file or folder.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not valid YAML.
    #[error("parsing YAML at {place} failed: {message}")]
    ParseYaml {
        /// File and line of the syntax error.
        place: Place,
        /// The parser's message.
        message: String,
    },
    /// A ConstraintTemplate is malformed (no kind, no Rego, bad lib package,
    /// a kind defined twice, ...).
    #[error("loading ConstraintTemplate {template} at {place} failed: {message}")]
    LoadTemplate {
        /// File (and line) of the template.
        place: Place,
        /// `metadata.name` of the template, or `?`.
        template: String,
        /// What is wrong.
        message: String,
    },
    /// The Rego of a template does not parse or compile. `place.line` is the
    /// line in the YAML file; the message keeps regorus' own pointer into the
    /// Rego source (`file#template/rego:line:col`).
    #[error("compiling Rego of ConstraintTemplate {template} at {place} failed: {message}")]
    CompileRego {
        /// File and YAML line of the error.
        place: Place,
        /// `metadata.name` of the template.
        template: String,
        /// Line within the Rego source, when regorus reported one.
        rego_line: Option<u32>,
        /// regorus' message, with its source excerpt.
        message: String,
    },
    /// A Constraint is malformed or names a kind no template defines.
    #[error("loading Constraint {kind}/{constraint} at {place} failed: {message}")]
    LoadConstraint {
        /// File of the constraint.
        place: Place,
        /// Constraint kind (the template's `spec.crd.spec.names.kind`).
        kind: String,
        /// `metadata.name` of the constraint, or `?`.
        constraint: String,
        /// What is wrong.
        message: String,
    },
    /// Rego evaluation failed at run time. regorus reports some mistakes only
    /// when a rule body runs (unsafe variables, unknown functions, wrong
    /// arity, recursion), so these land here, with the template's YAML line.
    #[error(
        "evaluating {template} (constraint {constraint}) on {object} failed at {place}: {message}"
    )]
    Evaluate {
        /// File and YAML line of the failing Rego (or the template file);
        /// boxed to keep the error small.
        place: Box<Place>,
        /// Template name.
        template: String,
        /// Constraint name.
        constraint: String,
        /// `Kind namespace/name` of the object under review.
        object: String,
        /// regorus' message.
        message: String,
    },
    /// A gator suite file is not a usable Suite.
    #[error("loading suite {place} failed: {message}")]
    LoadSuite {
        /// The suite file (or the folder searched).
        place: Place,
        /// What is wrong.
        message: String,
    },
}

impl PolicyError {
    /// Always `false`: bad policies, bad constraints and bad objects stay bad.
    /// Callers record the failure on the run instead of retrying it.
    pub fn is_transient(&self) -> bool {
        false
    }
}
