//! Gatekeeper-compatible policy evaluation for gantry's policy gate.
//!
//! Policies are OPA Gatekeeper **ConstraintTemplates** (Rego) and
//! **Constraints**, written exactly as for a cluster running Gatekeeper, so a
//! platform team can reuse the gatekeeper-library and its `gator verify`
//! suites. gantry evaluates them itself, before deploying, on the objects the
//! deploy renderer produced (as `serde_json::Value`), with
//! [regorus](https://github.com/microsoft/regorus) instead of OPA.
//!
//! - [`PolicySet`] compiles every template into **one** regorus engine, once,
//!   and reuses it for every evaluation (a fresh engine per evaluation is
//!   4–5× slower: CRATES.md).
//! - [`run_suites`] runs gator-style `suite.yaml` files.
//! - [`PolicySet::builtin`] holds gantry's own policies from `/policies`.
//!
//! Semantics, gaps versus OPA/Gatekeeper and the built-in list are in
//! `shared/policy/docs/policy.md`.

mod builtin;
mod constraint;
mod engine;
mod error;
mod review;
mod suite;
mod template;
mod yaml;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

pub use constraint::EnforcementAction;
pub use error::{Place, PolicyError};
/// The regorus version this crate evaluates with, re-exported for benchmarks
/// that compare against raw regorus (see [`raw_engine_for_bench`]).
pub use regorus;
pub use suite::{CaseFailure, SuiteReport, run_suites};

use constraint::Constraint;
use engine::{Builder, Origins, ParsedFile, Template};
use review::{Review, inventory_data, namespace_labels};

/// One constraint violated by one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// `metadata.name` of the ConstraintTemplate (e.g. `k8srequiredlabels`).
    pub template: String,
    /// `metadata.name` of the Constraint.
    pub constraint: String,
    /// What the constraint asks for: only [`EnforcementAction::Deny`] blocks.
    pub enforcement_action: EnforcementAction,
    /// Kind of the offending object.
    pub kind: String,
    /// Name of the offending object.
    pub name: String,
    /// Namespace of the offending object, if namespaced.
    pub namespace: Option<String>,
    /// The template's `msg`.
    pub message: String,
}

/// A prepared set of templates and constraints.
///
/// Built once (compiling is the slow part) and shared: `evaluate` takes
/// `&self` and clones the prepared engine per call, so a `PolicySet` can sit
/// in an `Arc` and serve concurrent evaluations.
#[derive(Clone)]
pub struct PolicySet {
    engine: regorus::Engine,
    templates: Vec<Template>,
    constraints: Vec<Constraint>,
    /// To name the YAML file and line of run-time Rego errors.
    origins: Arc<Origins>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("templates", &self.templates())
            .field("constraints", &self.constraints.len())
            .finish()
    }
}

impl PolicySet {
    /// gantry's built-in policies (see `policies/` at the repository root),
    /// each with its constraint, embedded in the binary.
    pub fn builtin() -> Result<PolicySet, PolicyError> {
        Self::load(true, None)
    }

    /// The built-ins (if `builtin`) plus every ConstraintTemplate and
    /// Constraint found in `folder`: recursively, `*.yaml` / `*.yml` files in
    /// name order, multi-document files allowed, hidden folders skipped, any
    /// other document (Deployments, suites, examples) ignored. `folder` may
    /// also be a single file. All templates load before any constraint, so
    /// file order does not matter.
    pub fn load(builtin: bool, folder: Option<&Path>) -> Result<PolicySet, PolicyError> {
        let mut files = Vec::new();
        if builtin {
            for b in builtin::BUILTINS {
                files.push(parsed(&b.template_file(), b.template)?);
                files.push(parsed(&b.constraint_file(), b.constraint)?);
            }
        }
        if let Some(folder) = folder {
            for path in yaml_files(folder)? {
                let text = yaml::read_file(&path)?;
                files.push(parsed(&path.display().to_string(), &text)?);
            }
        }
        let mut builder = Builder::new();
        builder.add_files(&files)?;
        Self::from_builder(builder)
    }

    fn from_builder(builder: Builder) -> Result<PolicySet, PolicyError> {
        let prepared = builder.finish()?;
        Ok(PolicySet {
            engine: prepared.engine,
            templates: prepared.templates,
            constraints: prepared.constraints,
            origins: Arc::new(prepared.origins),
        })
    }

    /// Evaluates every constraint on every object it matches.
    ///
    /// `inventory` is what the cluster already holds (Gatekeeper's synced
    /// `data.inventory`). The `objects` are added to it too: they are deployed
    /// together, so each sees the others as existing, as Gatekeeper would once
    /// the earlier ones were admitted (templates exclude the object itself,
    /// e.g. unique-ingress-host compares namespace/name). Violations come in
    /// object order, then constraint order; every enforcement action is
    /// reported.
    pub fn evaluate(
        &self,
        objects: &[Value],
        inventory: &[Value],
    ) -> Result<Vec<Violation>, PolicyError> {
        let reviews: Vec<Review<'_>> = objects.iter().map(Review::of_object).collect();
        let data: Vec<&Value> = inventory.iter().chain(objects).collect();
        self.review_all(&reviews, &data)
    }

