//! gator-style test suites (`gator verify`): `suite.yaml` files of kind
//! `Suite` (`test.gatekeeper.sh/v1alpha1`) that pair a template and a
//! constraint with example objects and assertions on the violations.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Violation;
use crate::constraint::is_constraint;
use crate::engine::Builder;
use crate::error::{Place, PolicyError};
use crate::review::Review;
use crate::template::is_template;
use crate::yaml::{parse_docs, read_file, str_at};

/// The outcome of [`run_suites`]: cases passed and failed (skipped ones are
/// neither), and why each failure failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SuiteReport {
    /// Cases whose assertions all held.
    pub passed: usize,
    /// Cases that failed, including cases that could not run.
    pub failed: usize,
    /// One entry per failed case.
    pub failures: Vec<CaseFailure>,
}

/// One failed case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseFailure {
    /// The suite file.
    pub suite: PathBuf,
    /// `tests[].name`.
    pub test: String,
    /// `cases[].name`; `(setup)` when the test's template or constraint did
    /// not load, `(invalid)` for an `invalid: true` test.
    pub case: String,
    /// What went wrong, in gator's words where there are some.
    pub why: String,
}

impl SuiteReport {
    /// True when no case failed.
    pub fn is_success(&self) -> bool {
        self.failed == 0
    }

    /// `N passed, N failed` — the count line printed at the end of a run.
    pub fn summary(&self) -> String {
        format!("{} passed, {} failed", self.passed, self.failed)
    }
}

impl fmt::Display for SuiteReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for failure in &self.failures {
            writeln!(f, "{failure}")?;
        }
        f.write_str(&self.summary())
    }
}

impl fmt::Display for CaseFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FAIL {} {}/{}: {}",
            self.suite.display(),
            self.test,
            self.case,
            self.why
        )
    }
}

#[derive(Deserialize)]
struct SuiteDoc {
    #[serde(default)]
    tests: Vec<TestDoc>,
    #[serde(default)]
    skip: bool,
}

#[derive(Deserialize)]
struct TestDoc {
    #[serde(default)]
    name: String,
    #[serde(default)]
    template: String,
    #[serde(default)]
    constraint: String,
    #[serde(default)]
    cases: Vec<CaseDoc>,
    #[serde(default)]
    invalid: bool,
    #[serde(default)]
    skip: bool,
}

#[derive(Deserialize)]
struct CaseDoc {
    #[serde(default)]
    name: String,
    #[serde(default)]
    object: String,
    #[serde(default)]
    inventory: Vec<String>,
    #[serde(default)]
    assertions: Vec<AssertionDoc>,
    #[serde(default)]
    skip: bool,
}

#[derive(Deserialize)]
struct AssertionDoc {
    /// `yes`, `no` (strings or YAML booleans) or an exact count; default `yes`.
    #[serde(default)]
    violations: Option<Value>,
    /// A regular expression the violation message must match to count.
    #[serde(default)]
    message: Option<String>,
}

/// Runs a suite file, or every `suite.yaml` / `suite.yml` below a folder
/// (recursively, in name order), the way `gator verify` does. Paths inside a
/// suite are relative to the suite file, so the gatekeeper-library layout
/// works unmodified.
///
/// A problem inside a test (template that does not compile, missing object
/// file, ...) fails that test's cases and the run goes on; only a suite file
/// that cannot be read or is not a Suite is an error, as is a folder with
/// no suite at all (which is almost certainly a wrong path).
pub fn run_suites(path: &Path) -> Result<SuiteReport, PolicyError> {
    let explicit = path.is_file();
    let suites = if explicit {
        vec![path.to_path_buf()]
    } else {
        find_suites(path)?
    };
    let mut report = SuiteReport::default();
    let mut found = 0;
    for suite_path in &suites {
        let file = suite_path.display().to_string();
        let text = read_file(suite_path)?;
        let docs = parse_docs(&file, &text)?;
        let Some(doc) = docs.iter().find(|d| str_at(d, &["kind"]) == "Suite") else {
            if explicit {
                return Err(PolicyError::LoadSuite {
                    place: Place::file(file),
                    message: "no document of kind Suite".into(),
                });
            }
            continue;
        };
        found += 1;
        let suite: SuiteDoc =
            serde_json::from_value(doc.clone()).map_err(|e| PolicyError::LoadSuite {
                place: Place::file(&file),
                message: e.to_string(),
            })?;
        if suite.skip {
            continue;
        }
        let mut runner = Runner {
            suite: suite_path,
            dir: suite_path.parent().unwrap_or(Path::new(".")),
            files: HashMap::new(),
            report: &mut report,
        };
        for test in &suite.tests {
            if !test.skip {
                runner.run_test(test);
            }
        }
    }
    if found == 0 {
        return Err(PolicyError::LoadSuite {
            place: Place::file(path.display().to_string()),
            message: "no suite.yaml of kind Suite found".into(),
        });
    }
    Ok(report)
}

fn find_suites(root: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let read_err = |path: &Path, source| PolicyError::ReadFile {
        path: path.display().to_string(),
        source,
    };
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| read_err(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| read_err(&dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            // Symlinked folders are not followed (no cycles).
            let kind = entry.file_type().map_err(|e| read_err(&path, e))?;
            if kind.is_dir() {
                stack.push(path);
            } else if name == "suite.yaml" || name == "suite.yml" {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A file a suite refers to, parsed.
#[derive(Clone)]
struct Loaded {
    label: String,
    text: Arc<str>,
    docs: Arc<Vec<Value>>,
}

/// Runs the tests of one suite, caching the files they share.
struct Runner<'a> {
    suite: &'a Path,
    dir: &'a Path,
    files: HashMap<PathBuf, Result<Loaded, String>>,
    report: &'a mut SuiteReport,
}

impl Runner<'_> {
    fn fail(&mut self, test: &str, case: &str, why: String) {
        self.report.failed += 1;
        self.report.failures.push(CaseFailure {
            suite: self.suite.to_path_buf(),
            test: test.to_string(),
            case: case.to_string(),
            why,
        });
    }

    /// Reads and parses a file relative to the suite, once.
    fn docs(&mut self, relative: &str) -> Result<Loaded, String> {
        let path = self.dir.join(relative);
        self.files
            .entry(path.clone())
            .or_insert_with(|| {
                let label = path.display().to_string();
                let text = read_file(&path).map_err(|e| e.to_string())?;
                let docs = parse_docs(&label, &text).map_err(|e| e.to_string())?;
                Ok(Loaded {
                    label,
                    text: Arc::from(text),
                    docs: Arc::new(docs),
                })
            })
            .clone()
    }

    fn run_test(&mut self, test: &TestDoc) {
        let setup = self.setup(test);
        if test.invalid {
            match setup {
                Err(Setup::Constraint(_)) => self.report.passed += 1,
                Err(Setup::Other(why)) => self.fail(&test.name, "(invalid)", why),
                Ok(_) => self.fail(
                    &test.name,
                    "(invalid)",
                    "the constraint was expected to be invalid for the template, but it loaded"
                        .into(),
                ),
            }
            return;
        }
        let policy = match setup {
            Ok(policy) => policy,
            Err(Setup::Constraint(why) | Setup::Other(why)) => {
                let runnable: Vec<&CaseDoc> = test.cases.iter().filter(|c| !c.skip).collect();
                if runnable.is_empty() {
                    self.fail(&test.name, "(setup)", why);
                } else {
                    for case in runnable {
                        self.fail(&test.name, &case.name, why.clone());
                    }
                }
                return;
            }
        };
        for case in &test.cases {
            if case.skip {
                continue;
            }
            match self.run_case(&policy, case) {
                Ok(()) => self.report.passed += 1,
                Err(why) => self.fail(&test.name, &case.name, why),
            }
        }
    }

    /// One template and one constraint, compiled into their own engine.
    fn setup(&mut self, test: &TestDoc) -> Result<crate::PolicySet, Setup> {
        if test.template.is_empty() {
            return Err(Setup::Other("the test names no template".into()));
        }
        if test.constraint.is_empty() {
            return Err(Setup::Other("the test names no constraint".into()));
        }
        let template = self.docs(&test.template).map_err(Setup::Other)?;
        let (index, doc) = template
            .docs
            .iter()
            .enumerate()
            .find(|(_, d)| is_template(d))
            .ok_or_else(|| {
                Setup::Other(format!("{} holds no ConstraintTemplate", template.label))
            })?;
        let mut builder = Builder::new();
        builder
            .add_template(&template.label, &template.text, index, doc)
            .map_err(|e| Setup::Other(e.to_string()))?;
        let constraints = self.docs(&test.constraint).map_err(Setup::Other)?;
        let constraint = constraints
            .docs
            .iter()
            .find(|d| is_constraint(d))
            .ok_or_else(|| Setup::Other(format!("{} holds no Constraint", constraints.label)))?;
        builder
            .add_constraint(&constraints.label, constraint)
            .map_err(|e| Setup::Constraint(e.to_string()))?;
        crate::PolicySet::from_builder(builder).map_err(|e| Setup::Other(e.to_string()))
    }

    fn run_case(&mut self, policy: &crate::PolicySet, case: &CaseDoc) -> Result<(), String> {
        if case.object.is_empty() {
            return Err("the case must define object".into());
        }
        if case.assertions.is_empty() {
            return Err("the case must have at least one assertion".into());
        }
        let loaded = self.docs(&case.object)?;
        let file = &loaded.label;
        let objects = &loaded.docs;
        if objects.len() != 1 {
            return Err(format!(
                "{file} defines {} objects, want exactly 1",
                objects.len()
            ));
        }
        let object = &objects[0];
        let mut inventory = Vec::new();
        for relative in &case.inventory {
            let loaded = self.docs(relative)?;
            if loaded.docs.is_empty() {
                return Err(format!("{} defines no objects", loaded.label));
            }
            inventory.extend(loaded.docs.iter().cloned());
        }
        let is_admission_review = str_at(object, &["kind"]) == "AdmissionReview"
            && str_at(object, &["apiVersion"]).starts_with("admission.k8s.io/");
        let review = if is_admission_review {
            Review::of_admission_review(object).ok_or_else(|| {
                format!("{file}: the AdmissionReview has no request.object or request.oldObject")
            })?
        } else {
            Review::of_object(object)
        };
        let inventory: Vec<&Value> = inventory.iter().collect();
        let violations = policy
            .review_all(&[review], &inventory)
            .map_err(|e| e.to_string())?;
        for assertion in &case.assertions {
            check(assertion, &violations)?;
        }
        Ok(())
    }
}

enum Setup {
    /// The constraint did not load (what `invalid: true` expects).
    Constraint(String),
    Other(String),
}

/// gator's assertion: filter by message regex, then compare the count.
fn check(assertion: &AssertionDoc, violations: &[Violation]) -> Result<(), String> {
    let regex = match &assertion.message {
        Some(m) => {
            Some(regex::Regex::new(m).map_err(|e| format!("invalid message regex {m:?}: {e}"))?)
        }
        None => None,
    };
    let matching = violations
        .iter()
        .filter(|v| regex.as_ref().is_none_or(|r| r.is_match(&v.message)))
        .count();
    let containing = assertion
        .message
        .as_ref()
        .map_or(String::new(), |m| format!(" containing {m:?}"));
    let messages: Vec<&str> = violations.iter().map(|v| v.message.as_str()).collect();
    let invalid =
        || "assertion.violations must be a nonnegative integer, \"yes\", or \"no\"".to_string();
    let want = match &assertion.violations {
        None | Some(Value::Bool(true)) => Want::Some,
        Some(Value::Bool(false)) => Want::None,
        Some(Value::String(s)) if s == "yes" => Want::Some,
        Some(Value::String(s)) if s == "no" => Want::None,
        Some(Value::Number(n)) => Want::Exactly(n.as_u64().ok_or_else(invalid)? as usize),
        Some(_) => return Err(invalid()),
    };
    let problem = match want {
        Want::Some if matching == 0 => Some("want at least 1".to_string()),
        Want::None if matching > 0 => Some("want none".to_string()),
        Want::Exactly(n) if matching != n => Some(format!("want exactly {n}")),
        _ => None,
    };
    match problem {
        Some(want) => Err(format!(
            "got {matching} violations{containing} but {want}: got messages {messages:?}"
        )),
        None => Ok(()),
    }
}

enum Want {
    Some,
    None,
    Exactly(usize),
}