    /// The core loop: one engine clone per call, one `eval_rule` per matching
    /// (object, constraint) pair. The inventory rides in the input (templates
    /// were rewritten from `data.inventory` to `input.inventory`), so the
    /// engine prepared at load time is never re-analysed.
    pub(crate) fn review_all(
        &self,
        reviews: &[Review<'_>],
        inventory: &[&Value],
    ) -> Result<Vec<Violation>, PolicyError> {
        let mut violations = Vec::new();
        if reviews.is_empty() || self.constraints.is_empty() {
            return Ok(violations);
        }
        // `evaluate` takes `&self`; a clone of the prepared engine is cheap
        // (shared modules and analysis) and keeps it prepared.
        let mut engine = self.engine.clone();
        let inventory_value = regorus::Value::from(inventory_data(inventory));
        let labels = namespace_labels(inventory);
        let review_key = regorus::Value::from("review");
        let parameters_key = regorus::Value::from("parameters");
        let inventory_key = regorus::Value::from("inventory");
        let msg_key = regorus::Value::from("msg");
        for review in reviews {
            let subject = review.subject();
            for c in &self.constraints {
                if !c.matcher.matches(&subject, |ns| labels.get(ns).copied()) {
                    continue;
                }
                let template = &self.templates[c.template];
                let input = BTreeMap::from([
                    (review_key.clone(), review.value.clone()),
                    (parameters_key.clone(), c.parameters.clone()),
                    (inventory_key.clone(), inventory_value.clone()),
                ]);
                engine.set_input(regorus::Value::from(input));
                let fail = |message: String| PolicyError::Evaluate {
                    place: Box::new(
                        self.origins
                            .locate(&message)
                            .place
                            .unwrap_or_else(|| template.place.clone()),
                    ),
                    template: template.name.clone(),
                    constraint: c.name.clone(),
                    object: review.describe(),
                    message,
                };
                let result = engine
                    .eval_rule(template.query.clone())
                    .map_err(|e| fail(e.to_string().trim().to_string()))?;
                let found = match &result {
                    regorus::Value::Undefined => continue,
                    regorus::Value::Set(set) => set,
                    other => {
                        return Err(fail(format!(
                            "`violation` must be a partial set rule, got {}",
                            other.to_json_str().unwrap_or_default()
                        )));
                    }
                };
                for v in found.iter() {
                    let message = match &v[&msg_key] {
                        regorus::Value::String(s) => s.to_string(),
                        regorus::Value::Undefined => String::new(),
                        other => other.to_json_str().unwrap_or_default(),
                    };
                    violations.push(Violation {
                        template: template.name.clone(),
                        constraint: c.name.clone(),
                        enforcement_action: c.action,
                        kind: subject.kind.to_string(),
                        name: subject.name.to_string(),
                        namespace: subject.namespace.map(str::to_string),
                        message,
                    });
                }
            }
        }
        Ok(violations)
    }

    /// Names (`metadata.name`) of the loaded templates, in load order.
    pub fn templates(&self) -> Vec<&str> {
        self.templates.iter().map(|t| t.name.as_str()).collect()
    }

    /// How many constraints are loaded.
    pub fn constraints(&self) -> usize {
        self.constraints.len()
    }
}

/// **Bench-only.** A regorus engine holding one template's Rego and libs as
/// written (no renaming, no match logic, no engine reuse across templates),
/// configured like [`PolicySet`]'s engine, plus the rule to query
/// (`data.<package>.violation`). Lets a benchmark compare raw regorus with
/// [`PolicySet::evaluate`]: set the input to
/// `{"review": {"object": ...}, "parameters": {...}}` and `eval_rule`.
pub fn raw_engine_for_bench(template_yaml: &str) -> Result<(regorus::Engine, String), PolicyError> {
    engine::raw_engine(template_yaml)
}

fn parsed(file: &str, text: &str) -> Result<ParsedFile, PolicyError> {
    Ok(ParsedFile {
        file: file.to_string(),
        docs: yaml::parse_docs(file, text)?,
        text: Arc::from(text),
    })
}

/// `*.yaml` / `*.yml` below `root` (or `root` itself if it is a file), in
/// name order, skipping hidden folders.
fn yaml_files(root: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let read_err = |path: &Path, source| PolicyError::ReadFile {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(root).map_err(|e| read_err(root, e))?;
    if meta.is_file() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| read_err(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| read_err(&dir, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            // Symlinked folders are not followed (no cycles); symlinked files are.
            let kind = entry.file_type().map_err(|e| read_err(&path, e))?;
            if kind.is_dir() {
                stack.push(path);
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
